"""The ``biwm`` command: list-plugins, validate, run, eval, compare, and the commands plugins add
(``register_commands``: biwm-toyworld's ``data toyworld`` and ``idm train``); ``biwm run`` runs
built-in and plugin stages alike (``register_stages``).

Everything past typer and rich is imported inside the command that needs it, and only the command
registry is built for ``--help``: the CLI imports no stage, runner or loss it does not use."""

from __future__ import annotations

import json
import sys
import warnings
from contextlib import contextmanager
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(help="BiWM: interactive video world models from bidirectional video diffusion backbones.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2
MAX_KEY_FRAMES = 100_000  # biwm generate --keys: frames of one rollout


class LogWith(str, Enum):
    tensorboard = "tensorboard"


def fail(message: str) -> None:
    """Print ``error: message`` and exit with the usage status (2); for plugin commands too."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


@app.command("list-plugins")
def list_plugins(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List plugins: what each provides, its distribution, version and status."""
    from biwm.core.plugins import KINDS, get_plugin_manager

    pm = get_plugin_manager()
    rows = []
    for kind in KINDS:
        for spec in pm.registry(kind).values():
            rows.append({"kind": kind, "name": spec.name, "distribution": spec.distribution, "version": spec.version,
                         "description": spec.description, "status": "ok", "plugin": spec.plugin})
    for status in pm.statuses():
        if status.status != "ok":
            rows.append({"kind": "-", "name": status.name, "distribution": status.distribution,
                         "version": status.version, "description": status.error, "status": status.status,
                         "plugin": status.name})
    for kind, name, status in pm.disabled_items():
        rows.append({"kind": kind, "name": name, "distribution": status.distribution, "version": status.version,
                     "description": "blocked by BIWM_DISABLE_PLUGINS", "status": "disabled", "plugin": status.name})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    _warn_broken(broken=False)
    table = Table(title="BiWM plugins")
    for column in ("kind", "name", "plugin", "distribution", "version", "status", "description"):
        table.add_column(column, overflow="fold")
    for r in rows:
        style = {"ok": "green", "broken": "red", "disabled": "yellow"}[r["status"]]
        table.add_row(r["kind"], r["name"], r["plugin"], r["distribution"], r["version"], f"[{style}]{r['status']}[/]",
                      r["description"])
    console.print(table)


def load_recipe_or_exit(recipe: Path, overrides: list[str]):
    """The recipe at ``recipe`` with ``--set`` overrides, or an error naming the file/field and exit 2;
    for plugin commands too."""
    from biwm.core.recipe import load_recipe

    _warn_broken()  # before the recipe's errors, which a broken or disabled plugin may explain
    with _recipe_errors():
        return load_recipe(recipe, overrides)


@contextmanager
def _recipe_errors():
    """A bad recipe: one error line per problem, exit code 2."""
    from biwm.core.recipe import RecipeError

    try:
        yield
    except RecipeError as exc:
        for line in str(exc).splitlines():
            err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USAGE) from None


def _warn_broken(broken: bool = True) -> None:
    """Warn about broken plugins and about names in BIWM_DISABLE_PLUGINS that match nothing."""
    from biwm.core.plugins import DISABLE_ENV, get_plugin_manager

    pm = get_plugin_manager()
    for status in pm.statuses() if broken else []:
        if status.status == "broken":
            err_console.print(f"[yellow]warning:[/] plugin {status.name!r} ({status.distribution}) is broken and was "
                              f"skipped: {escape(status.error)}", highlight=False, soft_wrap=True)
    for name in pm.unknown_disabled():
        err_console.print(f"[yellow]warning:[/] {DISABLE_ENV}: {name!r} is neither a plugin module nor a plugin; "
                          "see biwm list-plugins (columns plugin and name)", highlight=False, soft_wrap=True)


SET_OPTION = dict(metavar="KEY=VALUE", help="override a field: key=value (repeatable)")


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             set_: list[str] = typer.Option([], "--set", **SET_OPTION)) -> None:
    """Check a recipe without running it."""
    r = load_recipe_or_exit(recipe, set_)
    console.print(f"[green]✓[/] {recipe}: valid ({len(r.stages)} stages: {', '.join(r.stage_names())}; "
                  f"backbone {r.model.backbone.name}, controls {[c.name for c in r.model.controls]}, "
                  f"compressor {r.model.compressor.name}; run_dir {r.run_dir})")


@contextmanager
def _run_errors():
    """A run that cannot start or go on (folder in use, nothing to resume, diverged, damaged file):
    one line, exit code 2."""
    from biwm.core.runner import RunError

    try:
        yield
    except RunError as exc:
        fail(str(exc))


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        set_: list[str] = typer.Option([], "--set", **SET_OPTION),
        resume: bool = typer.Option(False, "--resume", metavar="",
                                    help="skip finished stages, continue from the last checkpoint"),
        force: bool = typer.Option(False, "--force", metavar="",
                                   help="replace the run already in run_dir (with --resume: re-run finished stages "
                                        "whose settings changed)"),
        log_with: LogWith = typer.Option(None, "--log-with", help="also log to this tracker, under run_dir/logs")
        ) -> None:
    """Run a recipe's stages in order."""
    from biwm.core.runner import run_recipe

    if log_with is LogWith.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            fail("--log-with tensorboard needs the tensorboard package: pip install 'biwm-core[tensorboard]'")
    r = load_recipe_or_exit(recipe, set_)
    with _run_errors():
        metrics = run_recipe(r, resume=resume, console=console, force=force,
                             log_with=log_with.value if log_with else None)
    console.print(f"[green]✓[/] done: {Path(r.run_dir) / 'metrics.json'}")
    for name, stage_metrics in metrics.get("stages", {}).items():
        shown = {k: v for k, v in stage_metrics.items() if k.startswith("psnr") and isinstance(v, (int, float))}
        if shown:
            console.print(f"{name}: " + ", ".join(f"{k}={v:.2f}" for k, v in shown.items()), highlight=False)


def _find_run(target: Path) -> tuple[Path, Path]:
    from biwm.core.runner import RunNotFound, find_run

    try:
        return find_run(target)
    except RunNotFound as e:
        fail(str(e))


@app.command("eval")
def eval_(target: Path = typer.Argument(..., help="run folder, stage folder, checkpoint folder or model.safetensors"),
          set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a field of the run's "
                                         "recipe, e.g. evaluate.chunks=20 or model.attention=causal (repeatable)"),
          out: Path = typer.Option(None, "--out", help="output folder (default: RUN_DIR/eval)")) -> None:
    """Score a trained model on its dataset's held-out clips: metrics.json, report.md and PNG plots."""
    from biwm.core.checkpoint import atomic_write_text
    from biwm.core.recipe import apply_overrides, validate_recipe
    from biwm.core.runner import RunContext, evaluation_recipe_data, run_stage

    run_dir, weights = _find_run(target)
    with _recipe_errors():
        data = evaluation_recipe_data(run_dir, weights)
        recipe_file = run_dir / "recipe.yaml"
        # a model file evaluated on its own: its card is the recipe, so errors name the file
        source = str(recipe_file) if recipe_file.is_file() else f"{weights} (its model card)"
        recipe = validate_recipe(apply_overrides(data, set_), base_dir=run_dir, source=source)
    _warn_broken()
    out = out or run_dir / "eval"
    console.print(f"evaluating {weights} ({recipe.model.attention} attention) -> {out}")
    ctx = RunContext(recipe=recipe, run_dir=run_dir, console=console)
    with _run_errors():
        metrics = run_stage(ctx, recipe.stages[0], "evaluate", out)
    metrics["weights"] = str(weights)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    console.print(f"[green]✓[/] wrote {out / 'metrics.json'}, {out / 'report.md'}")


@app.command()
def compare(runs: list[str] = typer.Argument(..., help="NAME=FOLDER pairs; FOLDER holds an evaluation's metrics.json; "
                                             "NAME=FOLDER,FOLDER,... for an arm's seeds (mean ± half the range)"),
            out: Path = typer.Option(..., "--out", help="output prefix: writes OUT.json, OUT.md, OUT_drift.png, OUT_idm.png"),
            title: str = typer.Option("Comparison", help="heading of OUT.md"),
            notes: Path = typer.Option(None, help="markdown file appended to OUT.md (setup, budget, hardware)"),
            setup: Path = typer.Option(None, help="YAML/JSON mapping stored as 'setup' in OUT.json")) -> None:
    """Put several evaluations side by side (an arm's seeds as one column: mean ± half the range)."""
    from biwm.core.report import compare_runs

    loaded: dict[str, list[dict]] = {}
    for item in runs:
        name, sep, folders = item.partition("=")
        if not sep or not name or not folders:
            fail(f"{item!r}: expected NAME=FOLDER or NAME=FOLDER,FOLDER,... (one evaluation per seed)")
        if name in loaded:
            fail(f"{name}: given twice; list an arm's seeds as NAME=FOLDER,FOLDER")
        loaded[name] = []
        for folder in folders.split(","):
            path = Path(folder) / "metrics.json" if Path(folder).is_dir() else Path(folder)
            if not path.is_file():
                fail(f"{name}: {path} not found; expected the folder of a biwm eval (or evaluate stage)")
            metrics = json.loads(path.read_text())
            metrics = metrics.get("stages", {}).get("evaluate", metrics)  # a run's merged metrics.json works too
            if "psnr" not in metrics:
                fail(f"{name}: {path} holds no evaluation metrics (no psnr)")
            loaded[name].append(metrics)
    for option, path in (("--notes", notes), ("--setup", setup)):
        if path is not None and not path.is_file():
            fail(f"{option}: {path} not found")
    setup_data = None
    if setup is not None:
        import yaml

        try:
            setup_data = yaml.safe_load(setup.read_text())
        except yaml.YAMLError as e:
            fail(f"--setup: {setup} is not valid YAML: {e}")
        if not isinstance(setup_data, dict):
            fail(f"--setup: {setup} must hold a mapping")
    compare_runs(loaded, out, title, notes.read_text() if notes else "", setup=setup_data)
    console.print(f"[green]✓[/] wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")


@app.command()
def generate(model: Path = typer.Argument(..., help="model file (with its card), or a run, stage or checkpoint folder"),
             keys: str = typer.Option(None, "--keys", help="key string, one action per video frame: w/s a/d move, "
                                      "i/k j/l turn, _ idle, e.g. 'w*8,a*4,j*4'"),
             poses: Path = typer.Option(None, "--poses", help="JSON file of camera-to-world poses {\"c2w\": [4x4, ...]}, "
                                        "relative to the last history frame (the OUT.json of a drive)"),
             history: Path = typer.Option(None, "--history", help="video file: its last frames are the history"),
             scene: int = typer.Option(None, "--scene", min=0, help="start from held-out scene SCENE of the model's "
                                       "dataset (default 0; the toy world: the scene of seed 1e9+SCENE)"),
             chunks: int = typer.Option(None, "--chunks", min=1, help="chunks to generate; the keys or poses must "
                                        "cover exactly that many (default: as many as they cover)"),
             out: Path = typer.Option(..., "--out", help="mp4 to write; OUT_strip.png and OUT.json (the trajectory) "
                                      "beside it"),
             seed: int = typer.Option(0, help="noise seed"),
             device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
             eager: bool = typer.Option(False, "--eager", help="on a GPU: no compiled blocks or decoder")) -> None:
    """Roll a saved model out under a key string or a pose file, with its own sampler: an mp4, a frame strip
    and the trajectory used."""
    import torch

    from biwm.core.camera import key_frames, parse_keys
    from biwm.core.config import show
    from biwm.core.driving import DrivableModel, DriveError, chunked, read_poses
    from biwm.core.runner import RunError, RunNotFound

    if (keys is None) == (poses is None):
        fail("give exactly one of --keys and --poses")
    if history is not None and scene is not None:
        fail("give at most one of --history and --scene")
    if out.suffix.lower() != ".mp4":
        fail(f"--out: {out} must end in .mp4")
    try:
        if keys is not None:
            frames = key_frames(keys)  # counted before expanding: 'w*99999999999' is a number, not a list
            if frames is not None and frames > MAX_KEY_FRAMES:
                fail(f"--keys: {show(keys)} gives {frames} frames; at most {MAX_KEY_FRAMES}")
            try:
                drive_by = parse_keys(keys)
            except ValueError as exc:
                fail(f"--keys: {exc}")
        else:
            drive_by = read_poses(poses)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        with console.status(f"loading {model}"):
            drivable = DrivableModel.load(model, device, compile=not eager)
        n = drivable.chunk_video_frames
        count = chunked(len(drive_by), n, chunks, "--keys" if keys is not None else f"--poses {poses}")
        start = drivable.video_start(history) if history is not None else drivable.scene_start(scene or 0)
        drive = drivable.drive(start, seed)
        c2w_before = start.camera.c2w[0, -1]
        with console.status(f"{count} chunks from {start.label} ({drivable.sampler.describe()})") as status:
            for i in range(count):
                status.update(f"chunk {i + 1}/{count} from {start.label} ({drivable.sampler.describe()})")
                part = drive_by[i * n:(i + 1) * n]
                if keys is not None:
                    drive.step(part)
                else:
                    drive.step_poses(c2w_before.cpu() @ part)
        written = drive.save(out)
    except (DriveError, RunNotFound, RunError) as exc:
        fail(str(exc))
    console.print(f"[green]✓[/] wrote {', '.join(map(str, written))} ({drive.generated_frames} frames after "
                  f"{start.frames.shape[0]} history frames; {drivable.sampler.describe()})", highlight=False)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def builtin_command_names() -> set[str]:
    return ({c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
            | {g.name for g in app.registered_groups})


def add_plugin_commands() -> list[str]:
    """Add the commands that plugins register (``register_commands``) to the CLI; returns their names.
    One that reuses a built-in command's name is left out, with a warning naming its plugin."""
    from biwm.core.plugins import get_plugin_manager

    builtin = builtin_command_names()
    added = []
    for spec in get_plugin_manager().registry("command").values():
        if spec.name in builtin or spec.name in added:
            warnings.warn(f"plugin {spec.plugin!r} ({spec.distribution}) registers command {spec.name!r}, which "
                          "BiWM already has; left out", stacklevel=1)
            continue
        if isinstance(spec.factory, typer.Typer):
            app.add_typer(spec.factory, name=spec.name, help=spec.description or None)
        else:
            app.command(name=spec.name, help=spec.description or None)(spec.factory)
        added.append(spec.name)
    return added


# Messages that libraries log on import about optional parts BiWM does not use, which read like failures:
# torchao's CUDA kernel libraries that do not load (on a CPU, or against another torch build), torch's
# pytree deprecation note about torchao's enums, and diffusers' note that it cannot import torchao's
# serialised tensor types (needed only to load torchao-serialised checkpoints, which BiWM does not write).
QUIET_LOGGERS = ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer")


def quiet_optional_backends() -> None:
    """Errors from these loggers still show; their import-time warnings do not."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> None:
    quiet_optional_backends()
    warnings.showwarning = _show_warning  # one line each, not the source line that warned
    first = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if first not in builtin_command_names():  # plugins load only for --help and commands core lacks
        add_plugin_commands()
    app()


if __name__ == "__main__":
    main()
