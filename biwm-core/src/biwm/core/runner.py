"""Runs a validated recipe: one folder per stage under ``run_dir``, each with its checkpoint,
a recipe snapshot and metrics.json; ``run_dir/metrics.json`` merges every stage's metrics."""

from __future__ import annotations

import importlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from biwm.core.checkpoint import atomic_write_text
from biwm.core.plugins import get_plugin_manager
from biwm.core.recipe import Recipe
from biwm.core.stages import STAGE_RUNNERS
from biwm.core.window import WorldModel

DONE_MARKER = "DONE"


@contextmanager
def progress_bar(console: Console, description: str, total: int, completed: int = 0) -> Iterator[Any]:
    """A rich progress bar; when output is not a terminal (logs, CI) a plain line every ~10%."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    state = {"done": completed, "start": time.time(), "every": max(1, total // 10)}
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(description, total=total, completed=completed, info="")

        def update(advance: int = 1, **info: Any) -> None:
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            progress.update(task, advance=advance, info=text)
            state["done"] += advance
            if not console.is_terminal and advance and state["done"] % state["every"] == 0:
                rate = (time.time() - state["start"]) / max(1, state["done"] - completed)
                console.print(f"{description} {state['done']}/{total} {text} ({rate:.3f} s/it)", highlight=False)

        yield update


@dataclass
class RunContext:
    recipe: Recipe
    run_dir: Path
    resume: bool = False
    console: Console = field(default_factory=Console)
    previous_weights: Path | None = None  # model.safetensors of the last finished training stage
    metrics: dict[str, Any] = field(default_factory=dict)
    _accelerator: Any = None

    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator()
            if self._accelerator.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True  # fp32 master weights, TF32 matmuls
                torch.backends.cudnn.allow_tf32 = True
        return self._accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def build_world_model(self) -> WorldModel:
        pm = get_plugin_manager()
        model = self.recipe.model
        resolved = self.recipe.resolved
        backbone = pm.get("backbone", model.backbone.name).create(resolved["model.backbone"])
        controls = {ref.name: pm.get("control", ref.name).create(resolved[f"model.controls[{i}]"], backbone=backbone)
                    for i, ref in enumerate(model.controls)}
        compressor = pm.get("compressor", model.compressor.name).create(resolved["model.compressor"], backbone=backbone)
        return WorldModel(backbone, controls, compressor)

    def cache_key(self) -> str:
        m = self.recipe.model.backbone
        return json.dumps([m.name, self.recipe.resolved["model.backbone"].model_dump(mode="json")], sort_keys=True)


def stage_folders(stage_names: list[str]) -> list[str]:
    """Folder of each stage under run_dir: its name, numbered from the second of a kind (finetune2)."""
    counts: dict[str, int] = {}
    out = []
    for name in stage_names:
        counts[name] = counts.get(name, 0) + 1
        out.append(name if counts[name] == 1 else f"{name}{counts[name]}")
    return out


def run_recipe(recipe: Recipe, resume: bool = False, console: Console | None = None) -> dict[str, Any]:
    console = console or Console()
    run_dir = Path(recipe.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.snapshot(), sort_keys=False))
    ctx = RunContext(recipe=recipe, run_dir=run_dir, resume=resume, console=console)
    for index, (stage, name) in enumerate(zip(recipe.stages, stage_folders(recipe.stage_names()))):
        stage_dir = run_dir / name
        done = stage_dir / DONE_MARKER
        if resume and done.is_file():
            console.print(f"[green]✓[/] {name}: already finished, skipping (--resume)")
            stage_metrics = json.loads((stage_dir / "metrics.json").read_text())
        else:
            console.rule(f"stage {index + 1}/{len(recipe.stages)}: {name}")
            if done.exists():
                done.unlink()
            module_name, func = STAGE_RUNNERS[stage.stage].split(":")
            runner = getattr(importlib.import_module(module_name), func)
            stage_metrics = runner(ctx, stage, stage_dir) or {}
            atomic_write_text(stage_dir / "metrics.json", json.dumps(stage_metrics, indent=2))
            atomic_write_text(stage_dir / "stage.yaml", yaml.safe_dump(stage.model_dump(mode="json"), sort_keys=False))
            atomic_write_text(done, "")
        if (stage_dir / "model.safetensors").is_file():
            ctx.previous_weights = stage_dir / "model.safetensors"
        ctx.metrics.update({k: v for k, v in stage_metrics.items() if not isinstance(v, (dict, list))})
        ctx.metrics.setdefault("stages", {})[name] = stage_metrics
        atomic_write_text(run_dir / "metrics.json", json.dumps(ctx.metrics, indent=2))
    return ctx.metrics


class RunNotFound(ValueError):
    """A path that is not (inside) a folder written by ``biwm run``."""


def find_run(target: Path) -> tuple[Path, Path]:
    """(run folder, weights) for a run folder (its last stage that wrote weights), a stage folder,
    a checkpoint folder or a model file inside a run."""
    from biwm.core.recipe import load_recipe_data

    target = Path(target)
    if not target.exists():
        raise RunNotFound(f"{target}: no such file or folder; expected a run folder, a stage folder or a "
                          "model.safetensors")
    weights = target if target.is_file() else None
    if weights is None and (target / "model.safetensors").is_file():
        weights = target / "model.safetensors"
    run_dir = next((p for p in [target, *target.parents][:5] if (p / "recipe.yaml").is_file()), None)
    if run_dir is None:
        raise RunNotFound(f"{target}: no recipe.yaml in it or in the folders above it; expected a folder written by "
                          "biwm run (or a model.safetensors inside one)")
    if weights is None:
        stages = [str(s.get("stage")) for s in load_recipe_data(run_dir / "recipe.yaml").get("stages", [])]
        for name in stage_folders(stages):
            if (run_dir / name / "model.safetensors").is_file():
                weights = run_dir / name / "model.safetensors"
        if weights is None:
            raise RunNotFound(f"{run_dir}: no stage folder holds a model.safetensors yet (has a training stage "
                              "finished?)")
    if weights.suffix != ".safetensors":
        raise RunNotFound(f"{weights}: expected a .safetensors model file")
    return run_dir, weights


def evaluation_recipe_data(run_dir: Path, weights: Path) -> dict[str, Any]:
    """The run's recipe (unvalidated, for ``--set`` overrides) reduced to one ``evaluate`` stage of
    ``weights``: the run's own evaluate settings if it had any."""
    from biwm.core.recipe import load_recipe_data

    data = load_recipe_data(run_dir / "recipe.yaml")
    old = [s for s in data.get("stages", []) if isinstance(s, dict) and s.get("stage") == "evaluate"]
    data["stages"] = [{**(old[-1] if old else {"stage": "evaluate"}), "init": str(Path(weights).resolve())}]
    data["run_dir"] = str(run_dir)
    return data
