"""--resume: a killed run continues from its last checkpoint and ends where an uninterrupted run ends."""

import json
import signal
import subprocess
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import biwm_cmd, subprocess_env, tiny_recipe


def run(data, resume=False):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    return run_recipe(validate_recipe(data), resume=resume)


def test_resumed_run_matches_uninterrupted_run(tmp_path, monkeypatch):
    from biwm.core import schedule

    base = tiny_recipe(tmp_path / "a", finetune={"steps": 4, "checkpoint_every": 2})
    base["stages"] = base["stages"][:1]
    run(base)
    reference = load_file(str(tmp_path / "a" / "finetune" / "model.safetensors"))

    crashed = tiny_recipe(tmp_path / "b", finetune={"steps": 4, "checkpoint_every": 2})
    crashed["stages"] = crashed["stages"][:1]
    real_target = schedule.velocity_target
    calls = {"n": 0}

    def crash_on_third_step(x0, noise):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_target(x0, noise)

    # the finetune stage imports velocity_target when it starts, so this reaches its loop
    monkeypatch.setattr(schedule, "velocity_target", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        run(crashed)
    monkeypatch.undo()
    stage = tmp_path / "b" / "finetune"
    assert not (stage / "model.safetensors").exists() and not (stage / "DONE").exists()
    assert [p.name for p in (stage / "checkpoints").iterdir()] == ["step_00000002"]

    metrics = run(crashed, resume=True)
    assert metrics["stages"]["finetune"]["finetune_steps"] == 4
    resumed = load_file(str(stage / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=0, msg=key)


def test_kill_and_resume_cli(tmp_path):
    data = tiny_recipe(tmp_path / "run", finetune={"steps": 400, "checkpoint_every": 5})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    env = subprocess_env(COLUMNS="200")
    proc = subprocess.Popen(biwm_cmd() + ["run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)
    ckpts = tmp_path / "run" / "finetune" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpts.is_dir() and any(p.name.startswith("step_") for p in ckpts.iterdir())):
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert saved, "no checkpoint before the kill"
    last = int(saved[-1].split("_")[1])
    assert not (tmp_path / "run" / "finetune" / "DONE").exists()

    out = subprocess.run(biwm_cmd() + ["run", str(path), "--resume", "--set", "finetune.steps=" + str(last + 4)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert f"resumed finetune from step_{last:08d} (step {last})" in out.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["stages"]["finetune"]["finetune_steps"] == last + 4
    assert (tmp_path / "run" / "generate" / "trajectory_0.mp4").stat().st_size > 0
    # a second --resume skips every finished stage
    again = subprocess.run(biwm_cmd() + ["run", str(path), "--resume", "--set", "finetune.steps=" + str(last + 4)],
                           capture_output=True, text=True, env=env)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2
