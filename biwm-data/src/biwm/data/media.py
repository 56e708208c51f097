"""Video in and out: mp4 through PyAV, and folders of image frames (PNG or JPEG).

Every reader raises :class:`BadMedia` naming the file and what was expected, so an import can
report (or, with ``--skip-bad``, skip) one bad clip and go on.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import numpy as np

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
VIDEO_SUFFIXES = (".mp4",)


class BadMedia(ValueError):
    """A clip that cannot be imported: the message names the file and what was expected."""


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def frame_files(folder: Path) -> list[Path]:
    """The image frames of a folder, in natural order (frame2 before frame10)."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES), key=_natural_key)


def read_video(path: Path) -> tuple[np.ndarray, float | None]:
    """Frames uint8 [T, H, W, 3] and frames per second (None for a folder of frames) of an mp4 file
    or a folder of image frames."""
    return _read_folder(path) if path.is_dir() else _read_mp4(path)


def _read_mp4(path: Path) -> tuple[np.ndarray, float]:
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadMedia(f"{path}: no video stream; expected an mp4 file with one")
            stream = container.streams.video[0]
            declared = stream.frames
            rate = stream.average_rate or stream.guessed_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except BadMedia:
        raise
    except (av.FFmpegError, OSError, ValueError) as error:
        raise BadMedia(f"{path}: not a readable mp4 video ({error}); expected an mp4 file that PyAV "
                       "(FFmpeg) decodes") from None
    if not frames:
        raise BadMedia(f"{path}: no frames decoded; expected an mp4 file with at least one video frame")
    if declared and len(frames) < declared:
        raise BadMedia(f"{path}: truncated: {len(frames)} of the {declared} frames its header declares decoded")
    if not rate:
        raise BadMedia(f"{path}: no frame rate in the stream; expected an mp4 file with one")
    return np.stack(frames), float(rate)


def _read_folder(folder: Path) -> tuple[np.ndarray, None]:
    from PIL import Image, UnidentifiedImageError

    files = frame_files(folder)
    if not files:
        raise BadMedia(f"{folder}: no frames; expected image files ({', '.join(FRAME_SUFFIXES)}) in the folder")
    frames = []
    for file in files:
        try:
            with Image.open(file) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as error:
            raise BadMedia(f"{file}: not a readable image ({error}); expected a PNG or JPEG frame") from None
        if frames[-1].shape != frames[0].shape:
            raise BadMedia(f"{file}: {frames[-1].shape[1]}x{frames[-1].shape[0]} pixels; expected "
                           f"{frames[0].shape[1]}x{frames[0].shape[0]} like {files[0].name}")
    return np.stack(frames), None


def write_mp4(path: Path, frames: np.ndarray, fps: float, lossless: bool = False) -> None:
    """Frames uint8 [T, H, W, 3] as an H.264 mp4: yuv420p (what players expect; lossy), or with
    ``lossless`` libx264rgb at qp 0 (RGB kept exactly)."""
    import av

    height, width = frames.shape[1:3]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264",
                                      rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = {"qp": "0"} if lossless else {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """Frames uint8 [T, H, W, 3] as ``folder/00000.png`` ... (lossless)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{index:05d}.png")
