"""The finetune and distill stages under accelerate FSDP2 with 2 processes on the CPU (gloo): the same
losses and weights as one process with the same global batch, and ``--resume`` after ``kill -9`` ends
where an uninterrupted 2-process run ends. ``pytest -m distributed`` selects these (they run in the default
suite too, ~2.5 min on 2 cores).

Tolerances: the two processes train on the same clips with the same noise as one process (each keeps
its half of the global batch's draws), so the runs differ only by float32 rounding (gradients averaged
across ranks instead of over one batch): 1e-4 on the losses, 1e-3 on the weights after 9 AdamW steps
(measured: 1.3e-4 apart), well below the ~4.5e-3 those steps move a weight, so a parameter left
ungathered or unreduced by a re-composed forward would show. A resumed run at the same world size restores every shard, the
optimizer states and each rank's RNG exactly: its weights match to 1e-6."""

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, subprocess_env, tiny_recipe

pytestmark = pytest.mark.distributed

STEPS = 9


def recipe(run_dir, steps=STEPS):
    # with an EMA: model.safetensors holds the average, kept shard by shard and resumed from the checkpoints
    data = tiny_recipe(run_dir, finetune={"steps": steps, "checkpoint_every": 3, "batch_size": 4, "log_every": 1,
                                          "ema": 0.9})
    data["stages"] = data["stages"][:1]
    return data


def launch(path, *args, background=False, precision="no"):
    """``accelerate launch`` of ``biwm run`` with FSDP2 over 2 CPU processes (the shipped config file)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "examples" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision",
           precision, "--dynamo_backend", "no", "-m", "biwm.core.cli", "run", str(path), *args]
    env = subprocess_env(COLUMNS="200", OMP_NUM_THREADS="1")
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def checkpoint_losses(stage):
    """The per-step losses of the stage's last checkpoint (the global batch's mean under FSDP2)."""
    last = sorted((stage / "checkpoints").glob("step_*"))[-1]
    return json.loads((last / "state.json").read_text())["extra"]["losses"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted 2-process FSDP2 finetune of STEPS steps."""
    root = tmp_path_factory.mktemp("fsdp")
    path = root / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(root / "run")))
    out = launch(path)
    return root / "run" / "finetune", out.stdout


def test_two_processes_match_one_process(two_processes, tmp_path):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    stage, stdout = two_processes
    assert stdout.count("done:") == 1  # rank 0 alone prints, logs and writes
    # the root (patch embedding, condition embedder, scale-shift table, controls, ...) and each block
    assert "FSDP2 over 2 processes: the root and its wrapped blocks (2 WanTransformerBlock)" in stdout
    ckpt = sorted((stage / "checkpoints").glob("step_*"))[-1]
    assert ckpt.name == "step_00000006" and (ckpt / ".metadata").is_file()
    assert sorted(p.name for p in ckpt.glob("rng_*")) == ["rng_0.safetensors", "rng_1.safetensors"]
    assert not list(stage.parent.rglob(".tmp-*"))

    single = run_recipe(validate_recipe(recipe(tmp_path / "one")))["stages"]["finetune"]
    one = tmp_path / "one" / "finetune"
    assert not (one / "checkpoints" / "step_00000006" / ".metadata").exists()  # one process: as before
    torch.testing.assert_close(torch.tensor(checkpoint_losses(stage)), torch.tensor(checkpoint_losses(one)),
                               rtol=0, atol=1e-4)
    sharded = json.loads((stage / "metrics.json").read_text())
    assert sharded["finetune_steps"] == single["finetune_steps"] == STEPS
    assert sharded["finetune_loss_last"] == pytest.approx(single["finetune_loss_last"], abs=1e-4)
    a, b = load_file(str(stage / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3, msg=key)


def test_bf16_mixed_precision(two_processes, tmp_path):
    """accelerate's bf16 policy (bf16 gathers and reductions, float32 master weights; the window's camera
    poses left in float32): the float32 run's loss within 1e-2, float32 weights within 2e-2."""
    reference, _ = two_processes
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "run")))
    launch(path, precision="bf16")
    stage = tmp_path / "run" / "finetune"
    assert json.loads((stage / "metrics.json").read_text())["finetune_loss_last"] == pytest.approx(
        json.loads((reference / "metrics.json").read_text())["finetune_loss_last"], abs=1e-2)
    a, b = load_file(str(stage / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    for key in a:
        assert a[key].dtype == torch.float32, key
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-2, msg=key)


def test_kill_and_resume_two_processes(two_processes, tmp_path):
    reference, _ = two_processes
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe(tmp_path / "run", steps=400)))
    proc = launch(path, background=True)
    ckpts = tmp_path / "run" / "finetune" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob("step_*"))):
        time.sleep(0.1)
    ranks = psutil.Process(proc.pid).children(recursive=True)  # torchrun starts each rank in its own session
    for p in [psutil.Process(proc.pid), *ranks]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    saved = sorted(p.name for p in ckpts.glob("step_*"))
    assert saved, "no checkpoint before the kill"
    assert int(saved[-1].split("_")[1]) < STEPS, saved
    assert not (tmp_path / "run" / "finetune" / "DONE").exists()

    launch(path, "--resume", "--set", f"finetune.steps={STEPS}")
    stage = tmp_path / "run" / "finetune"
    assert json.loads((stage / "metrics.json").read_text())["finetune_steps"] == STEPS
    a, b = load_file(str(stage / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("family,block", [("hunyuan", "HunyuanVideo15TransformerBlock"),
                                          ("ltx", "LTX2VideoTransformerBlock")])
def test_hunyuan_and_ltx_shard_each_diffusers_block_and_match_one_process(family, block, tmp_path):
    """Their window blocks run diffusers' blocks outside ``forward`` (hunyuan re-composes each from its submodules
    in the block's ``window_forward``; ltx calls it with a stand-in audio stream): each diffusers block is still its
    own unit, gathered around what runs it, and 2 processes train as one does."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    def family_recipe(run_dir):
        data = recipe(run_dir, steps=4)
        data["model"]["backbone"] = {"name": family, "options": {"preset": "tiny", "overrides": {"num_layers": 2}}}
        return data

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(family_recipe(tmp_path / "two")))
    stdout = launch(path).stdout
    assert f"FSDP2 over 2 processes: the root and its wrapped blocks (2 {block})" in stdout
    run_recipe(validate_recipe(family_recipe(tmp_path / "one")))
    two, one = tmp_path / "two" / "finetune", tmp_path / "one" / "finetune"
    torch.testing.assert_close(torch.tensor(json.loads((two / "metrics.json").read_text())["finetune_loss_last"]),
                               torch.tensor(json.loads((one / "metrics.json").read_text())["finetune_loss_last"]),
                               rtol=0, atol=1e-4)
    a, b = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3, msg=key)


def test_packforcing_scores_history_through_the_sharded_block(tmp_path, monkeypatch):
    """packforcing picks mid blocks with a block's query/key projections (``attention_features``), outside that
    block's forward: it runs as the block's own method, which FSDP2 gathers around, so 2 processes train as one."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    from biwm.backbones.wan import WanBackbone

    def packforcing_recipe(run_dir):
        data = recipe(run_dir, steps=4)
        data["model"]["compressor"] = {"name": "packforcing", "options": {
            "sink_frames": 0, "recent_frames": 1, "block_frames": 1, "top_k": 1, "compress": [1, 1],
            "query_tokens": 8}}
        return data

    calls = []
    scored = WanBackbone.attention_features
    monkeypatch.setattr(WanBackbone, "attention_features", lambda self, *a, **k: calls.append(1) or scored(self, *a, **k))
    run_recipe(validate_recipe(packforcing_recipe(tmp_path / "one")))
    assert calls, "no window of these 4 steps had more mid blocks than it keeps: the scoring never ran"
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(packforcing_recipe(tmp_path / "two")))
    launch(path)  # the same seeded windows as the one-process run
    two, one = tmp_path / "two" / "finetune", tmp_path / "one" / "finetune"
    a, b = load_file(str(two / "model.safetensors")), load_file(str(one / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-3, msg=key)


def test_blocks_are_the_wrapped_units():
    """accelerate's TRANSFORMER_BASED_WRAP reads the model's ``_no_split_modules``: the blocks the backbone runs."""
    from conftest import world_around

    from biwm.backbones.wan import WanOptions, build_wan

    world = world_around(build_wan(WanOptions(preset="tiny", overrides={"num_layers": 2})))
    assert world._no_split_modules == ["WanTransformerBlock"]


# -- distill ------------------------------------------------------------------------------------------
# Both processes draw the global batch's noise, noise levels and exit step and keep their half, so a
# 2-process distill differs from one process by float32 rounding only: measured 2.3e-5 on the weights
# after 4 iterations (2 generator updates and their EMA), which move them by about 1e-3 from the teacher.
DISTILL_STEPS = 4


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny stage-1 model (one process) that every distill run starts from."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    root = tmp_path_factory.mktemp("teacher")
    data = tiny_recipe(root / "run", finetune={"steps": 4})
    data["stages"] = data["stages"][:1]
    run_recipe(validate_recipe(data))
    return root / "run" / "finetune" / "model.safetensors"


def distill_recipe(run_dir, teacher, critic="full", steps=DISTILL_STEPS, **extra):
    data = tiny_recipe(run_dir)
    data["stages"] = [{"stage": "distill", "steps": steps, "batch_size": 2, "history_frames": 2, "chunks": 2,
                       "chunk_frames": 2, "student_steps": 2, "generator_every": 2, "checkpoint_every": 2,
                       "critic": critic, "generator_lr": 1e-3, "critic_lr": 1e-3, "init": str(teacher), **extra}]
    return data


# the arms: the critic, and the losses (gan's head has parameters of its own, trained with the critic)
ARMS = {"full": ("full", {}), "lora": ("lora", {}),
        "gan": ("lora", {"losses": [{"name": "dmd"}, {"name": "gan", "options": {"generator_weight": 0.5,
                                                                                 "critic_weight": 0.5}},
                                    {"name": "forward-kl"}]})}


@pytest.fixture(scope="module")
def distilled_two(teacher, tmp_path_factory):
    """Uninterrupted 2-process distills of each arm: {arm: (stage folder, stdout)}."""
    out = {}
    for arm, (critic, extra) in ARMS.items():
        root = tmp_path_factory.mktemp(f"distill-{arm}")
        path = root / "r.yaml"
        path.write_text(yaml.safe_dump(distill_recipe(root / "run", teacher, critic, **extra)))
        out[arm] = (root / "run" / "distill", launch(path).stdout)
    return out


@pytest.mark.parametrize("arm", list(ARMS))
def test_distill_two_processes_match_one_process(distilled_two, teacher, tmp_path, arm):
    """Full critic, LoRA critic, and dmd + gan + forward-kl (gan's head sharded with the critic's root)."""
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    critic, extra = ARMS[arm]
    stage, stdout = distilled_two[arm]
    assert stdout.count("done:") == 1
    assert "FSDP2 over 2 processes: the root and its wrapped blocks (2 WanTransformerBlock)" in stdout
    ckpt = stage / "checkpoints" / "step_00000002"
    assert (ckpt / ".metadata").is_file() and sorted(p.name for p in ckpt.glob("rng_*")) == \
        ["rng_0.safetensors", "rng_1.safetensors"]
    single = run_recipe(validate_recipe(distill_recipe(tmp_path / "one", teacher, critic, **extra)))["stages"]["distill"]
    sharded = json.loads((stage / "metrics.json").read_text())
    assert sharded["generator_updates"] == single["generator_updates"] == 2
    for key in ("distill_generator_loss_last", "distill_critic_loss_last"):
        assert sharded[key] == pytest.approx(single[key], abs=1e-4), key
    a, b = load_file(str(stage / "model.safetensors")), load_file(str(tmp_path / "one" / "distill" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-4, msg=key)
    start = load_file(str(teacher))  # the distill trained: its EMA generator moved well beyond the tolerance
    assert max((a[k] - start[k]).abs().max().item() for k in a if k in start) > 5e-4


def test_distill_kill_and_resume_two_processes(distilled_two, teacher, tmp_path):
    reference, _ = distilled_two["full"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(distill_recipe(tmp_path / "run", teacher, steps=400)))
    proc = launch(path, background=True)
    ckpts = tmp_path / "run" / "distill" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not (ckpts.is_dir() and any(ckpts.glob("step_*"))):
        time.sleep(0.05)
    ranks = psutil.Process(proc.pid).children(recursive=True)
    for p in [psutil.Process(proc.pid), *ranks]:
        p.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)
    saved = sorted(p.name for p in ckpts.glob("step_*"))
    assert saved and int(saved[-1].split("_")[1]) < DISTILL_STEPS, saved

    launch(path, "--resume", "--set", f"distill.steps={DISTILL_STEPS}")
    stage = tmp_path / "run" / "distill"
    metrics = json.loads((stage / "metrics.json").read_text())
    assert metrics["distill_iterations"] == DISTILL_STEPS and metrics["generator_updates"] == 2
    a, b = load_file(str(stage / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:  # shards, optimizer states, EMA shards and each rank's RNG restored exactly
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
