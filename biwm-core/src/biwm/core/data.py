"""Training/evaluation data as latents: clips encoded once by the backbone's codec.

``LatentClips`` keeps, per clip, latents [C, F, h, w] and a camera track at video rate aligned
with the latent frames (``temporal_factor`` entries per latent frame; the first latent frame,
which a causal video VAE encodes from one frame, repeats that frame's camera).

The stages read clips from a dataset plugin (a :class:`biwm.core.protocols.ClipSource`, made by
:func:`biwm.core.recipe.dataset_for`); the built-in one is the toy world, :class:`ToyWorldDataset`
with options :class:`ToyWorldData` (a recipe's ``data:`` with ``source: toyworld``, the default).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from biwm.core.camera import CameraTrack
from biwm.core.checkpoint import atomic_save_tensors, load_tensors
from biwm.core.config import Strict
from biwm.core.protocols import Backbone
from biwm.core.toyworld import ToyClips, ToyWorldConfig, random_actions, render_clips, split_seeds, still_stretches


def video_frames_for(latent_frames: int, temporal_factor: int) -> int:
    return 1 + temporal_factor * (latent_frames - 1)


def latent_aligned_camera(camera: CameraTrack, temporal_factor: int) -> CameraTrack:
    """Video-rate track of T = 1 + tf*(F-1) frames -> F*tf frames, one group per latent frame."""
    if temporal_factor == 1:
        return camera
    index = torch.cat([torch.zeros(temporal_factor - 1, dtype=torch.long), torch.arange(camera.num_frames)])
    return camera.frames(index.to(camera.c2w.device))


@dataclass
class LatentClips:
    latents: Tensor  # [N, C, F, h, w]
    camera: CameraTrack  # [N, F * tf] video rate, latent-aligned
    frames: Tensor | None  # [N, T, 3, H, W] uint8 ground truth (evaluation)
    seeds: list[int]

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_latent_frames(self) -> int:
        return self.latents.shape[2]

    def to(self, device: torch.device | str) -> "LatentClips":
        """Latents and cameras on ``device`` (ground-truth frames stay where they are)."""
        return LatentClips(self.latents.to(device), self.camera.to(device), self.frames, self.seeds)


@torch.no_grad()
def encode_clips(clips: ToyClips, backbone: Backbone, batch_size: int = 16, device: torch.device | str = "cpu",
                 keep_frames: bool = False) -> LatentClips:
    tf = backbone.temporal_factor
    n, t = clips.frames.shape[:2]
    if (t - 1) % tf:
        raise ValueError(f"clips have {t} frames; a codec with temporal factor {tf} needs 1 + {tf}*k frames")
    out = []
    for i in range(0, n, batch_size):
        video = clips.frames[i:i + batch_size].to(device).float().div(127.5).sub(1).transpose(1, 2)
        out.append(backbone.encode_video(video).float().cpu())
    return LatentClips(torch.cat(out), latent_aligned_camera(clips.camera, tf),
                       clips.frames if keep_frames else None, list(clips.seeds))


def toyworld_latents(split: str, count: int, latent_frames: int, config: ToyWorldConfig, backbone: Backbone,
                     cache_dir: Path | None, cache_key: str, device: torch.device | str = "cpu",
                     keep_frames: bool = False, start: int = 0, still_fraction: float = 0.0) -> LatentClips:
    """Render + encode toy-world clips ``start .. start+count-1`` of ``split``, cached as safetensors
    under ``cache_dir`` by content key. ``still_fraction`` of the clips (chosen by seed) hold the
    camera still over a stretch of half to all of their frames (:func:`biwm.core.toyworld.still_stretches`)."""
    frames = video_frames_for(latent_frames, backbone.temporal_factor)
    key_parts = [split, count, frames, config.model_dump(mode="json"), cache_key] + ([start] if start else []) + (
        [{"still_fraction": still_fraction}] if still_fraction else [])
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"{split}-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        t = load_tensors(path, "data cache file")
        camera = CameraTrack(t["c2w"], t["intrinsics"], t["actions"])
        return LatentClips(t["latents"], camera, t.get("frames"), t["seeds"].tolist())
    seeds = split_seeds(split, count, start)  # type: ignore[arg-type]
    actions = None
    if still_fraction:
        actions = torch.where(still_stretches(seeds, frames, still_fraction), 0, random_actions(seeds, frames, config))
    clips = render_clips(seeds, frames, config, actions=actions, device=device).to("cpu")
    data = encode_clips(clips, backbone, device=device, keep_frames=keep_frames)
    if path is not None:
        tensors = {"latents": data.latents, "c2w": data.camera.c2w, "intrinsics": data.camera.intrinsics,
                   "actions": data.camera.actions, "seeds": torch.tensor(data.seeds, dtype=torch.long)}
        if data.frames is not None:
            tensors["frames"] = data.frames
        atomic_save_tensors(tensors, path)
    return data


class ToyWorldData(Strict):
    """Options of the built-in ``toyworld`` dataset: a recipe's ``data:`` (``source`` defaults to it)."""

    source: Literal["toyworld"] = "toyworld"
    train_clips: int = Field(256, ge=1)
    heldout_clips: int = Field(8, ge=1)
    frames: int = Field(16, ge=2, description="video frames per clip")
    prompt: str = ""
    toyworld: ToyWorldConfig = Field(default_factory=ToyWorldConfig)
    still_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of the training clips that hold the "
                                  "camera still over half to all of their frames (held-out clips never do): the "
                                  "random policy alone almost never holds it still for a whole chunk")


class ToyWorldDataset:
    """The procedural toy world as a :class:`biwm.core.protocols.ClipSource`: clips rendered from
    per-split seeds and encoded by the backbone (:func:`toyworld_latents`)."""

    def __init__(self, options: ToyWorldData):
        self.options = options
        self.prompt, self.train_clips, self.frames = options.prompt, options.train_clips, options.frames
        self.toyworld = options.toyworld

    def latents(self, split: str, count: int, latent_frames: int, backbone: Backbone, cache_dir: Path | None,
                cache_key: str, device: torch.device | str = "cpu", keep_frames: bool = False,
                start: int = 0) -> LatentClips:
        return toyworld_latents(split, count, latent_frames, self.toyworld, backbone, cache_dir, cache_key,
                                device=device, keep_frames=keep_frames, start=start,
                                still_fraction=self.options.still_fraction if split == "train" else 0.0)
