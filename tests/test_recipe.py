"""Recipe validation: errors name the field, the bad value and what is allowed; exit code 2; nothing written."""

import subprocess

import pytest
import yaml

from conftest import ROOT, biwm_cmd, subprocess_env, tiny_recipe


def validate(data, tmp_path):
    from biwm.core.recipe import validate_recipe

    return validate_recipe(data, base_dir=tmp_path)


def errors_of(data, tmp_path) -> list[str]:
    from biwm.core.recipe import RecipeError

    with pytest.raises(RecipeError) as info:
        validate(data, tmp_path)
    return [str(e) for e in info.value.errors]


def test_valid_recipe_resolves_plugin_options(tmp_path):
    r = validate(tiny_recipe(tmp_path / "run"), tmp_path)
    assert r.stage_names() == ["finetune", "generate"]
    assert r.resolved["model.compressor"].max_frames == 4
    assert r.resolved["model.backbone"].overrides == {"num_layers": 2}


def test_misspelled_plugin_names(tmp_path):
    data = tiny_recipe(tmp_path / "run")
    data["model"]["controls"] = ["pluker"]
    data["model"]["backbone"]["name"] = "wann"
    errs = errors_of(data, tmp_path)
    assert "model.backbone.name: unknown backbone 'wann'; allowed: hunyuan, ltx, wan" in errs
    assert "model.controls[0].name: unknown control 'pluker'; allowed: actions, plucker" in errs


def test_wrong_option_types(tmp_path):
    data = tiny_recipe(tmp_path / "run")
    data["model"]["compressor"]["options"]["max_frames"] = "many"
    data["model"]["backbone"]["options"]["preset"] = "huge"
    errs = errors_of(data, tmp_path)
    frames = next(e for e in errs if e.startswith("model.compressor.options.max_frames"))
    assert "'many'" in frames and "int" in frames
    preset = next(e for e in errs if e.startswith("model.backbone.options.preset"))
    assert "'huge'" in preset and "'tiny'" in preset and "'wan2.1-t2v-1.3b'" in preset


def test_unknown_fields_stage_and_ranges(tmp_path):
    data = tiny_recipe(tmp_path / "run")
    data["stages"][0]["stepz"] = 3
    data["stages"][1]["stage"] = "generat"
    data["data"]["frames"] = 1
    errs = errors_of(data, tmp_path)
    assert any(e.startswith("stages[0].stepz: unknown field 'stepz'; allowed: stage, steps") for e in errs)
    assert any(e.startswith("stages[1]: unknown stage 'generat'; allowed: finetune, distill, generate, evaluate, export") for e in errs)
    assert any(e.startswith("data.frames:") and "(got 1)" in e and "expected int >= 2" in e and "Ge(" not in e for e in errs)


def test_missing_files_are_reported(tmp_path):
    data = tiny_recipe(tmp_path / "run")
    data["model"]["backbone"]["options"]["weights"] = "no/such/dir"
    data["stages"][0]["init"] = "missing.safetensors"
    errs = errors_of(data, tmp_path)
    assert any(e.startswith("model.backbone.options.weights:") and "directory not found" in e
               and "no/such/dir" in e for e in errs)
    assert any(e.startswith("stages[0].init:") and "file not found" in e for e in errs)


def test_weights_folder_of_the_wrong_shape(tmp_path):
    (tmp_path / "w" / "transformer").mkdir(parents=True)
    (tmp_path / "w" / "transformer" / "config.json").write_text('{"num_layers": 40, "in_channels": 48}')
    data = tiny_recipe(tmp_path / "run")
    data["model"]["backbone"]["options"] = {"preset": "wan2.1-t2v-1.3b", "weights": "w"}
    errs = errors_of(data, tmp_path)
    assert any("does not match preset 'wan2.1-t2v-1.3b'" in e and "num_layers is 40, expected 30" in e for e in errs)


def test_overrides():
    from biwm.core.recipe import RecipeError, apply_overrides

    data = {"stages": [{"stage": "finetune", "steps": 3}], "model": {"backbone": {"name": "wan"}}}
    apply_overrides(data, ["finetune.steps=7", "stages[0].lr=0.5", "model.backbone.options.preset=tiny"])
    assert data["stages"][0] == {"stage": "finetune", "steps": 7, "lr": 0.5}
    assert data["model"]["backbone"]["options"] == {"preset": "tiny"}
    with pytest.raises(RecipeError, match="no 'generate' stage"):
        apply_overrides(data, ["generate.steps=1"])
    with pytest.raises(RecipeError, match="expected key=value"):
        apply_overrides(data, ["steps"])


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["model"]["controls"].__setitem__(0, "actons"),
     "model.controls[0].name: unknown control 'actons'; allowed: actions, plucker"),
    (lambda d: d["stages"][0].__setitem__("batch_size", "eight"), "stages[0].batch_size: Input should be a valid integer"),
])
def test_cli_exit_code_2_and_nothing_written(tmp_path, mutate, expected):
    data = tiny_recipe(tmp_path / "run")
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    for command in ("validate", "run"):
        proc = subprocess.run(biwm_cmd() + [command, str(path)], capture_output=True, text=True,
                              env=subprocess_env(COLUMNS="300"))
        assert proc.returncode == 2
        assert expected in proc.stderr
    assert not (tmp_path / "run").exists()


def test_cli_missing_recipe_file(tmp_path):
    proc = subprocess.run(biwm_cmd() + ["validate", str(tmp_path / "nope.yaml")], capture_output=True, text=True,
                          env=subprocess_env(COLUMNS="300"))
    assert proc.returncode == 2 and "recipe file not found" in proc.stderr


# Recipes that start from another recipe's output: validated with that input pointed at a file that exists.
NEEDS_RUN = {"toy_lab_continue.yaml": "stages[0].init",
             "toy_lab_phase3.yaml": "stages[0].init", "toy_lab_grow.yaml": "stages[0].init",
             "toy_lab_phase4.yaml": "stages[0].init"}


def test_examples_validate():
    stand_in = ROOT / "examples/weights/wan-tiny-toyworld/diffusion_pytorch_model.safetensors"
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        extra = ["--set", f"{NEEDS_RUN[path.name]}={stand_in}"] if path.name in NEEDS_RUN else []
        proc = subprocess.run(biwm_cmd() + ["validate", str(path), *extra], capture_output=True, text=True)
        assert proc.returncode == 0, (path, proc.stderr)
