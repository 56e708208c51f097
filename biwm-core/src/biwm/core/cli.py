"""The ``biwm`` command: list-plugins, validate, run, data toyworld."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="BiWM: interactive video world models from bidirectional video diffusion backbones.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True)

EXIT_USAGE = 2


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
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
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="BiWM plugins")
    for column in ("kind", "name", "distribution", "version", "status", "description"):
        table.add_column(column, overflow="fold")
    for r in rows:
        style = {"ok": "green", "broken": "red", "disabled": "yellow"}[r["status"]]
        table.add_row(r["kind"], r["name"], r["distribution"], r["version"], f"[{style}]{r['status']}[/]",
                      r["description"])
    console.print(table)


def _load(recipe: Path, overrides: list[str]):
    from biwm.core.recipe import RecipeError, load_recipe

    try:
        return load_recipe(recipe, overrides)
    except RecipeError as exc:
        for line in str(exc).splitlines():
            err_console.print(f"[bold red]error:[/] {line}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None


def _warn_broken() -> None:
    from biwm.core.plugins import get_plugin_manager

    for status in get_plugin_manager().statuses():
        if status.status == "broken":
            err_console.print(f"[yellow]warning:[/] plugin {status.name!r} ({status.distribution}) is broken and was "
                              f"skipped: {status.error}", highlight=False)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML"),
             set_: list[str] = typer.Option([], "--set", help="override a field: key=value (repeatable)")) -> None:
    """Check a recipe without running it."""
    r = _load(recipe, set_)
    _warn_broken()
    console.print(f"[green]✓[/] {recipe}: valid ({len(r.stages)} stages: {', '.join(r.stage_names())}; "
                  f"backbone {r.model.backbone.name}, controls {[c.name for c in r.model.controls]}, "
                  f"compressor {r.model.compressor.name}; run_dir {r.run_dir})")


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML"),
        set_: list[str] = typer.Option([], "--set", help="override a field: key=value (repeatable)"),
        resume: bool = typer.Option(False, "--resume", help="skip finished stages, continue from the last checkpoint")) -> None:
    """Run a recipe's stages in order."""
    from biwm.core.runner import run_recipe

    r = _load(recipe, set_)
    _warn_broken()
    metrics = run_recipe(r, resume=resume, console=console)
    console.print(f"[green]✓[/] done: {Path(r.run_dir) / 'metrics.json'}")
    shown = {k: v for k, v in metrics.items() if k.startswith("psnr") and not isinstance(v, list)}
    if shown:
        console.print(", ".join(f"{k}={v:.2f}" for k, v in shown.items()))


@data_app.command("toyworld")
def data_toyworld(out: Path = typer.Option(..., "--out", help="output folder"),
                  clips: int = typer.Option(256, min=1, help="number of clips"),
                  frames: int = typer.Option(16, min=1, help="frames per clip"),
                  split: str = typer.Option("train", help="train or heldout (disjoint seed ranges)"),
                  seed_start: int = typer.Option(0, min=0, help="first seed index within the split"),
                  height: int = typer.Option(64, min=8), width: int = typer.Option(64, min=8)) -> None:
    """Render toy-world clips to OUT/clips.safetensors (+ config.json, preview.png)."""
    from biwm.core.toyworld import ToyWorldConfig, write_dataset

    if split not in ("train", "heldout"):
        _fail(f"--split: {split!r} is not allowed; allowed: train, heldout")
    config = ToyWorldConfig(height=height, width=width)
    with console.status(f"rendering {clips} clips x {frames} frames"):
        path = write_dataset(out, split, clips, frames, config, seed_start=seed_start)
    console.print(f"[green]✓[/] wrote {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
