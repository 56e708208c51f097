"""An imported dataset on disk, as ``biwm data import`` writes it and everything else reads it::

    DATASET/
      dataset.json             the manifest (:class:`DatasetManifest`): settings, clips, what was skipped
      clips/NAME.safetensors   per clip: frames uint8 [T, 3, H, W], c2w float32 [T, 4, 4] (OpenCV
                               camera-to-world), intrinsics float32 [3, 3] in pixels, actions int64 [T]
      cache/KEY/               latents and text embeddings of one backbone and resolution (biwm data cache)

Every clip file carries the SHA-256 of its tensors (:func:`biwm.core.checkpoint.save_tensors`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from biwm.core.camera import CameraTrack
from biwm.core.checkpoint import load_tensors

MANIFEST = "dataset.json"
CLIPS = "clips"
FORMAT_VERSION = 1


class ClipEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    frames: int = Field(ge=1)
    fps: float = Field(gt=0)
    height: int = Field(ge=1)
    width: int = Field(ge=1)
    caption: str
    video: str = Field(description="the source video (mp4 file or folder of frames)")
    camera: str = Field(description="the source camera file")


class Skipped(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    error: str


class DatasetManifest(BaseModel):
    """``dataset.json``: how the dataset was made and what it holds."""

    model_config = ConfigDict(extra="forbid")

    biwm_dataset: int = FORMAT_VERSION
    format: str
    source: str
    fps: float = Field(gt=0)
    temporal_factor: int = Field(ge=1)
    move_step: float = Field(gt=0, description="world units per translation action (action labels)")
    turn_step_deg: float = Field(gt=0, description="degrees per rotation action (action labels)")
    clips: list[ClipEntry]
    skipped: list[Skipped] = Field(default_factory=list)


class DatasetError(ValueError):
    """A dataset folder that cannot be read: the message names the file."""


def read_manifest(dataset: Path) -> DatasetManifest:
    path = Path(dataset) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: not found; expected a dataset folder written by biwm data import")
    try:
        return DatasetManifest.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as error:
        raise DatasetError(f"{path}: not a BiWM dataset manifest ({error})") from None


def clip_path(dataset: Path, name: str) -> Path:
    return Path(dataset) / CLIPS / f"{name}.safetensors"


def read_clip(dataset: Path, name: str) -> dict[str, torch.Tensor]:
    """One clip's tensors (frames, c2w, intrinsics in pixels, actions), checked against their checksum."""
    return load_tensors(clip_path(dataset, name), "dataset clip")


def normalized_intrinsics(pixel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pixel intrinsics [..., 3, 3] -> core's normalised ones (fx, cx by the width; fy, cy by the height)."""
    scale = torch.tensor([[1.0 / width], [1.0 / height], [1.0]], dtype=pixel.dtype)
    return pixel * scale


def clip_camera(tensors: dict[str, torch.Tensor], frames: slice = slice(None)) -> CameraTrack:
    """A clip's camera track [1, T] with normalised intrinsics."""
    height, width = tensors["frames"].shape[-2:]
    intrinsics = normalized_intrinsics(tensors["intrinsics"].float(), height, width)
    return CameraTrack(tensors["c2w"][None, frames].float(), intrinsics[None], tensors["actions"][None, frames])
