"""``biwm data inspect``: what a dataset holds (clips, frames, fps, resolution, pose ranges, action
histogram) and a preview mp4 per clip with its camera trajectory drawn over it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from biwm.core.camera import NUM_ACTIONS, ROTATIONS, TRANSLATIONS, yaw_pitch_from_pose
from biwm.data.store import read_clip, read_manifest


def summarize(dataset: Path) -> dict:
    """Per clip and overall: frames, fps, resolution, camera position / yaw / pitch ranges, actions."""
    manifest = read_manifest(dataset)
    rows, histogram = [], torch.zeros(NUM_ACTIONS, dtype=torch.long)
    for clip in manifest.clips:
        tensors = read_clip(dataset, clip.name)
        c2w = tensors["c2w"]
        yaw, pitch = yaw_pitch_from_pose(c2w)
        position = c2w[:, :3, 3]
        histogram += torch.bincount(tensors["actions"], minlength=NUM_ACTIONS)
        rows.append({"name": clip.name, "frames": clip.frames, "fps": clip.fps,
                     "resolution": f"{clip.width}x{clip.height}", "caption": clip.caption,
                     "position_min": position.amin(0).tolist(), "position_max": position.amax(0).tolist(),
                     "path_length": float(position.diff(dim=0).norm(dim=-1).sum()),
                     "yaw_deg": [float(yaw.min().rad2deg()), float(yaw.max().rad2deg())],
                     "pitch_deg": [float(pitch.min().rad2deg()), float(pitch.max().rad2deg())]})
    translation = histogram.view(9, 9).sum(1)
    rotation = histogram.view(9, 9).sum(0)
    return {"clips": len(rows), "frames": sum(r["frames"] for r in rows), "fps": manifest.fps,
            "format": manifest.format, "skipped": len(manifest.skipped), "per_clip": rows,
            "actions": {"histogram": histogram.tolist(),
                        "translation": dict(zip(TRANSLATIONS, translation.tolist())),
                        "rotation": dict(zip(ROTATIONS, rotation.tolist()))}}


def trajectory_frames(frames: np.ndarray, c2w: torch.Tensor, scale: int = 4) -> np.ndarray:
    """Frames [T, H, W, 3] upscaled, with an inset map (top view, x right, z up) of the whole
    trajectory, the path so far and the camera's heading at each frame."""
    from PIL import Image, ImageDraw

    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    height, width = frames.shape[1:3]
    size = max(24, min(height, width) // 3)
    xz = c2w[:, [0, 2], 3].double().numpy()
    low, span = xz.min(0), max(float((xz.max(0) - xz.min(0)).max()), 1e-6)
    points = [(4 + (x - low[0]) / span * (size - 8), size - 4 - (z - low[1]) / span * (size - 8)) for x, z in xz]
    heading = c2w[:, [0, 2], 2].double().numpy()
    out = []
    for t, frame in enumerate(frames):
        image = Image.fromarray(frame)
        draw = ImageDraw.Draw(image)
        draw.rectangle([0, 0, size, size], fill=(0, 0, 0))
        if len(points) > 1:
            draw.line(points, fill=(90, 90, 90), width=1)
            draw.line(points[:t + 1] if t else points[:2], fill=(255, 200, 0), width=1)
        x, y = points[t]
        draw.line([(x, y), (x + heading[t, 0] * size / 6, y - heading[t, 1] * size / 6)], fill=(255, 60, 60), width=1)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 60, 60))
        out.append(np.asarray(image))
    return np.stack(out)


def write_previews(dataset: Path, out: Path, scale: int = 4) -> list[Path]:
    """One ``NAME.mp4`` per clip under ``out``: the clip with its trajectory drawn over it."""
    from biwm.core.checkpoint import atomic_path
    from biwm.data.media import write_mp4

    manifest = read_manifest(dataset)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for clip in manifest.clips:
        tensors = read_clip(dataset, clip.name)
        frames = trajectory_frames(tensors["frames"].permute(0, 2, 3, 1).numpy(), tensors["c2w"], scale)
        path = out / f"{clip.name}.mp4"
        with atomic_path(path) as tmp:
            write_mp4(tmp, frames, clip.fps)
        written.append(path)
    return written
