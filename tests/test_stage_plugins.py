"""Stages as a plugin kind: a distribution outside the repo registers a stage and a CLI command
through its entry point, with no change to core; recipes validate and run the stage like a
built-in one."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import yaml
from rich.console import Console

from conftest import biwm_cmd, subprocess_env
from test_plugins import make_distribution

PLUGIN = """
    from pydantic import BaseModel, Field
    import typer
    from biwm.core import hookimpl

    class CountConfig(BaseModel):
        '''No `stage` field: the registry adds stage: Literal["count"].'''
        repeats: int = Field(2, ge=1)
        word: str = "tick"

    class ShoutConfig(BaseModel):
        text: str = "hi"

    def shout(ctx, cfg, stage_dir):
        return {"shout": cfg.text.upper()}

    def hello(name: str = typer.Argument(..., help="who")):
        print(f"stage plugin says hello to {name}")

    @hookimpl
    def register_stages(register):
        register("count", CountConfig, "biwm_count_runner:run", description="writes a word N times")
        register("shout", ShoutConfig, shout, description="a stage whose runner is a function")
        register("ghost", ShoutConfig, "biwm_count_missing:run", description="its runner module is missing")

    @hookimpl
    def register_commands(register):
        register("count-hello", hello, description="a command of the stage plugin")
"""
# The count stage's runner lives in its own module, imported only when the stage runs.
RUNNER = """
from pathlib import Path

def run(ctx, cfg, stage_dir):
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "count.txt").write_text(" ".join([cfg.word] * cfg.repeats))
    return {"repeats": cfg.repeats, "config": type(cfg).__name__, "context": type(ctx).__name__,
            "backbone": ctx.recipe.model.backbone.name}
"""
MODULES = ("biwm_count_plugin", "biwm_count_runner")


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    make_distribution(site, "biwm-count", "biwm_count_plugin", PLUGIN, version="1.2.3")
    (site / "biwm_count_runner.py").write_text(RUNNER)
    monkeypatch.syspath_prepend(str(site))
    yield site
    for name in MODULES:
        sys.modules.pop(name, None)


def recipe_data(run_dir, *stages) -> dict:
    return {"name": "stage-plugin", "run_dir": str(run_dir),
            "model": {"backbone": {"name": "wan", "options": {"preset": "tiny"}}},
            "stages": list(stages)}


def recipe_errors(data: dict) -> list[str]:
    from biwm.core.recipe import RecipeError, validate_recipe

    with pytest.raises(RecipeError) as info:
        validate_recipe(data)
    return [str(e) for e in info.value.errors]


def test_a_distribution_adds_a_stage_that_validates_and_runs(site, tmp_path):
    from biwm.core.plugins import get_plugin_manager
    from biwm.core.recipe import apply_overrides, validate_recipe
    from biwm.core.runner import run_recipe

    spec = get_plugin_manager().get("stage", "count")
    assert (spec.plugin, spec.distribution, spec.version) == ("biwm_count_plugin", "biwm-count", "1.2.3")
    assert spec.factory == "biwm_count_runner:run" and "biwm_count_runner" not in sys.modules

    data = apply_overrides(recipe_data(tmp_path / "run", {"stage": "count", "repeats": "3"}, {"stage": "shout"}),
                           ["count.word=tock", "shout.text=ok"])
    recipe = validate_recipe(data)
    assert isinstance(recipe.stages[0], sys.modules["biwm_count_plugin"].CountConfig)
    assert (recipe.stages[0].stage, recipe.stages[0].repeats, recipe.stages[0].word) == ("count", 3, "tock")
    assert "biwm_count_runner" not in sys.modules  # validating a stage imports no runner

    metrics = run_recipe(recipe, console=Console(file=io.StringIO()))
    assert metrics["stages"] == {"count": {"repeats": 3, "config": "CountConfig", "context": "RunContext",
                                           "backbone": "wan"},
                                 "shout": {"shout": "OK"}}
    run_dir = tmp_path / "run"
    assert (run_dir / "count" / "count.txt").read_text() == "tock tock tock"
    assert (run_dir / "count" / "DONE").is_file() and (run_dir / "shout" / "DONE").is_file()
    snapshot = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert snapshot["stages"][0] == {"stage": "count", "repeats": 3, "word": "tock"}
    assert validate_recipe(snapshot).stages[0].repeats == 3  # the snapshot reads back


def test_a_plugin_stage_config_error_names_the_field(site, tmp_path):
    errors = recipe_errors(recipe_data(tmp_path / "run", {"stage": "count", "repeat": 3},
                                       {"stage": "count", "repeats": 0}, {"stage": "cuont"}))
    assert "stages[0].repeat: unknown field 'repeat'; allowed: repeats, word, stage" in errors
    assert any(e.startswith("stages[1].repeats: Input should be greater than or equal to 1 (got 0); expected int")
               for e in errors), errors
    assert any(e.startswith("stages[2]: unknown stage 'cuont'; allowed: ") and "count, shout" in e
               and "finetune, distill, generate, evaluate, export" in e for e in errors), errors


def test_a_stage_whose_runner_cannot_be_imported_is_a_run_error(site, tmp_path):
    from biwm.core.recipe import validate_recipe
    from biwm.core.runner import RunError, run_recipe

    recipe = validate_recipe(recipe_data(tmp_path / "run", {"stage": "shout"}, {"stage": "ghost"}))
    with pytest.raises(RunError, match=r"stage ghost: stage 'ghost' of plugin 'biwm_count_plugin': cannot import "
                                       r"'biwm_count_missing:run' \(ModuleNotFoundError"):
        run_recipe(recipe, console=Console(file=io.StringIO()))
    assert (tmp_path / "run" / "shout" / "DONE").is_file()  # the stage before it ran


BAD_STAGES = """
    from typing import Literal
    from pydantic import BaseModel
    from biwm.core import hookimpl

    class Mislabelled(BaseModel):
        stage: Literal["other"] = "other"

    @hookimpl
    def register_stages(register):
        register("mislabelled", Mislabelled, "biwm_bad_stages:run")
"""
BAD_RUNNER = BAD_STAGES.replace('Mislabelled, "biwm_bad_stages:run"', 'BaseModel, "not a module path"') \
    .replace('"mislabelled"', '"unrunnable"')


@pytest.mark.parametrize("body, problem", [(BAD_STAGES, "Mislabelled.stage must be Literal['mislabelled']"),
                                           (BAD_RUNNER, "neither callable nor a 'module:function' string")])
def test_a_stage_that_cannot_register_marks_its_plugin_broken(tmp_path, monkeypatch, body, problem):
    from biwm.core.plugins import get_plugin_manager

    make_distribution(tmp_path, "biwm-bad-stages", "biwm_bad_stages", body)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        pm = get_plugin_manager()
        assert "finetune" in pm.registry("stage") and not {"mislabelled", "unrunnable"} & set(pm.registry("stage"))
        status = next(s for s in pm.statuses() if s.name == "biwm_bad_stages")
        assert status.status == "broken" and problem in status.error, status.error
    finally:
        sys.modules.pop("biwm_bad_stages", None)


def test_cli_runs_a_plugin_stage_and_command(site, tmp_path):
    env = subprocess_env(PYTHONPATH=str(site), COLUMNS="200")

    def cli(*args):
        return subprocess.run(biwm_cmd() + list(args), capture_output=True, text=True, env=env, cwd=tmp_path)

    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(recipe_data(tmp_path / "run", {"stage": "count", "repeats": 2})))
    bad.write_text(yaml.safe_dump(recipe_data(tmp_path / "run", {"stage": "count", "repeats": -1, "wrod": "x"})))
    out = cli("run", str(good), "--set", "count.word=tack")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "count" / "count.txt").read_text() == "tack tack"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stages"]["count"]["repeats"] == 2
    out = cli("validate", str(bad))
    assert out.returncode == 2
    assert "stages[0].repeats: Input should be greater than or equal to 1 (got -1)" in out.stderr
    assert "stages[0].wrod: unknown field 'wrod'; allowed: repeats, word, stage" in out.stderr
    out = cli("count-hello", "world")
    assert out.returncode == 0 and out.stdout.strip() == "stage plugin says hello to world", out.stderr[-2000:]
    rows = json.loads(cli("list-plugins", "--json").stdout)
    assert {"kind": "stage", "name": "count", "distribution": "biwm-count", "version": "1.2.3",
            "description": "writes a word N times"}.items() <= next(r for r in rows if r["name"] == "count").items()
    assert {("stage", n) for n in ("finetune", "distill", "generate", "evaluate", "export")} <= \
        {(r["kind"], r["name"]) for r in rows if r["plugin"] == "core"}
