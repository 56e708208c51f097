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


def write_strip(path: Path, rows: list[Tensor], every: int = 1, scale: int = 1) -> None:
    """One row per video ([T, 3, H, W]), every ``every``-th frame, as a PNG grid (nearest-neighbour
    upscaled by ``scale`` so toy-sized frames are visible)."""
    arrs = [to_uint8(r)[::every] for r in rows]
    grid = np.concatenate([np.concatenate(list(a), axis=1) for a in arrs], axis=0)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
