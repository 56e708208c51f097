"""``biwm data import | cache | inspect``, added to the ``data`` group through ``register_commands``
(beside other plugins' ``data`` subcommands, such as biwm-toyworld's ``data toyworld``).

Everything past typer and rich is imported inside the command that runs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

data_app = typer.Typer(help="Data sets.", no_args_is_help=True)


@data_app.command("import")
def data_import(source: Path = typer.Argument(..., help="folder of mp4 files or frame folders, each with a camera "
                                                          "file of the same name"),
                fmt: str = typer.Option(..., "--format", help="realestate10k, poses, keys or biwm-actions"),
                out: Path = typer.Option(..., "--out", help="the dataset folder to write (must not exist)"),
                fps: float = typer.Option(None, help="resample to this frame rate (default: the source's)"),
                source_fps: float = typer.Option(None, help="frame rate of frame folders"),
                max_frames: int = typer.Option(None, min=1, help="keep at most this many frames per clip"),
                temporal_factor: int = typer.Option(4, min=1, help="cut clips to 1 + FACTOR*k frames; also the "
                                                                   "video frames per latent frame of biwm-actions"),
                move_step: float = typer.Option(0.15, help="world units per translation action"),
                turn_step_deg: float = typer.Option(5.0, help="degrees per rotation action"),
                fov_deg: float = typer.Option(None, help="horizontal field of view, for formats without "
                                                         "intrinsics (keys, biwm-actions, .npy)"),
                convention: str = typer.Option("auto", help="poses: c2w or w2c (auto: from the array's name)"),
                intrinsics: str = typer.Option("auto", help="poses: pixel or normalized (auto: by the principal "
                                                            "point, checked)"),
                axes: str = typer.Option("opencv", help="poses: opencv (x right, y down, z forward) or opengl"),
                captions: Path = typer.Option(None, help="captions JSON or CSV (default: SOURCE/captions.json "
                                                         "or .csv)"),
                default_caption: str = typer.Option(None, help="caption of clips that have none"),
                skip_bad: bool = typer.Option(False, "--skip-bad", help="import the good clips, report the bad"),
                force: bool = typer.Option(False, "--force", help="replace OUT if it exists")) -> None:
    """Import videos and their cameras into a dataset folder (written whole, or not at all)."""
    from pydantic import ValidationError

    from biwm.core.cli import console, fail
    from biwm.core.runner import progress_bar
    from biwm.data.importer import ImportSettings, find_videos, import_dataset
    from biwm.data.media import BadMedia

    try:
        settings = ImportSettings(format=fmt, fps=fps, source_fps=source_fps, max_frames=max_frames,
                                  temporal_factor=temporal_factor, move_step=move_step, turn_step_deg=turn_step_deg,
                                  fov_deg=fov_deg, convention=convention, intrinsics=intrinsics, axes=axes,
                                  captions=captions, default_caption=default_caption)
    except ValidationError as error:
        fail("; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']} (got {e['input']!r})"
                        for e in error.errors()))
    try:
        total = len(find_videos(source))
        with progress_bar(console, "import", total) as update:
            manifest = import_dataset(source, out, settings, skip_bad=skip_bad, force=force,
                                      progress=lambda name: update(clip=name))
    except BadMedia as error:
        fail(str(error))
    for skipped in manifest.skipped:
        console.print(f"[yellow]skipped[/] {skipped.error}", highlight=False, soft_wrap=True)
    frames = sum(c.frames for c in manifest.clips)
    console.print(f"[green]✓[/] wrote {out}: {len(manifest.clips)} clips, {frames} frames at {manifest.fps:g} fps"
                  + (f"; skipped {len(manifest.skipped)} (listed in {out / 'skipped.json'})" if manifest.skipped
                     else ""), highlight=False)


@data_app.command("inspect")
def data_inspect(dataset: Path = typer.Argument(..., help="a dataset folder (biwm data import)"),
                 out: Path = typer.Option(None, help="folder of the preview mp4s (default: DATASET/inspect)"),
                 previews: bool = typer.Option(True, help="write a preview mp4 per clip"),
                 as_json: bool = typer.Option(False, "--json", help="print the summary as JSON")) -> None:
    """Summarise a dataset (clips, frames, fps, resolution, pose ranges, actions) and preview its clips."""
    from rich.table import Table

    from biwm.core.checkpoint import CorruptFileError
    from biwm.core.cli import console, fail
    from biwm.data.store import DatasetError
    from biwm.data.summary import summarize, write_previews

    try:
        summary = summarize(dataset)
        written = write_previews(dataset, out or dataset / "inspect") if previews else []
    except (DatasetError, CorruptFileError) as error:
        fail(str(error))
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{dataset}: {summary['clips']} clips, {summary['frames']} frames, {summary['fps']:g} fps "
                        f"({summary['format']}; {summary['skipped']} skipped at import)")
    for column in ("clip", "frames", "size", "x range", "y range", "z range", "path", "yaw°", "pitch°", "caption"):
        table.add_column(column, overflow="fold")
    for row in summary["per_clip"]:
        low, high = row["position_min"], row["position_max"]
        table.add_row(row["name"], str(row["frames"]), row["resolution"],
                      *(f"{a:.2f}..{b:.2f}" for a, b in zip(low, high)), f"{row['path_length']:.2f}",
                      "{:.0f}..{:.0f}".format(*row["yaw_deg"]), "{:.0f}..{:.0f}".format(*row["pitch_deg"]),
                      row["caption"][:40])
    console.print(table)
    actions = summary["actions"]
    console.print("translations: " + ", ".join(f"{k} {v}" for k, v in actions["translation"].items()), highlight=False)
    console.print("rotations: " + ", ".join(f"{k} {v}" for k, v in actions["rotation"].items()), highlight=False)
    if written:
        console.print(f"[green]✓[/] wrote {len(written)} previews to {written[0].parent}")


@data_app.command("cache")
def data_cache(dataset: Path = typer.Argument(..., help="a dataset folder (biwm data import)"),
               recipe: Path = typer.Option(..., "--recipe", help="the recipe whose backbone encodes the clips"),
               set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override a recipe field"),
               clips_per_shard: int = typer.Option(64, min=1),
               device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)")) -> None:
    """Encode every clip once with the recipe's backbone (latents through its codec, captions through its
    text encoder) into DATASET/cache/KEY (sharded safetensors + index.json); the recipe's stages then
    read the clips from there."""
    import torch

    from biwm.core.cli import console, fail, load_recipe_or_exit
    from biwm.core.plugins import get_plugin_manager
    from biwm.core.runner import RunContext, progress_bar
    from biwm.data.cache import build_cache
    from biwm.data.store import DatasetError, read_manifest

    r = load_recipe_or_exit(recipe, set_)
    try:
        clips = len(read_manifest(dataset).clips)
    except DatasetError as error:
        fail(str(error))
    key = RunContext(recipe=r, run_dir=Path(r.run_dir)).cache_key()
    backbone = get_plugin_manager().get("backbone", r.model.backbone.name).create(r.resolved["model.backbone"])
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(backbone, torch.nn.Module):
        backbone.to(device)
    with progress_bar(console, "cache", clips) as update:
        folder = build_cache(dataset, backbone, key, clips_per_shard=clips_per_shard, device=device,
                             progress=lambda n: update(advance=n))
    console.print(f"[green]✓[/] wrote {folder} ({clips} clips, backbone {r.model.backbone.name})")
