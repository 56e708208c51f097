"""Issue 14: defects a new user hits. Each test fails on the code before the fix: silent results
now error or are printed, crashes are exit-2 messages naming the field or file."""

import json
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, biwm_cmd, subprocess_env, tiny_recipe
from test_plugins import make_distribution

QUICKSTART = str(ROOT / "examples" / "quickstart.yaml")


def cli(*args: str, env: dict | None = None):
    from biwm.core.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def lines_of(result) -> str:
    return result.stderr + result.stdout


def run(data, **kwargs):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import run_recipe

    return run_recipe(validate_recipe(data), **kwargs)


def one_stage(run_dir, **finetune):
    data = tiny_recipe(run_dir, finetune={"steps": 2, "checkpoint_every": 1, **finetune})
    data["stages"] = data["stages"][:1]
    return data


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---------------------------------------------------------------- 1, 9: weights folders and frame sizes
def wan_folder(root, config: dict, parts=(), weights_file=False):
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(config))
    if weights_file:
        (root / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    for part in parts:
        (root / part).mkdir()
        (root / part / "config.json").write_text("{}")
        if part == "vae":
            (root / part / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    return root


def test_real_preset_without_vae_is_a_validate_error_naming_vae(tmp_path):
    from biwm.backbones.wan import PRESETS

    folder = wan_folder(tmp_path / "w", PRESETS["wan2.1-t2v-1.3b"]["transformer"], weights_file=True)
    result = cli("validate", QUICKSTART, "--set", "model.backbone.options.preset=wan2.1-t2v-1.3b",
                 "--set", "model.backbone.options.overrides={}",  # the quickstart's 12 toy blocks
                 "--set", f"model.backbone.options.weights={folder}")
    assert result.exit_code == 2, lines_of(result)
    assert "vae/" in result.stderr and "text_encoder/" in result.stderr and "random_init" in result.stderr
    # random parts come only when asked for, and the backbone names them (the runner prints them)
    from biwm.backbones.wan import WanOptions

    options = WanOptions(preset="wan2.1-t2v-1.3b", weights=folder, random_init=True)
    assert options.missing_parts() == ["vae", "text_encoder", "tokenizer"]


def test_weights_folder_without_weights_file_is_a_validate_error(tmp_path):
    from biwm.backbones.wan import PRESETS

    folder = wan_folder(tmp_path / "w", PRESETS["wan2.1-t2v-1.3b"]["transformer"],
                        parts=("vae", "text_encoder", "tokenizer"))
    (folder / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"")
    result = cli("validate", QUICKSTART, "--set", "model.backbone.options.preset=wan2.1-t2v-1.3b",
                 "--set", "model.backbone.options.overrides={}",  # the quickstart's 12 toy blocks
                 "--set", f"model.backbone.options.weights={folder}")
    assert result.exit_code == 2, lines_of(result)
    assert "model.backbone.options" in result.stderr and "no weights file" in result.stderr
    assert "only safetensors" in result.stderr
    assert "Traceback" not in lines_of(result)


@pytest.mark.parametrize("height", [30, 34])
def test_frame_size_the_codec_cannot_take_is_a_validate_error(height):  # the quickstart's toy preset: 4-pixel tokens
    result = cli("validate", QUICKSTART, "--set", f"data.toyworld.height={height}")
    assert result.exit_code == 2
    assert f"data.toyworld.height: {height} is not a multiple of 4" in result.stderr


# ---------------------------------------------------------------- 2: export keeps the BiWM parts
def test_export_writes_the_controls_and_compressor_and_says_so(tmp_path):
    from safetensors.torch import load_file

    data = one_stage(tmp_path / "run")
    data["stages"].append({"stage": "export"})
    metrics = run(data)["stages"]["export"]
    stage = tmp_path / "run" / "export"
    assert (stage / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    parts = load_file(str(stage / "biwm_parts.safetensors"))
    trained = load_file(str(tmp_path / "run" / "finetune" / "model.safetensors"))
    controls = [k for k in trained if k.startswith("controls.")]
    assert controls and set(parts) == {k for k in trained if not k.startswith("transformer.")}
    for key in parts:
        assert parts[key].equal(trained[key])
    assert metrics["left_out_of_diffusers_folder"] == ["controls (actions, plucker)", "compressor (none)"]
    from biwm.core.stages.common import read_card

    card = __import__("json").loads((stage / "biwm_card.json").read_text())
    assert card["export"] == {"transformer": "transformer", "parts": "biwm_parts.safetensors",
                              "source": str(tmp_path / "run" / "finetune" / "model.safetensors")}
    assert {k: card[k] for k in ("model", "data")} == \
        {k: read_card(tmp_path / "run" / "finetune" / "model.safetensors")[k] for k in ("model", "data")}
    assert card["model"]["controls"] and metrics["card"] == str(stage / "biwm_card.json")


# ---------------------------------------------------------------- 3: --resume and re-runs
def test_resume_with_changed_finished_stage_is_an_error_unless_force(tmp_path):
    from biwm.core.runner import RunError

    data = one_stage(tmp_path / "run")
    run(data)
    recorded = (tmp_path / "run" / "recipe.yaml").read_text()
    changed = one_stage(tmp_path / "run", lr=5e-4)
    with pytest.raises(RunError, match=r"stage finetune finished with other settings \(stages\[0\]\.lr: 0.001 -> "
                                       r"0.0005\); pass --force"):
        run(changed, resume=True)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == recorded  # nothing rewritten
    run(changed, resume=True, force=True)
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["stages"][0]["lr"] == 5e-4
    assert yaml.safe_load((tmp_path / "run" / "finetune" / "stage.yaml").read_text())["lr"] == 5e-4


def test_rerun_without_resume_needs_force_and_resume_needs_a_run(tmp_path):
    path = write(tmp_path / "r.yaml", one_stage(tmp_path / "run"))
    assert cli("run", path).exit_code == 0
    model = (tmp_path / "run" / "finetune" / "model.safetensors").read_bytes()
    again = cli("run", path)
    assert again.exit_code == 2 and "already holds a run (finished: finetune)" in again.stderr
    assert "--resume" in again.stderr and "--force" in again.stderr
    assert (tmp_path / "run" / "finetune" / "model.safetensors").read_bytes() == model
    forced = cli("run", path, "--force")
    assert forced.exit_code == 0 and "replacing the run" in forced.stdout
    ghost = cli("run", path, "--resume", "--set", f"run_dir={tmp_path / 'ghost'}")
    assert ghost.exit_code == 2 and "holds no run to resume" in ghost.stderr
    assert not (tmp_path / "ghost").exists()


def test_resume_shows_as_a_flag_in_help():
    line = next(line for line in cli("run", "--help").stdout.splitlines() if "--resume" in line)
    assert "<bool>" not in line and "BOOLEAN" not in line


# ---------------------------------------------------------------- 4: metrics by stage
def test_run_metrics_keep_stages_apart(tmp_path):
    data = tiny_recipe(tmp_path / "run", finetune={"steps": 1}, generate={"write_videos": False})
    data["stages"].append({"stage": "generate", "trajectories": 2, "history_frames": 2, "chunks": 1,
                           "chunk_frames": 2, "steps": 1, "write_videos": False})
    path = write(tmp_path / "r.yaml", data)
    result = cli("run", path)
    assert result.exit_code == 0, lines_of(result)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics) == {"stages"}
    assert metrics["stages"]["generate"]["chunks"] == 2 and metrics["stages"]["generate2"]["chunks"] == 1
    assert "generate: psnr_correct_actions=" in result.stdout and "generate2: psnr_correct_actions=" in result.stdout


# ---------------------------------------------------------------- 5: key strings
@pytest.mark.parametrize("keys, frames", [("w*40,a*40", 80), ("w*2", 2)])
def test_key_string_of_the_wrong_length_is_an_error(tmp_path, keys, frames):
    from biwm.core.recipe import RecipeError, validate_recipe

    data = tiny_recipe(tmp_path / "run", generate={"keys": keys})
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    assert f"stages[1]: keys: {keys!r} gives {frames} frames, but the rollout generates 4" in str(info.value)
    data["stages"][1]["keys"] = "w*2,j*2"
    validate_recipe(data)


# ---------------------------------------------------------------- 6, 7, 15: plugins
PLAIN = """
    from pydantic import BaseModel
    from torch import nn
    from biwm.core import hookimpl

    class Opts(BaseModel):  # a plain BaseModel, as in the README's example: no extra="forbid"
        pool: int = 2

    class Comp(nn.Module):
        def __init__(self, options, backbone=None):
            super().__init__()

    @hookimpl
    def register_compressors(register):
        register("mycomp", Comp, options=Opts, description="third-party compressor")
"""
MISSING_DEP = """
    import biwm_no_such_dependency
"""
NOT_A_MODULE = """
    from pydantic import BaseModel
    from biwm.core import hookimpl

    class Opts(BaseModel):
        pass

    class Plain:
        def __init__(self, options, backbone=None):
            pass

    @hookimpl
    def register_compressors(register):
        register("plaincomp", Plain, options=Opts, description="not an nn.Module")
"""
BAD_FACTORY = """
    from pydantic import BaseModel
    from biwm.core import hookimpl

    class Opts(BaseModel):
        pass

    def make(options):  # controls are called as factory(options, backbone=...)
        return None

    @hookimpl
    def register_controls(register):
        register("nobackbone", make, options=Opts, description="wrong signature")
"""


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "biwm-mycomp", "biwm_mycomp_plugin", PLAIN)
    make_distribution(site, "biwm-needy", "biwm_needy_plugin", MISSING_DEP, version="1.2.3")
    make_distribution(site, "biwm-plaincomp", "biwm_plaincomp_plugin", NOT_A_MODULE)
    make_distribution(site, "biwm-nobackbone", "biwm_nobackbone_plugin", BAD_FACTORY)
    monkeypatch.syspath_prepend(str(site))
    return site


def test_plain_basemodel_options_reject_a_misspelled_option(plugins, tmp_path):
    from biwm.core.recipe import RecipeError, validate_recipe

    data = tiny_recipe(tmp_path / "run")
    data["model"]["compressor"] = {"name": "mycomp", "options": {"polo": 4}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    assert "model.compressor.options.polo: unknown field 'polo'; allowed: pool" in str(info.value)
    data["model"]["compressor"]["options"] = {"pool": 4}
    assert validate_recipe(data).resolved["model.compressor"].pool == 4


def test_recipe_naming_a_broken_plugin_gives_its_import_error(plugins, tmp_path):
    from biwm.core.recipe import RecipeError, validate_recipe

    data = tiny_recipe(tmp_path / "run")
    data["model"]["compressor"] = "needy"
    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    message = str(info.value)
    assert "unknown compressor 'needy'" in message
    assert "biwm_needy_plugin (biwm-needy 1.2.3)" in message and "biwm_no_such_dependency" in message


def test_registration_checks_compressor_module_and_factory_signature(plugins):
    from biwm.core.plugins import get_plugin_manager

    statuses = {s.name: s for s in get_plugin_manager().statuses()}
    assert statuses["biwm_plaincomp_plugin"].status == "broken"
    assert "not a torch.nn.Module" in statuses["biwm_plaincomp_plugin"].error
    assert statuses["biwm_nobackbone_plugin"].status == "broken"
    assert "factory(options, backbone=...)" in statuses["biwm_nobackbone_plugin"].error
    assert statuses["biwm_mycomp_plugin"].status == "ok"


# ---------------------------------------------------------------- 8: --set into shorthand entries
def test_set_into_a_shorthand_list_entry():
    ok = cli("validate", QUICKSTART, "--set", "model.controls[1].options.hidden=32")
    assert ok.exit_code == 0, lines_of(ok)
    bad = cli("validate", QUICKSTART, "--set", "model.controls[1].options.hiddn=32")
    assert bad.exit_code == 2 and "Traceback" not in lines_of(bad)
    assert "model.controls[1].options.hiddn: unknown field 'hiddn'; allowed: hidden" in bad.stderr
    deep = cli("validate", QUICKSTART, "--set", "model.controls[1].name.x=1")
    assert deep.exit_code == 2 and "which has no fields" in deep.stderr


# ---------------------------------------------------------------- 10: BIWM_DISABLE_PLUGINS
def test_disable_plugins_takes_plugin_names_and_warns_on_unknown(tmp_path):
    data = tiny_recipe(tmp_path / "run")
    data["model"]["compressor"] = "framepack"
    path = write(tmp_path / "r.yaml", data)
    result = cli("validate", path, env={"BIWM_DISABLE_PLUGINS": "framepack,nosuchplugin"})
    assert result.exit_code == 2
    assert "unknown compressor 'framepack'" in result.stderr and "disabled by BIWM_DISABLE_PLUGINS" in result.stderr
    assert "'nosuchplugin' is neither a plugin module nor a plugin" in result.stderr
    listed = cli("list-plugins", "--json", env={"BIWM_DISABLE_PLUGINS": "framepack"})
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["framepack"]["status"] == "disabled" and rows["packforcing"]["status"] == "ok"


# ---------------------------------------------------------------- 11: errors name the file
def test_yaml_and_set_errors_name_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    result = cli("validate", str(path))
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {path}: invalid YAML at line 3")
    assert "<unicode string>" not in result.stderr
    result = cli("validate", QUICKSTART, "--set", "finetune.stepz=1")
    assert result.exit_code == 2 and f"{QUICKSTART}: stages[0].stepz: unknown field" in result.stderr


# ---------------------------------------------------------------- 13: toy data defaults
def test_toyworld_data_defaults_to_the_recipes_size(tmp_path):
    from safetensors import safe_open

    # biwm data is biwm-toyworld's command group, added by the real entry point (main), not the bare app
    result = subprocess.run(biwm_cmd() + ["data", "toyworld", "--out", str(tmp_path / "d"), "--clips", "1",
                                          "--frames", "2"], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stdout + result.stderr
    with safe_open(str(tmp_path / "d" / "clips.safetensors"), "pt") as f:
        frames = f.get_tensor(next(k for k in f.keys() if "frame" in k))
    assert tuple(frames.shape[-2:]) == (32, 32)


# ---------------------------------------------------------------- 14: report.md carries the teacher
def test_report_shows_the_distilled_generator_beside_its_teacher(tmp_path):
    from biwm.core.report import write_report

    metrics = {"chunks": 2, "psnr": 20.0, "psnr_per_chunk": [21.0, 19.0], "sampler": "distilled generator, 2 steps",
               "teacher_sampler": "50 Euler steps, CFG 3", "student_psnr": 20.0, "teacher_psnr": 22.5,
               "teacher_psnr_per_chunk": [23.0, 22.0], "student_idm_accuracy": 0.5, "teacher_idm_accuracy": 0.75,
               "student_nfe_per_chunk": 2, "teacher_nfe_per_chunk": 100}
    write_report(tmp_path, metrics, "eval")
    report = (tmp_path / "report.md").read_text()
    assert "## Distilled generator vs its teacher" in report
    assert "| PSNR vs the true continuation (dB) (`student_psnr`, `teacher_psnr`) | 20.00 | 22.50 |" in report
    assert "| network evaluations per chunk (`student_nfe_per_chunk`, `teacher_nfe_per_chunk`) | 2 | 100 |" in report
    assert (tmp_path / "drift.png").stat().st_size > 0


# ---------------------------------------------------------------- 12: --log-with tensorboard
def test_log_with_tensorboard_is_an_option_and_says_what_it_needs(tmp_path, monkeypatch):
    import importlib.util

    assert "--log-with" in cli("run", "--help").stdout
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",  # as on a machine without tensorboard
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    result = cli("run", QUICKSTART, "--log-with", "tensorboard", "--set", f"run_dir={tmp_path / 'run'}")
    assert result.exit_code == 2 and "pip install 'biwm-core[tensorboard]'" in result.stderr
    assert not (tmp_path / "run").exists()


def test_log_with_tensorboard_records_losses_grad_norms_and_the_sample_strip(tmp_path):
    pytest.importorskip("tensorboard")  # a test extra: biwm-core[test]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stages = ("stages=[{stage: finetune, steps: 4, batch_size: 2, log_every: 2}, {stage: evaluate, trajectories: 2, "
              "chunks: 1, steps: 2, dynamics_scenes: 0, shuffled_baseline: false}]")
    result = cli("run", QUICKSTART, "--log-with", "tensorboard", "--set", f"run_dir={tmp_path / 'run'}",
                 "--set", "data.train_clips=4", "--set", stages)
    assert result.exit_code == 0, result.output[-2000:]
    logs = list((tmp_path / "run" / "logs").glob("*/events.out.tfevents.*"))
    assert len(logs) == 1
    events = EventAccumulator(str(logs[0].parent), size_guidance={"images": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    for tag in ("finetune/loss", "finetune/lr", "finetune/grad_norm", "evaluate/psnr", "evaluate/idm_accuracy"):
        assert tag in scalars
    assert [e.step for e in events.Scalars("finetune/loss")] == [2, 4]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]
    assert events.Scalars("evaluate/psnr")[0].value == pytest.approx(metrics["evaluate"]["psnr"], rel=1e-5)
    assert events.Tags()["images"] == ["evaluate/samples"]
