"""Training/evaluation data as latents: clips encoded once by the backbone's codec.

``LatentClips`` keeps, per clip, latents [C, F, h, w] and a camera track at video rate aligned
with the latent frames (``temporal_factor`` entries per latent frame; the first latent frame,
which a causal video VAE encodes from one frame, repeats that frame's camera), and, for a dataset
whose clips have captions of their own, their text conditioning (one row per clip).

The stages read clips from a dataset plugin (a :class:`biwm.core.protocols.ClipSource`, made by
:func:`biwm.core.recipe.dataset_for`); core has none of its own. The toy world, the default of a
recipe's ``data:``, is the ``toyworld`` dataset of biwm-toyworld (:mod:`biwm.toyworld.data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack
from biwm.core.protocols import Backbone
from biwm.core.text import TextConditioning


class FrameClips(Protocol):
    """Clips of video frames, as :func:`encode_clips` reads them (a dataset's rendered or decoded clips)."""

    frames: Tensor  # [N, T, 3, H, W] uint8
    camera: CameraTrack  # [N, T] video rate
    seeds: list[int]  # one id per clip


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
    text: TextConditioning | None = None  # one row per clip: its own caption's; None: the dataset's prompt for all

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_latent_frames(self) -> int:
        return self.latents.shape[2]

    def to(self, device: torch.device | str) -> "LatentClips":
        """Latents, cameras and text on ``device`` (ground-truth frames stay where they are)."""
        return LatentClips(self.latents.to(device), self.camera.to(device), self.frames, self.seeds,
                           self.text.to(device) if self.text is not None else None)


@torch.no_grad()
def encode_clips(clips: FrameClips, backbone: Backbone, batch_size: int = 16, device: torch.device | str = "cpu",
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
