"""History compressors of biwm-compressors: framepack and packforcing (issue 5)."""

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import biwm_cmd, subprocess_env, tiny_recipe
from test_model import activate_controls, random_camera, tiny_backbone

from biwm.core.text import TextConditioning
from biwm.core.window import Window, WorldModel

GRID = (4, 4)  # token grid of the 32x32 tiny preset (8x8 latents, 2x2 patches)


def world_with(name: str, options: dict | None = None, seed: int = 0) -> WorldModel:
    from biwm.core.plugins import get_plugin_manager

    pm = get_plugin_manager()
    bb = tiny_backbone(seed=seed)
    controls = {n: pm.create("control", n, {}, backbone=bb) for n in ("actions", "plucker")}
    return WorldModel(bb, controls, pm.create("compressor", name, options or {}, backbone=bb))


def window(history: int, chunk: int = 4, seed: int = 0) -> Window:
    g = torch.Generator().manual_seed(seed)
    return Window(text=TextConditioning.from_tensor(torch.zeros(2, 4, 32), "t5"),
                  chunk=torch.randn(2, 48, chunk, 8, 8, generator=g), timestep=torch.tensor([500.0, 300.0]),
                  history=torch.randn(2, 48, history, 8, 8, generator=g),
                  camera=random_camera(2, history + chunk, seed=seed))


def history_of(world: WorldModel, w: Window):
    """The history tokens the world model builds for window ``w`` (control included)."""
    from biwm.core.window import relative_to_frame

    chunk = world.backbone.patch_embed(w.chunk).flatten(2).transpose(1, 2)
    camera = None if w.camera is None else relative_to_frame(w.camera, w.history_length)
    return world.history_tokens(w, camera, GRID, query=chunk)


# -- framepack -----------------------------------------------------------------------------------

def test_framepack_kernels_embed_a_constant_latent_like_the_backbone():
    world = world_with("framepack", {"layout": [[1, 1], [2, 2], [4, 8]]})
    bb, comp = world.backbone, world.compressor
    assert sorted(comp.kernels) == ["2", "4"]
    assert comp.kernels["4"].kernel_size == (4, 8, 8) and comp.kernels["2"].kernel_size == (2, 4, 4)
    # seeded: the global RNG's state depends on which tests ran before (it failed one order in many)
    constant = torch.randn(1, 48, 1, 1, 1, generator=torch.Generator().manual_seed(0)).expand(1, 48, 4, 8, 8).contiguous()
    reference = bb.patch_embed(constant)[:, :, 0, 0, 0]  # every full-resolution token is this
    for s in ("2", "4"):
        out = comp.kernels[s](constant)
        assert out.shape[2:] == (4 // int(s), 4 // int(s), 4 // int(s))
        # float32 sums of 48x2x4x4 (or 48x4x8x8) products against 48x2x2 ones, outputs up to about 2: 1e-5 relative
        torch.testing.assert_close(out, reference[:, :, None, None, None].expand_as(out), rtol=1e-5, atol=5e-5)
    # More than the constant case: a coarse kernel equals average pooling followed by the backbone's kernel.
    x = torch.randn(1, 48, 4, 8, 8)
    torch.testing.assert_close(comp.kernels["2"](x), bb.patch_embed(F.avg_pool3d(x, 2)), rtol=1e-4, atol=1e-5)
    # Trained copies, not views of the backbone's weights.
    assert comp.kernels["2"].weight.data_ptr() != bb.patch_embedding.weight.data_ptr()


@pytest.mark.parametrize("options, expected", [
    # default layout [[1, 1], [2, 2], [4, 16]] on a 4x4 grid: 16 + 4 per 2-frame group + 1 per 4-frame group
    ({}, {1: 16, 2: 16 + 4, 3: 20, 4: 20 + 1, 7: 20 + 1, 8: 22, 19: 24, 20: 24, 240: 24}),
    ({"anchor_first": True}, {19: 24, 20: 24 + 16, 240: 40}),
    ({"tail": "average"}, {19: 24, 20: 25, 240: 25}),
    ({"layout": [[1, 2], [2, 4]]}, {1: 16, 2: 32, 3: 36, 6: 40, 100: 40}),
])
def test_framepack_token_counts(options, expected):
    world = world_with("framepack", options)
    for history, tokens in expected.items():
        assert world.compressor.token_budget(history, GRID) == tokens, history
        hist = history_of(world, window(history))
        assert hist.tokens.shape == (2, tokens, world.backbone.hidden_dim), history
        assert hist.positions.shape == (tokens, 3) and hist.modulation.shape == hist.tokens.shape


@pytest.mark.parametrize("options", [{}, {"anchor_first": True, "tail": "average"}])
def test_framepack_positions_are_monotone_centred_and_in_range(options):
    world = world_with("framepack", options)
    for history in (1, 3, 5, 13, 19, 31, 64):
        pos = history_of(world, window(history)).positions
        t = pos[:, 0]
        assert (t[1:] >= t[:-1]).all(), history  # oldest first
        assert t.min() >= 0 and t.max() == history - 1, history
        assert pos[:, 1:].min() >= 0 and pos[:, 1:].max() <= GRID[0] - 1
    # Centres: the newest frame at its own index; a 2x2 cell's tokens at row/col 0.5 and 2.5; the
    # oldest 4-frame group of a 19-frame history covers frames 0-3, centre 1.5.
    pos = history_of(world_with("framepack"), window(19)).positions
    assert pos[-16:, 0].unique().tolist() == [18.0]
    assert pos[4:8, 1:].unique().tolist() == [0.5, 2.5]  # the 2-frame level, after 4 single-token groups
    assert pos[4:8, 0].unique().tolist() == [16.5]
    assert pos[0].tolist() == [1.5, 1.5, 1.5]


def test_framepack_pools_control_like_the_tokens():
    world = world_with("framepack", {"layout": [[1, 1], [2, 2]]})
    activate_controls(world, 0.05)
    w = window(3)
    with_control = history_of(world, w)
    no_control = history_of(world, Window(**{**w.__dict__, "camera": None}))
    # The control the world model computes for the 3 history frames, at token resolution.
    frames = torch.arange(3)
    from biwm.core.window import relative_to_frame

    ctl = world.control_embedding(relative_to_frame(w.camera, 3), frames, (3, *GRID), None)
    added = (with_control.tokens - no_control.tokens).detach()
    expect_old = F.avg_pool3d(ctl["tokens"][:, :, :2], 2).flatten(2).transpose(1, 2)  # frames 0-1, 2x2 cells
    expect_new = ctl["tokens"][:, :, 2:].flatten(2).transpose(1, 2)
    torch.testing.assert_close(added, torch.cat([expect_old, expect_new], 1).detach(), rtol=1e-4, atol=1e-5)
    mod_old = F.avg_pool3d(ctl["modulation"][:, :, :2], 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(with_control.modulation[:, :4], mod_old, rtol=1e-4, atol=1e-6)


# -- packforcing ---------------------------------------------------------------------------------

def test_packforcing_bookkeeping_over_a_long_sequence():
    world = world_with("packforcing", {"sink_frames": 2, "recent_frames": 3, "block_frames": 4, "top_k": 3})
    comp = world.compressor
    assert comp.block_tokens(GRID) == 2  # (4 frames / 2) x (4/4) x (4/4): 32x fewer than 4 full frames
    budgets = []
    for history in range(0, 121):
        sink, mid, recent = comp.partition(history)
        assert (sink, recent) == (min(history, 2), min(max(history - 2, 0), 3)) and sink + mid + recent == history
        assert comp.blocks(history) == -(-mid // 4) and comp.kept_blocks(history) == min(comp.blocks(history), 3)
        budget = comp.token_budget(history, GRID)
        assert budget == (sink + recent) * 16 + comp.kept_blocks(history) * 2
        budgets.append(budget)
    assert max(budgets) == budgets[-1] == 5 * 16 + 3 * 2  # bounded: flat once 3 mid blocks exist
    assert all(b == budgets[-1] for b in budgets[2 + 3 + 9:])
    for history in (1, 4, 6, 10, 37, 120):
        hist = history_of(world, window(history))
        assert hist.length == comp.token_budget(history, GRID), history


def test_packforcing_repacked_positions_are_contiguous():
    world = world_with("packforcing", {"sink_frames": 1, "recent_frames": 4, "block_frames": 4, "top_k": 2})
    for history in (9, 10, 23, 60):
        pos = history_of(world, window(history)).positions
        t = pos[:, 0]
        assert (t[1:] >= t[:-1]).all()
        # The frames each token covers (a compressed token covers 2 frames around its centre) tile an
        # unbroken range that ends right before the chunk at frame `history`.
        covered = set()
        for centre in t.unique().tolist():
            half = 0.5 if centre % 1 else 0.0
            covered.update({int(centre - half), int(centre + half)})
        kept = world.compressor.kept_blocks(history)
        span = 1 + kept * 4 + 4
        assert sorted(covered) == list(range(history - span, history)), history
        assert pos[:, 1:].min() >= 0 and pos[:, 1:].max() <= 3


class DotBackbone:
    """Attention features = the tokens themselves (one head): q·k is a plain dot product."""

    @staticmethod
    def attention_features(tokens, block=0):
        x = tokens.unflatten(-1, (1, -1))
        return x, x


def test_topk_picks_the_block_the_query_is_built_to_match():
    from biwm.compressors.packforcing import block_scores

    world = world_with("packforcing", {"top_k": 1, "query_tokens": 8})
    comp = world.compressor
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 6, 2, 256, generator=g)  # 6 mid blocks of 2 tokens
    target = torch.tensor([1, 4])
    query = keys[torch.arange(2), target].mean(1, keepdim=True).repeat(1, 16, 1) + 0.1 * torch.randn(2, 16, 256, generator=g)
    assert comp.select(query, keys, DotBackbone).tolist() == [[1], [4]]
    comp.top_k = 2  # a query built from blocks 0 and 5 (sample 0), 2 and 3 (sample 1)
    query = torch.cat([keys[0, [0, 5]].flatten(0, 1)[None], keys[1, [2, 3]].flatten(0, 1)[None]]).repeat(1, 4, 1)
    assert comp.select(query, keys, DotBackbone).tolist() == [[0, 5], [2, 3]]
    # The score is the mean scaled dot product.
    q, k = query.unflatten(-1, (1, -1)), keys.unflatten(-1, (1, -1))
    torch.testing.assert_close(block_scores(q, k)[0, 0], (query[0] @ keys[0, 0].T).mean() / 16.0)
    # In the world model: the query is the chunk's tokens, scored with the backbone's own projections.
    world = world_with("packforcing", {"top_k": 2, "sink_frames": 0})
    comp = world.compressor
    seen = {}
    comp.select = lambda query, keys, backbone: seen.update(query=query, keys=keys) or torch.tensor([[0, 3], [1, 2]])
    w = window(4 + 16)
    hist = history_of(world, w)
    assert seen["query"].shape == (2, 64, 256) and seen["keys"].shape == (2, 4, 2, 256)
    torch.testing.assert_close(hist.tokens[0, :4], seen["keys"][0, [0, 3]].flatten(0, 1))
    torch.testing.assert_close(hist.tokens[1, :4], seen["keys"][1, [1, 2]].flatten(0, 1))


# -- both ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, params", [
    ("framepack", ["kernels.2.weight", "kernels.4.weight", "kernels.4.bias"]),
    ("packforcing", ["base.weight", "base.bias", "refine.2.weight"]),
])
def test_stage1_gradients_reach_the_compressor(name, params):
    from biwm.core.schedule import add_noise, velocity_target

    world = world_with(name)
    w = window(30)
    x0, noise = w.chunk, torch.randn_like(w.chunk)
    sigma = torch.tensor([0.5, 0.3])
    w = w.with_chunk(add_noise(x0, noise, sigma), sigma * 1000)
    loss = F.mse_loss(world(w), velocity_target(x0, noise))
    loss.backward()
    grads = dict(world.compressor.named_parameters())
    for p in params:
        assert grads[p].grad is not None and grads[p].grad.abs().sum() > 0, p
    # The history changes the prediction through the compressed tokens.
    with torch.no_grad():
        other = Window(**{**w.__dict__, "history": torch.randn_like(w.history)})
        assert not torch.allclose(world(w), world(other))


def test_compressor_option_errors_name_the_field(tmp_path):
    bad = {"framepack": ({"layout": [[0, 2]]}, "layout[0] = [0, 2]"),
           "packforcing": ({"block_frames": 3}, "block_frames = 3 must be a multiple of compress[0] = 2")}
    for name, (options, message) in bad.items():
        recipe = tiny_recipe(tmp_path / name)
        recipe["model"]["compressor"] = {"name": name, "options": options}
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(recipe))
        proc = subprocess.run(biwm_cmd() + ["validate", str(path)], capture_output=True, text=True,
                              env=subprocess_env(COLUMNS="300"))
        assert proc.returncode == 2 and message in proc.stderr and "model.compressor" in proc.stderr, proc.stderr


@pytest.mark.parametrize("name, options", [("framepack", {"layout": [[1, 1], [2, 2]]}),
                                           ("packforcing", {"recent_frames": 1, "block_frames": 2, "top_k": 1})])
def test_compressors_in_finetune_distill_generate_and_evaluate(tmp_path, name, options):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    data = tiny_recipe(tmp_path / "run", finetune={"max_history": 6})
    data["data"]["frames"] = 12
    data["model"]["compressor"] = {"name": name, "options": options}
    data["stages"][1:1] = [{"stage": "distill", "steps": 2, "batch_size": 2, "history_frames": 4, "chunks": 2,
                            "chunk_frames": 2, "student_steps": 2, "generator_every": 1, "checkpoint_every": 2}]
    data["stages"][-1].update(history_frames=4, chunks=3, write_videos=False)
    data["stages"].append({"stage": "evaluate", "trajectories": 2, "history_frames": 4, "chunks": 3,
                           "chunk_frames": 2, "steps": 2, "dynamics_scenes": 0, "compare_teacher": False,
                           "idm_steps": 1})
    metrics = run_recipe(validate_recipe(data))
    from safetensors.torch import load_file

    for stage in ("finetune", "distill"):
        weights = load_file(str(tmp_path / "run" / stage / "model.safetensors"))
        assert any(k.startswith("compressor.") for k in weights), stage
    assert metrics["stages"]["evaluate"]["history_latent_frames"] == 4
    assert len(metrics["stages"]["evaluate"]["psnr_per_chunk"]) == 3


def test_long_rollout_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/long_rollout.py on a 2-step tiny run: the lists it reports, a fixed window's flat
    token count, the re-render mode and a bad variant's error (no timing assertions)."""
    import sys

    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe
    from conftest import ROOT

    data = tiny_recipe(tmp_path / "run", finetune={"steps": 2})
    data["model"]["compressor"] = {"name": "none", "options": {"max_frames": None}}
    data["stages"] = data["stages"][:1]
    run_recipe(validate_recipe(data))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import long_rollout
    finally:
        sys.path.pop(0)
    out = tmp_path / "lr"
    common = ["--chunks", "3", "--chunk-frames", "2", "--history-frames", "2", "--trajectories", "2", "--steps", "2",
              "--device", "cpu", "--out", str(out)]
    assert long_rollout.main([f"all={tmp_path / 'run'}",
                              f"last2={tmp_path / 'run'}@model.compressor.options.max_frames=2", *common]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["all"]["tokens_per_window"] == [64, 96, 128]  # (2 + 2c history + 2 chunk frames) x 16 tokens
    assert doc["last2"]["tokens_per_window"] == [64, 64, 64]
    for r in (doc["all"], doc["last2"]):
        assert len(r["sec_per_chunk"]) == len(r["psnr_per_chunk"]) == 3 and min(r["sec_per_chunk"]) > 0
    cpu = long_rollout.environment(torch.device("cpu"))  # the record the other benchmarks write
    assert doc["setup"]["device"] == cpu["device"] and doc["setup"]["date"] == cpu["date"]
    assert doc["setup"]["versions"] == f"torch {torch.__version__}, diffusers {cpu['diffusers']}, biwm {cpu['biwm-core']}"
    assert out.with_suffix(".png").is_file()
    assert "| last2 | 64 | 64 |" in out.with_suffix(".md").read_text()
    out.with_suffix(".md").unlink()
    assert long_rollout.main(["--render", str(out.with_suffix(".json"))]) == 0
    assert "| all | 64 | 128 |" in out.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="no such file or folder"):
        long_rollout.main([f"x={tmp_path / 'nope'}", *common])


def test_init_moves_a_trained_model_to_a_compressor(tmp_path):
    """Secondary fine-tuning: a model trained with `none` starts a framepack finetune; the shared
    weights load equal, the compressor's own start fresh, and its missing names are reported."""
    from safetensors.torch import load_file

    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    first = tiny_recipe(tmp_path / "a", finetune={"steps": 2})
    first["stages"] = first["stages"][:1]
    run_recipe(validate_recipe(first))
    source = tmp_path / "a" / "finetune" / "model.safetensors"
    second = tiny_recipe(tmp_path / "b", finetune={"steps": 1, "init": str(source), "lr": 1e-12})
    second["stages"] = second["stages"][:1]
    second["model"]["compressor"] = {"name": "framepack", "options": {"layout": [[1, 1], [2, 2]]}}
    path = tmp_path / "b.yaml"
    path.write_text(json.dumps(second))
    proc = subprocess.run(biwm_cmd() + ["run", str(path)], capture_output=True, text=True,
                          env=subprocess_env(COLUMNS="300"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "missing" in proc.stdout and "compressor.kernels.2" in proc.stdout
    before, after = load_file(str(source)), load_file(str(tmp_path / "b" / "finetune" / "model.safetensors"))
    shared = [k for k in before if k.startswith("controls.")]
    assert shared and all(torch.allclose(before[k], after[k], atol=1e-6) for k in shared)
    assert "compressor.kernels.2.weight" in after and not any(k.startswith("compressor.") for k in before)
