"""Runs a validated recipe: one folder per stage under ``run_dir``, each with its checkpoint,
a recipe snapshot and metrics.json; ``run_dir/metrics.json`` holds every stage's metrics, one block
per stage. A run holds the folder's lock, and its checkpoints carry its run id (``run.json``).

Each stage's runner is looked up in the stage registry (built-in and plugin stages alike) and
imported only when that stage runs."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from biwm.core.checkpoint import (CorruptFileError, atomic_write_text, current_run_id, load_tensors,
                                  remove_temporaries)
from biwm.core.plugins import get_plugin_manager
from biwm.core.protocols import ClipSource
from biwm.core.recipe import Recipe, dataset_for
from biwm.core.window import WorldModel

DONE_MARKER = "DONE"
RUN_FILE = "run.json"  # the run id, which every checkpoint of the run records
LOCK_FILE = ".lock"


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
            crossed = state["done"] // state["every"] > (state["done"] - advance) // state["every"]
            if not console.is_terminal and advance and crossed:
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
    log_with: str | None = None  # an accelerate tracker ("tensorboard"), or None
    _accelerator: Any = None
    _dataset: Any = None

    @property
    def dataset(self) -> ClipSource:
        """The recipe's dataset, made on first use: the one place stages read clips from."""
        if self._dataset is None:
            self._dataset = dataset_for(self.recipe)
        return self._dataset

    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(log_with=self.log_with, project_dir=self.run_dir / "logs")
            if distributed_state() is not None:
                from biwm.core.sharded import fsdp_on_cpu

                fsdp_on_cpu(self._accelerator)
            if self.log_with:
                self._accelerator.init_trackers(self.recipe.name)
            if self._accelerator.device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = True  # fp32 master weights, TF32 matmuls
                torch.backends.cudnn.allow_tf32 = True
        return self._accelerator

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Send ``metrics`` at ``step`` to the run's trackers (``biwm run --log-with tensorboard``,
        written under ``run_dir/logs``); a no-op without one, so stages call it unconditionally.
        Name keys ``stage/what`` (``distill/generator_loss``). Values: numbers (scalars), or uint8
        images [H, W, 3] (numpy or torch), e.g. a sample strip."""
        if not self.log_with:
            return
        scalars = {k: v for k, v in metrics.items() if not hasattr(v, "shape")}
        images = {k: v.cpu().numpy() if torch.is_tensor(v) else v for k, v in metrics.items() if hasattr(v, "shape")}
        if scalars:
            self.accelerator.log(scalars, step=step)
        if images:
            for tracker in self.accelerator.trackers:
                tracker.log_images(images, step=step, dataformats="HWC")

    def end(self) -> None:
        """Flush and close the trackers."""
        if self.log_with and self._accelerator is not None:
            self._accelerator.end_training()

    def build_world_model(self) -> WorldModel:
        pm = get_plugin_manager()
        model = self.recipe.model
        resolved = self.recipe.resolved
        backbone = pm.get("backbone", model.backbone.name).create(resolved["model.backbone"])
        random_parts = getattr(backbone, "random_parts", ())
        if random_parts:
            self.console.print(f"[yellow]random weights[/] for {', '.join(random_parts)} of backbone "
                               f"{model.backbone.name} (random_init: true)", highlight=False)
        controls = {ref.name: pm.get("control", ref.name).create(resolved[f"model.controls[{i}]"], backbone=backbone)
                    for i, ref in enumerate(model.controls)}
        compressor = pm.get("compressor", model.compressor.name).create(resolved["model.compressor"], backbone=backbone)
        if model.quantize is not None:  # before any weights load: the training form keeps the parameters' names
            quantizer = pm.get("quantizer", model.quantize.name).create(resolved["model.quantize"])
            quantizer.convert(backbone.trainable(), training=True)
        return WorldModel(backbone, controls, compressor, model.attention)

    def cache_key(self) -> str:
        m = self.recipe.model.backbone
        return json.dumps([m.name, self.recipe.resolved["model.backbone"].model_dump(mode="json")], sort_keys=True)


class RunError(Exception):
    """A run that cannot start or go on as asked; the message says why and what to do."""


def stage_folders(stage_names: list[str]) -> list[str]:
    """Folder of each stage under run_dir: its name, numbered from the second of a kind (finetune2)."""
    counts: dict[str, int] = {}
    out = []
    for name in stage_names:
        counts[name] = counts.get(name, 0) + 1
        out.append(name if counts[name] == 1 else f"{name}{counts[name]}")
    return out


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run folder's exclusive lock; a second run on the folder gets a RunError at once."""
    from filelock import FileLock, Timeout

    lock = FileLock(run_dir / LOCK_FILE, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise RunError(f"{run_dir} is in use by another biwm run (it holds {run_dir / LOCK_FILE}); wait for it to "
                       "finish, or give this run another run_dir") from None
    try:
        yield
    finally:
        lock.release()


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """``field: old -> new`` for every leaf that differs between two snapshots."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))]
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if old == new else [f"{where}: {_short(old)} -> {_short(new)}"]


def _what_ran(snapshot: dict[str, Any], index: int) -> dict[str, Any]:
    """What stage ``index`` depends on: the seed, data, model and that stage and those before it."""
    return {"seed": snapshot.get("seed"), "data": snapshot.get("data"), "model": snapshot.get("model"),
            "stages": (snapshot.get("stages") or [])[:index + 1]}


def _start(run_dir: Path, recipe: Recipe, folders: list[str], resume: bool, force: bool, console: Console) -> str:
    """Check that the run may start or resume in ``run_dir`` and clear what ``force`` replaces;
    returns the run id its checkpoints are written under."""
    snapshot = yaml.safe_load(yaml.safe_dump(recipe.snapshot()))  # as it will read back from recipe.yaml
    recipe_file, run_file = run_dir / "recipe.yaml", run_dir / RUN_FILE
    try:
        old = yaml.safe_load(recipe_file.read_text()) if recipe_file.is_file() else None
        run_id = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
    except (OSError, ValueError, KeyError, yaml.YAMLError) as exc:
        raise RunError(f"{run_dir}: the earlier run's {recipe_file.name} or {RUN_FILE} is unreadable ({exc}); "
                       "pass --force without --resume to replace that run") from None
    if not isinstance(old, dict) and old is not None:
        raise RunError(f"{recipe_file}: not a recipe snapshot; pass --force without --resume to replace that run")
    if resume:
        for index, name in enumerate(folders):
            if not (run_dir / name / DONE_MARKER).is_file():
                continue
            changed = _differences(_what_ran(old, index), _what_ran(snapshot, index))
            if not changed:
                continue
            shown = "; ".join(changed[:3]) + (f"; ... ({len(changed)} in all)" if len(changed) > 3 else "")
            if not force:
                raise RunError(f"--resume: stage {name} finished with other settings ({shown}); pass --force to "
                               "re-run it and the stages after it, or leave the settings as they ran")
            console.print(f"[yellow]{name} finished with other settings[/] ({shown}): re-running it and the "
                          "stages after it (--force)", highlight=False)
            for later in folders[index:]:
                shutil.rmtree(run_dir / later, ignore_errors=True)
            break
        return run_id or uuid.uuid4().hex[:12]
    if old is not None or run_file.is_file():
        finished = [n for n in folders if (run_dir / n / DONE_MARKER).is_file()]
        if not force:
            raise RunError(f"{run_dir} already holds a run" + (f" (finished: {', '.join(finished)})" if finished
                                                               else "") + "; pass --resume to continue it or "
                           "--force to replace it")
        old_stages = [str(s.get("stage")) for s in (old or {}).get("stages") or [] if isinstance(s, dict)]
        replaced = [run_dir / n for n in sorted(set(stage_folders(old_stages)) | set(folders))
                    if (run_dir / n).is_dir()]
        console.print(f"[yellow]replacing the run in {run_dir}[/] (--force): removing "
                      f"{', '.join(p.name for p in replaced) or 'no stage folder'}", highlight=False)
        for path in replaced:
            shutil.rmtree(path)
        for leftover in ("metrics.json", RUN_FILE):
            (run_dir / leftover).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "logs", ignore_errors=True)
    return uuid.uuid4().hex[:12]


def _check_cache(run_dir: Path, console: Console) -> None:
    """A damaged file of the latent cache is removed (and so rendered again), and said so."""
    for path in sorted((run_dir / "cache").glob("*.safetensors")):
        try:
            load_tensors(path, "data cache file")
        except CorruptFileError as exc:
            path.unlink()
            console.print(f"[yellow]{exc}[/]: removed; it will be rendered again", highlight=False)


def stage_weights(ctx: RunContext, stage: Any) -> Path | None:
    """The model file a stage starts from: its ``init``, or the previous training stage's."""
    return getattr(stage, "init", None) or ctx.previous_weights


def run_stage(ctx: RunContext, stage: Any, name: str, stage_dir: Path) -> dict[str, Any]:
    """Run one stage with the runner its registry entry names (imported now, if it was given as
    ``"module:function"``). Diverged numbers and damaged files end in a RunError naming the stage,
    the model it ran and the cause."""
    try:
        runner = get_plugin_manager().get("stage", stage.stage).load()
    except ImportError as exc:
        raise RunError(f"stage {name}: {exc}") from None
    try:
        return runner(ctx, stage, stage_dir) or {}
    except (FloatingPointError, CorruptFileError) as exc:
        weights = stage_weights(ctx, stage)
        raise RunError(f"stage {name}" + (f" (model {weights})" if weights else "") + f": {exc}") from None


def distributed_state():
    """accelerate's process state when this process is one of several (``accelerate launch
    --num_processes N``, N > 1), else None: a single process never starts a process group."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # without a GPU: gloo over the CPU processes


def run_recipe(recipe: Recipe, resume: bool = False, console: Console | None = None, force: bool = False,
               log_with: str | None = None) -> dict[str, Any]:
    """Run the recipe's stages in ``run_dir``, holding its lock. A folder that already holds a run
    needs ``resume`` (finished stages are skipped; a finished stage whose settings changed is an
    error unless ``force``, which re-runs it) or ``force`` (replaces that run). Returns
    ``{"stages": {folder: metrics}}``, also written to ``run_dir/metrics.json``."""
    console = console or Console()
    run_dir = Path(recipe.run_dir)
    if resume and not (run_dir / "recipe.yaml").is_file():
        raise RunError(f"--resume: {run_dir} holds no run to resume (no recipe.yaml); leave out --resume to start one")
    run_dir.mkdir(parents=True, exist_ok=True)
    folders = stage_folders(recipe.stage_names())
    group = distributed_state()  # None: one process (no process group); else rank 0 alone writes the run's files
    main = group is None or group.is_main_process
    if not main:
        console.quiet = True  # the other ranks print nothing (the caller's console too)
    with run_lock(run_dir) if main else nullcontext():
        if main:
            for path in remove_temporaries(run_dir):
                console.print(f"removed {path}, left by an interrupted write", highlight=False)
            run_id = _start(run_dir, recipe, folders, resume, force, console)
            _check_cache(run_dir, console)
            atomic_write_text(run_dir / RUN_FILE, json.dumps({"run_id": run_id}))
            atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(recipe.snapshot(), sort_keys=False))
        if group is not None:
            group.wait_for_everyone()
            run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
        ctx = RunContext(recipe=recipe, run_dir=run_dir, resume=resume, console=console, log_with=log_with)
        token = current_run_id.set(run_id)
        try:
            for index, (stage, name) in enumerate(zip(recipe.stages, folders)):
                stage_dir = run_dir / name
                done = stage_dir / DONE_MARKER
                if resume and done.is_file():
                    console.print(f"[green]✓[/] {name}: already finished, skipping (--resume)")
                    stage_metrics = json.loads((stage_dir / "metrics.json").read_text())
                else:
                    console.rule(f"stage {index + 1}/{len(recipe.stages)}: {name}")
                    done.unlink(missing_ok=True)
                    stage_metrics = run_stage(ctx, stage, name, stage_dir)
                    if main:
                        atomic_write_text(stage_dir / "metrics.json", json.dumps(stage_metrics, indent=2))
                        atomic_write_text(stage_dir / "stage.yaml", yaml.safe_dump(stage.model_dump(mode="json"),
                                                                                   sort_keys=False))
                        atomic_write_text(done, "")
                if group is not None:
                    group.wait_for_everyone()  # the stage's files are written before any rank reads them
                if (stage_dir / "model.safetensors").is_file():
                    ctx.previous_weights = stage_dir / "model.safetensors"
                # one block per stage: generate's and evaluate's keys (chunks, psnr_*) mean different things
                ctx.metrics.setdefault("stages", {})[name] = stage_metrics
                if main:
                    atomic_write_text(run_dir / "metrics.json", json.dumps(ctx.metrics, indent=2))
        finally:
            current_run_id.reset(token)
            ctx.end()
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
    if run_dir is None and weights is not None and weights.suffix == ".safetensors":
        from biwm.core.stages.common import read_card

        if read_card(weights) is not None:  # a self-describing model file: its card is its recipe
            return weights.parent, weights
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
    from biwm.core.stages.common import read_card, recipe_data_from_card

    if not (run_dir / "recipe.yaml").is_file():
        card = read_card(weights)
        if card is None:
            raise RunNotFound(f"{weights}: no recipe.yaml beside or above it, and no model card in it")
        return recipe_data_from_card(card, run_dir, weights)
    data = load_recipe_data(run_dir / "recipe.yaml")
    old = [s for s in data.get("stages", []) if isinstance(s, dict) and s.get("stage") == "evaluate"]
    data["stages"] = [{**(old[-1] if old else {"stage": "evaluate"}), "init": str(Path(weights).resolve())}]
    data["run_dir"] = str(run_dir)
    return data
