"""The toy world's commands, added to ``biwm`` through ``register_commands``: ``biwm data toyworld``
(render clips to disk) and ``biwm idm train`` (the inverse-dynamics model for a rendering).

Everything past typer and rich is imported inside the command that runs."""

from __future__ import annotations

from pathlib import Path

import typer

data_app = typer.Typer(help="Data sets.", no_args_is_help=True)
idm_app = typer.Typer(help="The inverse-dynamics model that scores camera following.", no_args_is_help=True)


@idm_app.command("train")
def idm_train(height: int = typer.Option(32, min=8), width: int = typer.Option(32, min=8),
              recipe: Path = typer.Option(None, help="take the toy-world rendering from this recipe instead"),
              steps: int = typer.Option(6000, min=1), batch_size: int = typer.Option(512, min=1),
              clip_frames: int = typer.Option(48, min=2, help="frames per training clip"),
              pool_clips: int = typer.Option(48, min=1, help="clips per freshly rendered pool"),
              refresh_every: int = typer.Option(8, min=1, help="render a fresh pool every N steps"),
              channels: int = typer.Option(48, min=8, help="width of the first convolutions"),
              out: Path = typer.Option(None, help="weights file (default: the user cache, where biwm eval finds it)"),
              device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)")) -> None:
    """Train the inverse-dynamics model for a toy-world rendering and report its held-out accuracy.
    The defaults made the shipped 32x32 model (5 minutes on an H100)."""
    import torch

    from biwm.core.cli import console, fail, load_recipe_or_exit
    from biwm.core.runner import progress_bar
    from biwm.toyworld.idm import IDMTrainConfig, cache_dir, idm_key, save_idm, train_idm
    from biwm.toyworld.world import ToyWorldConfig

    if recipe:
        data = load_recipe_or_exit(recipe, []).data
        config = getattr(data, "toyworld", None)
        if config is None:
            fail(f"{recipe}: data.source is {data.source!r}, not the toy world; the IDM is trained on toy-world "
                  "renderings")
    else:
        config = ToyWorldConfig(height=height, width=width)
    out = out or cache_dir() / f"idm-{idm_key(config)}.safetensors"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train = IDMTrainConfig(steps=steps, batch_size=batch_size, clip_frames=clip_frames, pool_clips=pool_clips,
                           refresh_every=refresh_every, channels=channels)
    with progress_bar(console, "IDM", steps) as update:
        model, scores = train_idm(config, train, device, progress=lambda **kw: update(**kw))
    info = {k: v for k, v in scores.items() if not isinstance(v, dict)}
    save_idm(out, model, config, info)
    console.print(f"held-out accuracy {scores['accuracy']:.4f} (translation {scores['translation_accuracy']:.4f}, "
                  f"rotation {scores['rotation_accuracy']:.4f}; against another clip's actions "
                  f"{scores.get('shuffled_accuracy', float('nan')):.4f}, chance {scores['chance']:.4f})")
    console.print(f"[green]✓[/] wrote {out}")


def import_command(out: Path, fmt: str, media: str, config, temporal_factor: int) -> str:
    """The ``biwm data import`` command that reads back what ``biwm data toyworld --format`` wrote: key and
    action files carry no intrinsics (the toy world's field of view), PNG folders no frame rate."""
    from biwm.toyworld.export import FPS

    flags = [f"--format {fmt}"]
    if fmt in ("keys", "biwm-actions"):
        flags.append(f"--fov-deg {config.fov_deg:g}")
    if fmt == "biwm-actions":
        flags.append(f"--temporal-factor {temporal_factor}")
    if media == "frames":
        flags.append(f"--source-fps {FPS:g}")
    return f"biwm data import {out} {' '.join(flags)} --out DATASET"


@data_app.command("toyworld")
def data_toyworld(out: Path = typer.Option(..., "--out", help="output folder"),
                  clips: int = typer.Option(256, min=1, help="number of clips"),
                  frames: int = typer.Option(16, min=1, help="frames per clip"),
                  split: str = typer.Option("train", help="train or heldout (disjoint seed ranges)"),
                  seed_start: int = typer.Option(0, min=0, help="first seed index within the split"),
                  height: int = typer.Option(None, min=8, help="default: the toy world's, as recipes and the "
                                                               "shipped IDM use it"),
                  width: int = typer.Option(None, min=8, help="default: the toy world's"),
                  fmt: str = typer.Option(None, "--format", help="also write each clip as a video and a camera file "
                                          "in this format (realestate10k, poses, keys, biwm-actions; needs "
                                          "biwm-data), for biwm data import"),
                  media: str = typer.Option("mp4", help="with --format: mp4 or frames (a folder of PNGs, lossless)"),
                  lossless: bool = typer.Option(False, help="with --format and mp4: lossless H.264 (libx264rgb, qp 0)"),
                  temporal_factor: int = typer.Option(4, min=1, help="with --format biwm-actions: video frames per "
                                                                     "latent frame")) -> None:
    """Render toy-world clips to OUT/clips.safetensors (+ config.json, preview.png); with --format, as
    videos and camera files in a peer's format (+ captions.json and the truth in clips.safetensors)."""
    from biwm.core.cli import console, fail
    from biwm.toyworld.world import ToyWorldConfig, write_dataset

    if split not in ("train", "heldout"):
        fail(f"--split: {split!r} is not allowed; allowed: train, heldout")
    config = ToyWorldConfig(**{k: v for k, v in (("height", height), ("width", width)) if v is not None})
    if fmt is not None:
        from biwm.toyworld.export import write_formatted

        if media not in ("mp4", "frames"):
            fail(f"--media: {media!r} is not allowed; allowed: mp4, frames")
        try:
            with console.status(f"rendering {clips} clips x {frames} frames as {fmt}"):
                write_formatted(out, fmt, clips, frames, config, split=split, seed_start=seed_start, media=media,
                                lossless=lossless, temporal_factor=temporal_factor)
        except (ValueError, RuntimeError) as error:
            fail(str(error))
        console.print(f"[green]✓[/] wrote {out} ({clips} clips, {fmt}, {media})")
        console.print("import it with: " + import_command(out, fmt, media, config, temporal_factor), highlight=False,
                      soft_wrap=True)
        return
    with console.status(f"rendering {clips} clips x {frames} frames"):
        path = write_dataset(out, split, clips, frames, config, seed_start=seed_start)
    console.print(f"[green]✓[/] wrote {path}")
