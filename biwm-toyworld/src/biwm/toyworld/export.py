"""Toy-world clips written in the formats peers use (``biwm data toyworld --format ...``), so that
``biwm data import`` can be checked against the ground truth. Needs biwm-data (its writers).

OUT holds per clip ``clipNNNN.mp4`` (or a folder ``clipNNNN/`` of PNG frames: lossless) and its
camera file, ``captions.json``, and the ground truth as ``clips.safetensors`` + ``config.json``
(:func:`biwm.toyworld.world.write_dataset`'s layout), whose ``start_c2w`` is the pose before each
clip's first action: key and action formats carry no start pose, so their poses are the truth's
seen from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from biwm.core.camera import PITCH_LIMIT_DEG, split_action
from biwm.core.checkpoint import atomic_folder
from biwm.toyworld.world import ToyClips, ToyWorldConfig, make_scenes, random_actions, render_clips, split_seeds

FPS = 8.0


def latent_held_actions(seeds: list[int], frames: int, config: ToyWorldConfig, temporal_factor: int) -> torch.Tensor:
    """The random policy at latent rate, each label held for its latent frame's video frames (frame 0
    alone, then ``temporal_factor`` each), with pitch turns that would reach the pitch limit dropped,
    so that the labels stay the moves that happen (the action JSON holds one per latent frame)."""
    latent = 1 + (frames - 1) // temporal_factor
    labels = random_actions(seeds, latent, config)
    turn, limit = config.turn_step_deg, PITCH_LIMIT_DEG
    for row in range(labels.shape[0]):
        pitch = 0.0
        for j in range(latent):
            count = 1 if j == 0 else temporal_factor
            translation, rotation = split_action(int(labels[row, j]))
            step = {3: 1, 5: 1, 6: 1, 4: -1, 7: -1, 8: -1}.get(rotation, 0)  # pitch_up / pitch_down components
            if abs(pitch + step * turn * count) >= limit:
                rotation = {3: 0, 4: 0, 5: 1, 6: 2, 7: 1, 8: 2}[rotation]  # keep the yaw part
                step = 0
            pitch += step * turn * count
            labels[row, j] = translation * 9 + rotation
    held = torch.cat([labels[:, :1], labels[:, 1:].repeat_interleave(temporal_factor, dim=1)], dim=1)
    return held[:, :frames]


def write_formatted(out: Path, fmt: str, clips: int, frames: int, config: ToyWorldConfig, split: str = "train",
                    seed_start: int = 0, media: str = "mp4", lossless: bool = False, temporal_factor: int = 4,
                    caption: str = "a toy room") -> Path:
    """Render clips and write them in ``fmt`` with ``media`` (mp4 or frames) to ``out`` (atomically)."""
    try:
        from biwm.data.formats import FORMATS, write_camera
        from biwm.data.media import write_frames, write_mp4
    except ImportError as error:
        raise RuntimeError(f"--format needs biwm-data (its format writers): pip install biwm-data ({error})") from None
    if fmt not in FORMATS:
        raise ValueError(f"--format: {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    if fmt == "biwm-actions" and (frames - 1) % temporal_factor:
        raise ValueError(f"--frames: {frames}; the action JSON needs 1 + {temporal_factor}*k frames")
    seeds = split_seeds(split, clips, seed_start)  # type: ignore[arg-type]
    if fmt == "biwm-actions":
        rendered = render_clips(seeds, frames, config, actions=latent_held_actions(seeds, frames, config,
                                                                                   temporal_factor),
                                keep_clearance=False)
    else:
        rendered = render_clips(seeds, frames, config)
    start = make_scenes(seeds, config).start_c2w
    with atomic_folder(out) as tmp:
        captions = {}
        for index in range(clips):
            name = f"clip{index:04d}"
            video = rendered.frames[index].permute(0, 2, 3, 1).numpy()
            if media == "frames":
                write_frames(tmp / name, video)
            else:
                write_mp4(tmp / f"{name}.mp4", video, FPS, lossless=lossless)
            write_camera(fmt, tmp, name, rendered.camera.c2w[index].double().numpy(),
                         rendered.camera.intrinsics[index].double().numpy(), rendered.camera.actions[index].numpy(),
                         FPS, config.width, config.height, caption=caption, temporal_factor=temporal_factor)
            captions[name] = caption
        (tmp / "captions.json").write_text(json.dumps(captions, indent=2) + "\n")
        _write_truth(tmp, rendered, start, config, fmt, media)
    return out


def _write_truth(folder: Path, clips: ToyClips, start: torch.Tensor, config: ToyWorldConfig, fmt: str,
                 media: str) -> None:
    from biwm.core.checkpoint import save_tensors

    tensors = {"frames": clips.frames, "c2w": clips.camera.c2w, "intrinsics": clips.camera.intrinsics,
               "actions": clips.camera.actions, "seeds": torch.tensor(clips.seeds), "start_c2w": start}
    save_tensors(tensors, folder / "clips.safetensors")
    description = {"format": fmt, "media": media, "fps": FPS, "num_clips": len(clips.seeds),
                   "num_frames": clips.frames.shape[1], "config": config.model_dump(mode="json"),
                   "fov_deg": config.fov_deg, "move_step": config.move_step, "turn_step_deg": config.turn_step_deg}
    (folder / "config.json").write_text(json.dumps(description, indent=2) + "\n")

