"""``biwm data import``: videos + camera files in a peer's format -> a dataset folder (:mod:`biwm.data.store`).

Per clip: decode the video (mp4 through PyAV, or a folder of frames), read its camera file
(:mod:`biwm.data.formats`), check that there is one rigid, finite pose per frame, find its caption,
keep the part between its optional start and end, resample to the target fps, cut to ``1 + tf*k``
frames, and label every frame with one of the 81 actions by the toy world's rule
(:func:`biwm.core.camera.poses_to_actions`; a key or action file's own labels when no frame was
dropped between two kept ones). The dataset is written to a temporary folder and renamed when
complete: a failed import leaves nothing.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from biwm.core.camera import poses_to_actions
from biwm.core.checkpoint import atomic_folder, save_tensors
from biwm.data.formats import CAMERA_SUFFIXES, READERS, CameraInput, ReadOptions
from biwm.data.media import VIDEO_SUFFIXES, BadMedia, frame_files, read_video
from biwm.data.store import CLIPS, MANIFEST, ClipEntry, DatasetManifest, Skipped, clip_path

RIGID_TOLERANCE = 1e-3
CAPTION_FILES = ("captions.json", "captions.csv")


class ImportSettings(BaseModel):
    """The options of ``biwm data import`` (also recorded in the manifest)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["realestate10k", "poses", "keys", "biwm-actions"]
    fps: float | None = Field(None, gt=0, description="resample to this frame rate (default: the source's)")
    source_fps: float | None = Field(None, gt=0, description="frame rate of frame folders (mp4 files have one)")
    max_frames: int | None = Field(None, ge=1, description="keep at most this many frames per clip")
    temporal_factor: int = Field(4, ge=1, description="clips are cut to 1 + temporal_factor*k frames")
    move_step: float = Field(0.15, gt=0)
    turn_step_deg: float = Field(5.0, gt=0)
    fov_deg: float | None = Field(None, gt=0, lt=180)
    convention: Literal["auto", "c2w", "w2c"] = "auto"
    intrinsics: Literal["auto", "pixel", "normalized"] = "auto"
    axes: Literal["opencv", "opengl"] = "opencv"
    captions: Path | None = None
    default_caption: str | None = None


class Caption(BaseModel):
    model_config = ConfigDict(extra="forbid")

    caption: str | None = None
    start: float | None = Field(None, ge=0, description="seconds")
    end: float | None = Field(None, gt=0, description="seconds")


def find_videos(source: Path) -> list[Path]:
    """The clips of a source folder: its mp4 files and its sub-folders of frames, by name."""
    if not source.is_dir():
        raise BadMedia(f"{source}: not a folder; expected a folder of mp4 files or frame folders with camera files")
    videos = [p for p in source.iterdir() if (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
              or (p.is_dir() and not p.name.startswith(".") and frame_files(p))]
    return sorted(videos, key=lambda p: p.name)


def read_captions(source: Path, file: Path | None) -> tuple[dict[str, Caption], Path | None]:
    """Captions (and optional start/end seconds) by clip name, from ``file`` or the source folder's
    captions.json / captions.csv; JSON ``{name: caption}`` or ``{name: {caption, start, end}}``, CSV
    with columns ``name, caption[, start, end]``."""
    if file is None:
        file = next((source / n for n in CAPTION_FILES if (source / n).is_file()), None)
        if file is None:
            return {}, None
    if not file.is_file():
        raise BadMedia(f"{file}: not found; expected a captions JSON or CSV file")
    try:
        if file.suffix.lower() == ".csv":
            with file.open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            if rows and "name" not in rows[0]:
                raise BadMedia(f"{file}: columns {list(rows[0])}; expected name, caption[, start, end]")
            raw = {r.pop("name"): {k: v for k, v in r.items() if v not in (None, "")} for r in rows}
        else:
            raw = json.loads(file.read_text())
            if not isinstance(raw, dict):
                raise BadMedia(f"{file}: expected a JSON object mapping clip names to captions")
            raw = {k: ({"caption": v} if isinstance(v, str) else v) for k, v in raw.items()}
        return {name: Caption.model_validate(v) for name, v in raw.items()}, file
    except BadMedia:
        raise
    except (ValueError, TypeError) as error:
        raise BadMedia(f"{file}: not a captions file ({error}); expected JSON {{name: caption}} or CSV "
                       "name, caption[, start, end]") from None


def check_poses(c2w: np.ndarray, file: Path) -> None:
    """Finite, rigid (orthonormal rotation, determinant +1, bottom row 0 0 0 1) poses, or BadMedia."""
    finite = np.isfinite(c2w).all(axis=(1, 2))
    if not finite.all():
        raise BadMedia(f"{file}: frame {int(np.argmin(finite))}: pose holds NaN or inf; expected finite numbers")
    rotation = c2w[:, :3, :3]
    error = np.abs(rotation.transpose(0, 2, 1) @ rotation - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(rotation)
    bottom = np.abs(c2w[:, 3] - np.array([0.0, 0.0, 0.0, 1.0])).max(axis=1)
    bad = (error > RIGID_TOLERANCE) | (det < 0) | (bottom > RIGID_TOLERANCE)
    if bad.any():
        index = int(np.argmax(bad))
        raise BadMedia(f"{file}: frame {index}: pose is not rigid (max |R^T R - I| = {error[index]:.3g}, det R = "
                       f"{det[index]:.3g}); expected a rotation (orthonormal, det +1) and a translation")


def frame_indices(frames: int, fps: float, settings: ImportSettings, caption: Caption, video: Path) -> np.ndarray:
    """Source frames kept: those between start and end, resampled to the target fps, cut to
    ``1 + tf*k`` frames (at most ``max_frames``)."""
    first = 0 if caption.start is None else math.ceil(caption.start * fps - 1e-6)
    last = frames - 1 if caption.end is None else min(frames - 1, math.floor(caption.end * fps + 1e-6))
    target = settings.fps or fps
    if target > fps + 1e-6:
        raise BadMedia(f"{video}: {fps:g} fps; expected at least the target --fps {target:g} (no upsampling)")
    times = np.arange(0, (last - first) / fps + 1e-9, 1.0 / target)
    index = first + np.round(times * fps).astype(np.int64)
    tf = settings.temporal_factor
    keep = len(index) if settings.max_frames is None else min(len(index), settings.max_frames)
    keep = 1 + tf * ((keep - 1) // tf) if keep >= 1 else 0
    if keep < 1 + tf:
        raise BadMedia(f"{video}: {len(index)} frames at {target:g} fps between start and end; expected at least "
                       f"{1 + tf} (clips are cut to 1 + {tf}*k frames)")
    return index[:keep]


def import_clip(video: Path, source: Path, settings: ImportSettings, captions: dict[str, Caption],
                captions_file: Path | None) -> tuple[ClipEntry, dict[str, torch.Tensor]]:
    """One clip, checked and converted; raises :class:`BadMedia` naming the file at fault."""
    name = video.stem if video.is_file() else video.name
    camera_file = next((source / f"{name}{s}" for s in CAMERA_SUFFIXES[settings.format]
                        if (source / f"{name}{s}").is_file()), None)
    if camera_file is None:
        expected = " or ".join(f"{name}{s}" for s in CAMERA_SUFFIXES[settings.format])
        raise BadMedia(f"{video}: no camera file; expected {expected} beside it ({settings.format} format)")
    frames, video_fps = read_video(video)
    height, width = frames.shape[1:3]
    options = ReadOptions(width=width, height=height, temporal_factor=settings.temporal_factor,
                          move_step=settings.move_step, turn_step_deg=settings.turn_step_deg,
                          fov_deg=settings.fov_deg, convention=settings.convention,
                          intrinsics=settings.intrinsics, axes=settings.axes)
    camera: CameraInput = READERS[settings.format](camera_file, options)
    if len(camera.c2w) != len(frames):
        raise BadMedia(f"{camera_file}: {len(camera.c2w)} poses for the {len(frames)} frames of {video.name}; "
                       "expected one per frame")
    check_poses(camera.c2w, camera_file)
    fps = video_fps or settings.source_fps or camera.fps or settings.fps
    if fps is None:
        raise BadMedia(f"{video}: a folder of frames has no frame rate; expected --source-fps (or --fps)")
    entry = captions.get(name, Caption())
    caption = camera.caption if camera.caption is not None else entry.caption
    if caption is None:
        caption = settings.default_caption
    if caption is None:
        where = f"an entry {name!r} in {captions_file}" if captions_file else \
            f"a captions file ({' or '.join(str(source / n) for n in CAPTION_FILES)}, or --captions)"
        raise BadMedia(f"{video}: no caption; expected {where}, or --default-caption")
    index = frame_indices(len(frames), fps, settings, entry, video)
    c2w = torch.from_numpy(camera.c2w[index]).float()
    steps = {"move_step": settings.move_step, "turn_step_deg": settings.turn_step_deg}
    if camera.actions is not None and (np.diff(index) == 1).all():
        actions = torch.from_numpy(camera.actions[index]).long()  # the file's own labels, no frame dropped
    else:
        actions = poses_to_actions(c2w[None], **steps)[0]
    tensors = {"frames": torch.from_numpy(frames[index]).permute(0, 3, 1, 2).contiguous(), "c2w": c2w,
               "intrinsics": torch.from_numpy(camera.intrinsics).float(), "actions": actions}
    record = ClipEntry(name=name, frames=len(index), fps=settings.fps or fps, height=height, width=width,
                       caption=caption, video=str(video), camera=str(camera_file))
    return record, tensors


def import_dataset(source: Path, out: Path, settings: ImportSettings, skip_bad: bool = False, force: bool = False,
                   progress: Callable[[str], None] | None = None) -> DatasetManifest:
    """Import every clip of ``source`` into the dataset folder ``out``, which appears only when complete.
    A bad clip raises :class:`BadMedia`; with ``skip_bad`` it is left out and listed in the manifest's
    ``skipped`` (and ``out/skipped.json``)."""
    source, out = Path(source), Path(out)
    if out.exists() and not force:
        raise BadMedia(f"{out}: already exists; expected a new dataset folder (or --force to replace it)")
    videos = find_videos(source)
    if not videos:
        raise BadMedia(f"{source}: no videos; expected mp4 files or folders of PNG/JPEG frames, each with a "
                       f"{settings.format} camera file ({' or '.join(CAMERA_SUFFIXES[settings.format])}) of the "
                       "same name")
    captions, captions_file = read_captions(source, settings.captions)
    entries: list[ClipEntry] = []
    skipped: list[Skipped] = []
    fps_seen: set[float] = set()
    with atomic_folder(out) as tmp:
        (tmp / CLIPS).mkdir()
        for video in videos:
            try:
                entry, tensors = import_clip(video, source, settings, captions, captions_file)
            except BadMedia as error:
                if not skip_bad:
                    raise
                skipped.append(Skipped(file=str(video), error=str(error)))
            else:
                save_tensors(tensors, clip_path(tmp, entry.name))
                entries.append(entry)
                fps_seen.add(entry.fps)
            if progress is not None:
                progress(video.name)
        if not entries:
            raise BadMedia(f"{source}: every clip was bad; nothing imported. First problem: {skipped[0].error}")
        if len(fps_seen) > 1:
            raise BadMedia(f"{source}: clips at several frame rates {sorted(fps_seen)}; expected one: give --fps")
        manifest = DatasetManifest(format=settings.format, source=str(source), fps=fps_seen.pop(),
                                   temporal_factor=settings.temporal_factor, move_step=settings.move_step,
                                   turn_step_deg=settings.turn_step_deg, clips=entries, skipped=skipped)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        if skipped:
            (tmp / "skipped.json").write_text(json.dumps([s.model_dump() for s in skipped], indent=2) + "\n")
    return manifest

