"""``biwm play MODEL``: load the model, serve the play page on HOST:PORT (127.0.0.1 unless told
otherwise) and print its URL. Everything past typer is imported inside the command."""

from __future__ import annotations

from pathlib import Path

import typer


def play(model: Path = typer.Argument(..., help="model file (with its card), or a run, stage or checkpoint folder"),
         host: str = typer.Option("127.0.0.1", help="address to bind; another than 127.0.0.1 exposes the model "
                                  "to the network"),
         port: int = typer.Option(8000, min=0, max=65535, help="port (0: any free one; the URL printed says which)"),
         scene: int = typer.Option(0, min=0, help="held-out scene of the model's dataset to start from"),
         record_dir: Path = typer.Option(Path("play-recordings"), "--record-dir",
                                         help="where the page's recordings go (mp4, strip, action log)"),
         seed: int = typer.Option(0, help="noise seed of each session"),
         device: str = typer.Option(None, help="cuda or cpu (default: cuda when available)"),
         eager: bool = typer.Option(False, "--eager", help="on a GPU: no compiled blocks or decoder")) -> None:
    """Drive a world model from the keyboard in a local web page: W/A/S/D move, I/J/K/L or the arrows turn."""
    import torch

    from biwm.core.cli import console, fail
    from biwm.core.driving import DrivableModel, DriveError
    from biwm.core.runner import RunError, RunNotFound
    from biwm.play.server import PlayServer, listen, serve, url

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        with console.status(f"loading {model}"):
            drivable = DrivableModel.load(model, device, compile=not eager)
            drivable.scene_start(scene)  # a bad scene or dataset fails here, not in the first page
    except (DriveError, RunNotFound, RunError) as exc:
        fail(str(exc))
    server = PlayServer.for_model(drivable, record_dir, scene, seed)
    try:
        sock = listen(host, port)
    except OSError as exc:
        fail(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}")
    speed = drivable.speed.describe() if drivable.speed is not None else "eager"
    console.print(f"biwm play: {drivable.weights} on {device} ({drivable.sampler.describe()}; {speed})",
                  highlight=False)
    print(f"open {url(sock)} (Ctrl-C stops)", flush=True)
    serve(server, sock)
