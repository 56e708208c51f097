"""Writing rollouts: mp4 (imageio-ffmpeg) and a PNG frame strip, both atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from biwm.core.checkpoint import atomic_path


def as_uint8(frames: Tensor) -> Tensor:
    """Frames in [-1, 1] (or already uint8) -> uint8, same shape."""
    if frames.dtype == torch.uint8:
        return frames
    return ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8(frames: Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] (or uint8) -> [T, H, W, 3] uint8."""
    return as_uint8(frames).permute(0, 2, 3, 1).cpu().numpy()


def write_mp4(path: Path, frames: Tensor, fps: int = 8, scale: int = 1) -> None:
    import imageio.v2 as imageio

    arr = to_uint8(frames)
    if scale > 1:
        arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, imageio.get_writer(str(tmp), fps=fps, codec="libx264", quality=8,
                                                      macro_block_size=1, ffmpeg_log_level="error") as writer:
        for frame in arr:
            writer.append_data(frame)


def strip_grid(rows: list[Tensor], every: int = 1, scale: int = 1) -> np.ndarray:
    """The frames of ``rows`` (videos [T, 3, H, W]) as one uint8 image [H', W', 3]: a row per video,
    every ``every``-th frame, nearest-neighbour upscaled by ``scale``."""
    arrs = [to_uint8(r)[::every] for r in rows]
    grid = np.concatenate([np.concatenate(list(a), axis=1) for a in arrs], axis=0)
    return grid.repeat(scale, axis=0).repeat(scale, axis=1)


def write_strip(path: Path, rows: list[Tensor], every: int = 1, scale: int = 1, labels: list[str] | None = None,
                history: int | None = None) -> None:
    """One row per video ([T, 3, H, W]), every ``every``-th frame, as a PNG grid (nearest-neighbour
    upscaled by ``scale`` so toy-sized frames are visible). With ``labels``, each row is named in a
    margin on the left and each column by its frame number on top; frames before ``history`` are
    marked as the true history ("h")."""
    from PIL import ImageDraw

    if labels is not None and len(labels) != len(rows):
        raise ValueError(f"write_strip: {len(labels)} labels for {len(rows)} rows")
    grid = strip_grid(rows, every, scale)
    if labels is not None:
        columns = len(range(0, rows[0].shape[0], every))
        row_h, col_w = grid.shape[0] // len(rows), grid.shape[1] // columns
        left, top = 8 + 6 * max(len(t) for t in labels), 14
        canvas = Image.new("RGB", (grid.shape[1] + left, grid.shape[0] + top), "white")
        canvas.paste(Image.fromarray(grid), (left, top))
        draw = ImageDraw.Draw(canvas)
        for r, text in enumerate(labels):
            draw.text((4, top + r * row_h + row_h // 2 - 5), text, fill="black")
        for c in range(columns):
            frame = c * every
            mark = "h" if history is not None and frame < history else ""
            draw.text((left + c * col_w + 2, 2), f"{frame}{mark}", fill="black")
        grid = np.asarray(canvas)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
