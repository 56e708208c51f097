import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test sees a freshly loaded plugin manager (environment changes take effect)."""
    from biwm.core.plugins import reset_plugin_manager

    monkeypatch.delenv("BIWM_DISABLE_PLUGINS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


def tiny_recipe(run_dir: Path, **stage_overrides) -> dict:
    """A CPU-second-sized recipe: 32x32 toy world, tiny Wan with 2 layers."""
    finetune = {"stage": "finetune", "steps": 4, "batch_size": 2, "checkpoint_every": 2, "chunk_frames": 2,
                "max_history": 4, "lr": 1e-3, **stage_overrides.pop("finetune", {})}
    generate = {"stage": "generate", "trajectories": 2, "history_frames": 2, "chunks": 2, "chunk_frames": 2,
                "steps": 2, **stage_overrides.pop("generate", {})}
    return {
        "name": "tiny-test",
        "run_dir": str(run_dir),
        "data": {"train_clips": 8, "heldout_clips": 2, "frames": 8,
                 "toyworld": {"height": 32, "width": 32}},
        "model": {"backbone": {"name": "wan", "options": {"preset": "tiny", "overrides": {"num_layers": 2}}},
                  "controls": ["actions", "plucker"],
                  "compressor": {"name": "none", "options": {"max_frames": 4}}},
        "stages": [finetune, generate],
    }


def world_around(backbone, compressor: str = "none", options: dict | None = None,
                 controls=("actions", "plucker")):
    """A WorldModel over ``backbone`` with the ``controls`` and a ``compressor`` (default: ``none``, 4 frames)."""
    from biwm.core.plugins import get_plugin_manager
    from biwm.core.window import WorldModel

    pm = get_plugin_manager()
    ctrl = {name: pm.create("control", name, {}, backbone=backbone) for name in controls}
    options = {"max_frames": 4} if options is None else options
    return WorldModel(backbone, ctrl, pm.create("compressor", compressor, options, backbone=backbone))


def check_compressed_window(world) -> None:
    """A tiny backbone's compressor (over its ``patch_embedding``, a convolution equal to ``patch_embed``) on
    a 6-frame history: fewer tokens than the history has, the right output, gradients into the compressor."""
    from test_model import random_camera

    from biwm.core.window import Window

    bb = world.backbone
    conv = bb.patch_embedding
    assert isinstance(conv, torch.nn.Conv3d) and conv.in_channels == bb.latent_channels == 48
    x = torch.randn(1, 48, 2, 8, 8)
    torch.testing.assert_close(conv(x), bb.patch_embed(x), rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(0)
    window = Window(text=bb.encode_text(["", ""]), chunk=torch.randn(2, 48, 2, 8, 8, generator=g),
                    timestep=torch.tensor([500.0, 500.0]), history=torch.randn(2, 48, 6, 8, 8, generator=g),
                    camera=random_camera(2, 8))
    out = world(window)
    assert out.shape == (2, 48, 2, 8, 8) and torch.isfinite(out).all()
    assert world.last_window_tokens < 6 * 16 + 2 * 16  # compressed
    out.pow(2).mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in world.compressor.parameters())


def world_from_sharded_weights(tmp_path: Path, backbone: str, transformer, max_shard_size: str):
    """``transformer`` (a tiny preset's, 2 blocks) saved by save_pretrained in several shards plus an index and
    loaded through a recipe's ``weights:``: (the world model, diffusers' own class loaded from the same folder)."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunContext

    folder = tmp_path / "w" / "transformer"
    transformer.save_pretrained(folder, max_shard_size=max_shard_size)
    assert len(list(folder.glob("*.safetensors"))) >= 3
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    data = tiny_recipe(tmp_path / "run")
    data["model"]["backbone"] = {"name": backbone, "options": {"preset": "tiny", "overrides": {"num_layers": 2},
                                                               "weights": str(tmp_path / "w")}}
    world = RunContext(recipe=validate_recipe(data), run_dir=tmp_path / "run").build_world_model()
    for name, value in transformer.state_dict().items():
        assert torch.equal(world.backbone.transformer.state_dict()[name], value), name
    return world, type(transformer).from_pretrained(folder)


def backbones_recipe_smoke_run(tmp_path: Path, backbone: str) -> dict:
    """examples/backbones.yaml with only model.backbone changed (scripts/compare_backbones.py, the script's
    block for ``backbone``), at a few steps; checks that stage 1, stage 2 and the evaluation ran. Its run's
    scores by stage."""
    import importlib.util
    import json
    import math

    import yaml

    spec = importlib.util.spec_from_file_location("compare_backbones", ROOT / "scripts" / "compare_backbones.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    fast = ["finetune.steps=2", "finetune.checkpoint_every=2", "distill.steps=2", "distill.checkpoint_every=2",
            "evaluate.trajectories=2", "evaluate.steps=2", "evaluate.teacher_steps=2", "data.train_clips=4",
            "data.heldout_clips=2"]
    argv = ["--backbone", f"{backbone}=" + script.BACKBONES[backbone], "--runs", str(tmp_path / "runs"),
            "--out", str(tmp_path / "cmp")] + [a for s in fast for a in ("--set", s)]
    assert script.main(argv) == 0
    run = json.loads((tmp_path / "cmp.json").read_text())["runs"][backbone]
    assert run["finetune"]["finetune_steps"] == 2 and math.isfinite(run["finetune"]["finetune_loss_last"])
    assert run["distill"]["critic_updates"] == 2 and math.isfinite(run["distill"]["distill_critic_loss_last"])
    evaluation = run["evaluate"]
    assert evaluation["nfe_per_chunk"] == 2 and evaluation["teacher_nfe_per_chunk"] == 2
    assert 0 < evaluation["psnr"] < 60 and 0 <= evaluation["idm_accuracy"] <= 1
    recipe = yaml.safe_load((tmp_path / "runs" / backbone / "recipe.yaml").read_text())
    assert recipe["model"]["backbone"]["name"] == backbone
    assert [c["name"] for c in recipe["model"]["controls"]] == ["actions", "plucker"]
    assert f"| `{backbone}` |" in (tmp_path / "cmp.md").read_text()
    return run


def tiny_model_file(tmp_path: Path) -> Path:
    """The model.safetensors (with its card) of a tiny run's finetune stage, trained a few steps."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    data = tiny_recipe(tmp_path / "run")
    data["stages"] = data["stages"][:1]
    run_recipe(validate_recipe(data))
    return tmp_path / "run" / "finetune" / "model.safetensors"


def biwm_cmd() -> list[str]:
    return [sys.executable, "-m", "biwm.core.cli"]


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update(extra)
    return env


def image_shift(before, after) -> tuple[int, int]:
    """(dy, dx) pixels by which the content of ``after`` [H, W] moved relative to ``before``: the peak of
    their phase correlation (positive dx: moved right)."""
    import numpy as np

    a, b = (np.asarray(x, dtype=np.float64) for x in (before, after))
    cross = np.fft.fft2(b - b.mean()) * np.conj(np.fft.fft2(a - a.mean()))
    correlation = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    peak = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
    return tuple(int(p if p <= n // 2 else p - n) for p, n in zip(peak, correlation.shape))


def true_turn_shift(scene: int, history_frames: int, keys: str) -> list[tuple[int, int]]:
    """The toy world's own answer: image shifts between consecutive frames of held-out scene ``scene``
    when ``keys`` continue its ``history_frames`` true frames (as biwm generate / play start it)."""
    from biwm.core.camera import actions_to_poses, parse_keys
    from biwm.toyworld.world import render_clips, split_seeds

    seeds = split_seeds("heldout", 1, scene)
    history = render_clips(seeds, history_frames)
    future = actions_to_poses(parse_keys(keys)[None], history.camera.c2w[:, -1])
    clips = render_clips(seeds, history_frames + future.shape[1], c2w=torch.cat([history.camera.c2w, future], 1))
    gray = clips.frames[0].float().mean(1)
    return [image_shift(gray[i], gray[i + 1]) for i in range(history_frames - 1, gray.shape[0] - 1)]
