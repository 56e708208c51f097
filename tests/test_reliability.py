"""Issue 23: runs cannot delete, mix or misreport data; NaN guards; corrupt files named; the
recipe loader answers every input with exit 0 or a one-line exit-2 message."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import biwm_cmd, subprocess_env, tiny_recipe
from test_defects import QUICKSTART, cli, one_stage, run


def recipe_errors(data) -> str:
    from biwm.core.recipe import RecipeError, validate_recipe

    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    return str(info.value)


def flip_a_byte(path, offset_from_end=100):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(raw))


# ---------------------------------------------------------------- 1: export stays in its stage folder
@pytest.mark.parametrize("folder", ["..", "/tmp/elsewhere", "../finetune", "a/b", "", ".", "checkpoints"])
def test_export_folder_outside_the_stage_folder_is_a_validate_error(tmp_path, folder):
    data = one_stage(tmp_path / "run")
    data["stages"].append({"stage": "export", "folder": folder})
    assert "stages[1].folder:" in recipe_errors(data) and "not a plain folder name" in recipe_errors(data)


# ---------------------------------------------------------------- 2: non-finite frames never score
def test_finite_mean_refuses_nan_and_keeps_identical_frames_infinite():
    from biwm.core.metrics import finite_mean

    assert finite_mean(torch.tensor([10.0, float("inf")])) == 10.0
    assert finite_mean(torch.tensor([float("inf")])) == float("inf")  # identical frames
    for bad in (float("nan"), float("-inf")):
        with pytest.raises(FloatingPointError, match="NaN or -inf"):
            finite_mean(torch.tensor([bad, bad]))


def test_non_finite_frames_fail_the_stage_naming_the_model(tmp_path):
    from biwm.core.runner import RunError

    data = one_stage(tmp_path / "a")
    run(data)
    weights = load_file(str(tmp_path / "a" / "finetune" / "model.safetensors"))
    nan_model = tmp_path / "nan.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if k.startswith("transformer.proj_out") else v
               for k, v in weights.items()}, str(nan_model))
    data = tiny_recipe(tmp_path / "b", generate={"init": str(nan_model), "write_videos": False, "chunks": 1})
    data["stages"] = data["stages"][1:]
    with pytest.raises(RunError, match=rf"stage generate \(model {nan_model}\): .*NaN or inf frames"):
        run(data)
    assert not (tmp_path / "b" / "generate" / "DONE").exists()
    assert not (tmp_path / "b" / "metrics.json").exists()


# ---------------------------------------------------------------- 3, 8: checkpoints of this run only, checked
def _save(folder, step, value, run_id):
    from biwm.core.checkpoint import current_run_id, save_checkpoint

    token = current_run_id.set(run_id)
    try:
        return save_checkpoint(folder, step, {"m": _linear(value)}, {}, {})
    finally:
        current_run_id.reset(token)


def _linear(value):
    m = torch.nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(value)
        m.bias.fill_(value)
    return m


def test_checkpoints_of_another_run_are_neither_pruned_into_nor_resumed(tmp_path):
    from biwm.core.checkpoint import current_run_id, list_checkpoints

    _save(tmp_path, 20, 2.0, "old")
    _save(tmp_path, 30, 3.0, "old")
    _save(tmp_path, 10, 1.0, "new")  # the old run's higher steps must not prune it away
    assert (tmp_path / "step_00000010").is_dir()
    token = current_run_id.set("new")
    try:
        with pytest.warns(UserWarning, match="ignoring 2 checkpoint"):
            assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000010"]
    finally:
        current_run_id.reset(token)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, monkeypatch):
    """A run stopped mid-training (as by kill -9) with a write left half-done, then a bit flip in the
    newest checkpoint: --resume continues from the one before, says so, and removes the leftovers."""
    from biwm.core import schedule

    data = one_stage(tmp_path / "run", steps=4)
    real_target = schedule.velocity_target
    calls = {"n": 0}

    def stop_on_fourth_step(x0, noise):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real_target(x0, noise)

    monkeypatch.setattr(schedule, "velocity_target", stop_on_fourth_step)
    with pytest.raises(KeyboardInterrupt):
        run(data)
    monkeypatch.undo()
    ckpts = tmp_path / "run" / "finetune" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002", "step_00000003"]
    half_written = ckpts / ".tmp-killed"  # what a kill during save_checkpoint leaves
    half_written.mkdir()
    (half_written / "model.safetensors").write_bytes(b"\0" * 10)
    stray = tmp_path / "run" / ".metrics.json.tmp-abc123.json"
    stray.write_text("{")
    flip_a_byte(ckpts / "step_00000003" / "model.safetensors")

    from rich.console import Console

    console = Console(record=True, width=200)
    with pytest.warns(UserWarning, match=r"step_00000003 is damaged and skipped: .*corrupt.*falling back to "
                                         r"step_00000002"):
        metrics = run(data, resume=True, console=console)
    out = console.export_text()
    assert "resumed finetune from step_00000002 (step 2)" in out
    assert "left by an interrupted write" in out and not half_written.exists() and not stray.exists()
    assert metrics["stages"]["finetune"]["finetune_steps"] == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "text"])
def test_damaged_model_files_are_named(tmp_path, damage):
    from biwm.core.checkpoint import CorruptFileError, load_tensors, save_weights

    path = tmp_path / "model.safetensors"
    save_weights(path, {"m": _linear(0.5)})
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "flip":
        flip_a_byte(path, 3)
    else:
        path.write_text("not safetensors")
    with pytest.raises(CorruptFileError, match=str(path)):
        load_tensors(path)
    data = tiny_recipe(tmp_path / "run", generate={"init": str(path)})
    if damage != "flip":  # the header is checked at validation; the bytes when the model loads
        assert f"stages[1].init: {path}: not a readable model file" in recipe_errors(data)


def test_damaged_data_cache_is_rendered_again(tmp_path):
    data = one_stage(tmp_path / "run", steps=1)
    run(data)
    cache = next((tmp_path / "run" / "cache").glob("*.safetensors"))
    flip_a_byte(cache, 50)
    from rich.console import Console

    console = Console(record=True, width=300)
    run(data, force=True, console=console)
    assert f"{cache}: data cache file is corrupt" in console.export_text()
    load_file(str(cache))


# ---------------------------------------------------------------- 4: one run per folder
def test_a_second_run_on_a_locked_folder_exits_2(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(one_stage(tmp_path / "run", steps=400, checkpoint_every=1000)))
    first = subprocess.Popen(biwm_cmd() + ["run", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=subprocess_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "recipe.yaml").is_file():
            time.sleep(0.1)
        second = cli("run", str(path), "--force")
        assert second.exit_code == 2
        assert "is in use by another biwm run" in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_temporary_names_are_unique(tmp_path):
    from biwm.core.checkpoint import atomic_path

    with atomic_path(tmp_path / "x.json") as a, atomic_path(tmp_path / "x.json") as b:
        assert a != b and a.suffix == b.suffix == ".json"
        a.write_text("1")
        b.write_text("2")
    assert (tmp_path / "x.json").read_text() == "1" and list(tmp_path.iterdir()) == [tmp_path / "x.json"]


# ---------------------------------------------------------------- 5: NaN is never saved as success
def test_diverged_weights_are_not_saved(tmp_path, monkeypatch):
    """The last update is followed by no loss that would show NaN: the save itself refuses."""
    from biwm.core.checkpoint import save_weights
    from biwm.core.runner import RunError

    with pytest.raises(FloatingPointError, match="NaN or inf"):
        save_weights(tmp_path / "m.safetensors", {"m": _linear(float("nan"))})
    assert list(tmp_path.iterdir()) == []

    real_step = torch.optim.AdamW.step

    def diverging_step(self, *args, **kwargs):  # the update of the last step overflows
        out = real_step(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", diverging_step)
    with pytest.raises(RunError, match=r"stage finetune: finetune weights hold NaN or inf after step 1; "
                                        r"check stages.finetune lr: "):
        run(one_stage(tmp_path / "run", steps=1))
    stage = tmp_path / "run" / "finetune"
    assert not (stage / "DONE").exists() and not (stage / "model.safetensors").exists()


def test_dmd_direction_does_not_mask_nan():
    from biwm.core.dmd import dmd_direction

    x = torch.zeros(2, 3)
    real = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 1.0, 1.0]])
    direction = dmd_direction(x, real, torch.ones(2, 3))
    assert torch.isfinite(direction[0]).all() and torch.isnan(direction[1]).all()
    assert torch.equal(dmd_direction(x, x, x), torch.zeros(2, 3))  # x at the teacher's prediction: no push


def test_distill_divergence_blames_the_setting_that_is_off():
    from biwm.core.stages.distill import DistillConfig, _finite

    with pytest.raises(FloatingPointError, match=r"teacher_cfg: 1e\+06"):
        _finite(float("nan"), "generator", 3, DistillConfig(teacher_cfg=1e6))
    with pytest.raises(FloatingPointError, match=r"critic_lr: 0.5 \(usually"):
        _finite(float("inf"), "critic", 3, DistillConfig(critic_lr=0.5))


# ---------------------------------------------------------------- 9: distill metadata is checked
@pytest.mark.parametrize("meta, problem", [
    ({"student_steps": "abc"}, "student_steps"), ({"student_steps": "0"}, "student_steps"),
    ({"student_steps": "-3"}, "student_steps"), ({"student_steps": "1000000000"}, "student_steps"),
    ({"student_shift": "nan"}, "student_shift"), ({"teacher": "/etc/passwd"}, "teacher model file"),
])
def test_distill_metadata_is_validated(tmp_path, meta, problem):
    from biwm.core.checkpoint import CorruptFileError
    from biwm.core.stages.common import model_metadata

    path = tmp_path / "student.safetensors"
    save_file({"x": torch.zeros(1)}, str(path),
              metadata={"stage": "distill", "student_steps": "4", "student_shift": "5.0", "teacher": "", **meta})
    with pytest.raises(CorruptFileError, match=str(path) if problem != "teacher model file" else "/etc/passwd") as info:
        model_metadata(path)
    assert problem in str(info.value)


def test_a_student_moved_without_its_teacher_still_reads(tmp_path):
    """A student copied away from its teacher keeps its sampler; the teacher path resolves (for a
    comparison, which then reports it missing) instead of stopping every command that reads it."""
    from biwm.core.stages.common import model_metadata

    path = tmp_path / "moved" / "student.safetensors"
    path.parent.mkdir()
    save_file({"x": torch.zeros(1)}, str(path),
              metadata={"stage": "distill", "student_steps": "4", "student_shift": "2.0",
                        "teacher": "../teacher/model.safetensors"})
    meta = model_metadata(path)
    assert meta["student_shift"] == "2.0"
    assert meta["teacher"] == str(tmp_path / "teacher" / "model.safetensors")


# ---------------------------------------------------------------- 10: values that fail at run time
@pytest.mark.parametrize("override, field", [
    ("seed=18446744073709551616", "seed:"), ("distill.betas=[2.0, 0.999]", "stages[1]: betas[0]: 2.0"),
    ("finetune.lr=1e39", "stages[0].lr:"), ("data.frames=1180591620717411303424", "data.frames:"),
    ("run_dir=''", "run_dir: run_dir is empty"), ("resolved={}", "resolved: unknown field"),
    ("evaluate.cfg_scale=.inf", "stages[3].cfg_scale:"),
])
def test_validate_rejects_what_fails_at_run_time(override, field):
    result = cli("validate", QUICKSTART, "--set", override)
    assert result.exit_code == 2, result.stdout
    assert field in result.stderr


# ---------------------------------------------------------------- 7: hostile recipe files
@pytest.mark.parametrize("content, message", [
    (b"seed: " + b"9" * 5000 + b"\n", "invalid YAML"),
    (b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", "nested deeper than"),
    (b"\x00\x01\x02\xff\xfe", "not UTF-8"),
    ("name: x\n".encode("utf-16"), "not UTF-8"),
    (b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n".encode()
        for i in range(9)) + b"model: *j\n", "aliases"),
    (b"x" * (2 << 20), "bytes; a recipe is a YAML file of at most"),
])
def test_hostile_recipe_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    started = time.time()
    result = cli("validate", str(path))
    assert time.time() - started < 10
    assert result.exit_code == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and len(result.stderr) < 500 and "Traceback" not in result.stdout


# ---------------------------------------------------------------- 12: one permission rule
def test_outputs_share_one_permission_rule(tmp_path):
    run(one_stage(tmp_path / "run", steps=2))
    umask = os.umask(0)
    os.umask(umask)
    files = [tmp_path / "run" / "metrics.json", tmp_path / "run" / "recipe.yaml",
             tmp_path / "run" / "finetune" / "model.safetensors"]
    files += list((tmp_path / "run" / "finetune" / "checkpoints").rglob("*.safetensors"))
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o666 & ~umask)}
    folders = list((tmp_path / "run" / "finetune" / "checkpoints").iterdir())
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {oct(0o777 & ~umask)}


def test_the_cli_keeps_optional_backends_import_notes_quiet():
    """With torchao installed (setup installs it), importing diffusers logs torchao's unloadable CUDA
    kernel libraries and diffusers' torchao note; biwm's CLI keeps those out of a user's terminal."""
    pytest.importorskip("torchao")
    code = ("from biwm.core.cli import quiet_optional_backends; quiet_optional_backends(); "
            "import diffusers.quantizers.torchao.torchao_quantizer; from diffusers import WanTransformer3DModel")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Failed to load" not in proc.stderr and "Unable to import" not in proc.stderr, proc.stderr[-2000:]
