"""The camera formats peers use, read into one convention and written back (for round trips).

Every reader turns a clip's camera file into :class:`CameraInput`: camera-to-world poses in the
OpenCV convention of :mod:`biwm.core.camera` (x right, y down, z forward) and pixel intrinsics,
plus the action labels when the file holds actions rather than poses.

- ``realestate10k``: ``NAME.txt``; a URL line, then per frame ``timestamp fx fy cx cy 0 0`` and a
  3x4 world-to-camera matrix row by row (19 numbers), intrinsics normalised by the image size,
  timestamps in microseconds.
- ``poses``: ``NAME.npz`` with 4x4 (or 3x4) matrices under ``c2w`` or ``w2c`` (or ``poses``, with
  ``--convention``) and intrinsics under ``intrinsics`` or ``K`` ([3, 3], [T, 3, 3] or fx fy cx cy),
  pixel or normalised (``--intrinsics``, or told apart by the principal point: normalised lies in
  [0, 1]); or ``NAME.npy``, the matrices alone (``--convention``, ``--fov-deg``). Read with
  ``allow_pickle=False``.
- ``keys``: ``NAME.keys``, a minWM-style key string, one action per video frame: ``w*8,a*4,up*2``
  (w/s/a/d move, i/k/j/l or up/down/left/right turn, ``_`` idle, ``wa`` or ``w+up`` together).
- ``biwm-actions``: ``NAME.json``, ``{"caption": ..., "action_frames": "up-4, right-8, s-7"}``;
  counts in latent frames: latent frame 0 is video frame 0, each later one ``temporal_factor``
  video frames.

Key and action formats integrate their labels into poses from the identity with the dataset's
move and turn steps (:func:`biwm.core.camera.actions_to_poses`): they carry no start pose.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from biwm.core.camera import actions_to_poses, format_keys, parse_keys
from biwm.data.media import BadMedia

Format = Literal["realestate10k", "poses", "keys", "biwm-actions"]
FORMATS: tuple[str, ...] = ("realestate10k", "poses", "keys", "biwm-actions")
CAMERA_SUFFIXES: dict[str, tuple[str, ...]] = {
    "realestate10k": (".txt",), "poses": (".npz", ".npy"), "keys": (".keys",), "biwm-actions": (".json",)}
_ARROWS = {"up": "i", "down": "k", "left": "j", "right": "l"}
_ARROW_OF = {letter: word for word, letter in _ARROWS.items()}
_IDLE = ("_", "idle", "none")
_OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass
class ReadOptions:
    """What a reader needs beyond the file (the import's settings)."""

    width: int
    height: int
    temporal_factor: int = 4
    move_step: float = 0.15
    turn_step_deg: float = 5.0
    fov_deg: float | None = None
    convention: Literal["auto", "c2w", "w2c"] = "auto"
    intrinsics: Literal["auto", "pixel", "normalized"] = "auto"
    axes: Literal["opencv", "opengl"] = "opencv"


@dataclass
class CameraInput:
    """One clip's camera, normalised: ``c2w`` [T, 4, 4] OpenCV camera-to-world, ``intrinsics`` [3, 3]
    in pixels, ``actions`` [T] when the file gave labels, its ``caption`` and frame rate if it has them."""

    c2w: np.ndarray
    intrinsics: np.ndarray
    actions: np.ndarray | None = None
    caption: str | None = None
    fps: float | None = None


# ----------------------------------------------------------------------------- intrinsics


def _pixel_intrinsics(values: np.ndarray, kind: str, options: ReadOptions, file: Path) -> np.ndarray:
    """fx fy cx cy (4,) -> a pixel 3x3; ``kind`` pixel, normalized or auto (with a check)."""
    fx, fy, cx, cy = (float(v) for v in values)
    if not all(math.isfinite(v) for v in (fx, fy, cx, cy)) or fx <= 0 or fy <= 0:
        raise BadMedia(f"{file}: intrinsics fx={fx:g} fy={fy:g} cx={cx:g} cy={cy:g}; expected finite, positive "
                       "focal lengths")
    if kind == "auto":
        kind = "normalized" if cx <= 1 and cy <= 1 else "pixel"
    if kind == "normalized":
        fx, fy, cx, cy = fx * options.width, fy * options.height, cx * options.width, cy * options.height
    if not (0 < cx < options.width and 0 < cy < options.height):
        raise BadMedia(f"{file}: principal point ({cx:g}, {cy:g}) in pixels lies outside the "
                       f"{options.width}x{options.height} image; expected it inside (are the intrinsics "
                       f"{'normalised' if kind == 'pixel' else 'in pixels'}? give --intrinsics)")
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def _fov_intrinsics(options: ReadOptions, file: Path, what: str) -> np.ndarray:
    if options.fov_deg is None:
        raise BadMedia(f"{file}: {what} carries no intrinsics; expected --fov-deg (the horizontal field of view)")
    fx = 0.5 * options.width / math.tan(math.radians(options.fov_deg) / 2)
    return np.array([[fx, 0.0, options.width / 2], [0.0, fx, options.height / 2], [0.0, 0.0, 1.0]])


def _as_4x4(matrices: np.ndarray, file: Path) -> np.ndarray:
    if matrices.ndim != 3 or matrices.shape[1:] not in ((4, 4), (3, 4)):
        raise BadMedia(f"{file}: poses of shape {list(matrices.shape)}; expected [T, 4, 4] or [T, 3, 4]")
    if matrices.shape[1] == 3:
        bottom = np.broadcast_to(np.array([0.0, 0.0, 0.0, 1.0]), (matrices.shape[0], 1, 4))
        matrices = np.concatenate([matrices, bottom], axis=1)
    return matrices.astype(np.float64)


def _inverse(matrices: np.ndarray) -> np.ndarray:
    """Inverse of rigid [T, 4, 4] transforms (c2w from w2c)."""
    out = np.zeros_like(matrices)
    rotation_t = matrices[:, :3, :3].transpose(0, 2, 1)
    out[:, :3, :3] = rotation_t
    out[:, :3, 3] = -(rotation_t @ matrices[:, :3, 3:])[..., 0]
    out[:, 3, 3] = 1.0
    return out


# ----------------------------------------------------------------------------- readers


def read_realestate10k(file: Path, options: ReadOptions) -> CameraInput:
    lines = [line for line in file.read_text(errors="replace").splitlines() if line.strip()]
    if len(lines) < 2:
        raise BadMedia(f"{file}: {len(lines)} lines; expected a URL line, then one line per frame")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            values = [float(v) for v in line.split()]
        except ValueError:
            values = []
        if len(values) != 19:
            raise BadMedia(f"{file}:{number}: expected 19 numbers (timestamp fx fy cx cy 0 0 and a 3x4 "
                           f"world-to-camera matrix), got {line[:80]!r}")
        rows.append(values)
    table = np.array(rows)
    w2c = _as_4x4(table[:, 7:].reshape(-1, 3, 4), file)
    intrinsics = _pixel_intrinsics(table[0, 1:5], "normalized", options, file)
    stamps = np.diff(table[:, 0])
    fps = 1e6 / float(np.median(stamps)) if len(stamps) and np.median(stamps) > 0 else None
    return CameraInput(_inverse(w2c), intrinsics, fps=fps)


def read_poses(file: Path, options: ReadOptions) -> CameraInput:
    try:
        loaded = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise BadMedia(f"{file}: not a readable {file.suffix} file ({error}); expected numpy pose arrays") from None
    convention = options.convention
    if isinstance(loaded, np.ndarray):
        matrices, intrinsics = loaded, _fov_intrinsics(options, file, "a .npy pose file")
    else:
        with loaded:
            names = set(loaded.files)
            key = next((k for k in ("c2w", "w2c", "poses") if k in names), None)
            if key is None:
                raise BadMedia(f"{file}: arrays {sorted(names)}; expected poses under 'c2w', 'w2c' or 'poses'")
            if key != "poses":
                if convention not in ("auto", key):
                    raise BadMedia(f"{file}: poses are stored as {key!r} but --convention {convention} was given")
                convention = key
            matrices = loaded[key]
            k_key = next((k for k in ("intrinsics", "K") if k in names), None)
            if k_key is None:
                intrinsics = _fov_intrinsics(options, file, "this .npz (no 'intrinsics' or 'K')")
            else:
                values = np.asarray(loaded[k_key], dtype=np.float64)
                values = values.reshape(-1, *values.shape[-2:])[0] if values.ndim >= 2 else values
                if values.shape == (3, 3):
                    values = np.array([values[0, 0], values[1, 1], values[0, 2], values[1, 2]])
                if values.shape != (4,):
                    raise BadMedia(f"{file}: intrinsics of shape {list(loaded[k_key].shape)}; expected [3, 3], "
                                   "[T, 3, 3] or [4] (fx fy cx cy)")
                intrinsics = _pixel_intrinsics(values, options.intrinsics, options, file)
    if convention == "auto":
        raise BadMedia(f"{file}: cannot tell camera-to-world from world-to-camera; expected arrays named 'c2w' or "
                       "'w2c', or --convention c2w|w2c")
    matrices = _as_4x4(np.asarray(matrices), file)
    c2w = matrices if convention == "c2w" else _inverse(matrices)
    if options.axes == "opengl":
        c2w = c2w @ _OPENGL_TO_OPENCV
    return CameraInput(c2w, intrinsics)


def _key_token(text: str) -> str:
    """A token of the keys and action formats (``up*2``, ``w+left``, ``wa``) -> core's (``i*2``, ``wj``)."""
    name, star, count = text.strip().lower().partition("*")
    parts = name.split("+") if "+" in name else [name]
    if any(p in _IDLE for p in parts):
        letters = "_" if len(parts) == 1 else "?"
    else:
        letters = "".join(_ARROWS.get(p, p) for p in parts)
    return letters + (f"*{count}" if star else "")


def _keys_to_labels(tokens: list[str], file: Path) -> np.ndarray:
    try:
        return parse_keys(",".join(_key_token(t) for t in tokens)).numpy()
    except ValueError as error:
        raise BadMedia(f"{file}: {error} (or up/down/left/right for i/k/j/l)") from None


def _integrate(labels: np.ndarray, options: ReadOptions) -> np.ndarray:
    poses = actions_to_poses(torch.from_numpy(labels)[None], move_step=options.move_step,
                             turn_step_deg=options.turn_step_deg)
    return poses[0].double().numpy()


def read_keys(file: Path, options: ReadOptions) -> CameraInput:
    text = file.read_text(errors="replace").strip()
    labels = _keys_to_labels([t for t in text.replace("\n", ",").split(",") if t.strip()], file)
    return CameraInput(_integrate(labels, options), _fov_intrinsics(options, file, "a key string"), actions=labels)


def read_biwm_actions(file: Path, options: ReadOptions) -> CameraInput:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadMedia(f"{file}: not valid JSON ({error}); expected "
                       '{"caption": ..., "action_frames": "up-4, right-8, s-7"}') from None
    if not isinstance(data, dict) or not isinstance(data.get("action_frames"), str):
        raise BadMedia(f"{file}: expected a JSON object with \"action_frames\": \"up-4, right-8, s-7\" (and a caption)")
    tokens = []
    for item in data["action_frames"].split(","):
        match = re.fullmatch(r"\s*([A-Za-z_+]+)\s*-\s*(\d+)\s*", item)
        if match is None:
            raise BadMedia(f"{file}: action_frames item {item.strip()!r}; expected NAME-COUNT such as 'up-4' "
                           "(the count in latent frames)")
        tokens.append(f"{match.group(1)}*{match.group(2)}")
    latent = _keys_to_labels(tokens, file)
    # latent frame 0 is one video frame, every later latent frame temporal_factor of them
    labels = np.concatenate([latent[:1], np.repeat(latent[1:], options.temporal_factor)])
    caption = data.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise BadMedia(f"{file}: caption is {type(caption).__name__}; expected a string")
    return CameraInput(_integrate(labels, options), _fov_intrinsics(options, file, "an action JSON"),
                       actions=labels, caption=caption)


READERS: dict[str, Callable[[Path, ReadOptions], CameraInput]] = {
    "realestate10k": read_realestate10k, "poses": read_poses, "keys": read_keys, "biwm-actions": read_biwm_actions}


# ----------------------------------------------------------------------------- writers


def _fmt(values) -> str:
    return " ".join(f"{float(v):.10g}" for v in values)


def write_camera(fmt: str, folder: Path, name: str, c2w: np.ndarray, intrinsics: np.ndarray, actions: np.ndarray,
                 fps: float, width: int, height: int, caption: str = "", temporal_factor: int = 4) -> Path:
    """Write one clip's camera in ``fmt`` (the inverse of its reader): ``c2w`` [T, 4, 4] OpenCV,
    ``intrinsics`` [3, 3] normalised (core's convention), ``actions`` [T]. Returns the file."""
    suffix = CAMERA_SUFFIXES[fmt][0]
    path = folder / f"{name}{suffix}"
    if fmt == "realestate10k":
        w2c = _inverse(np.asarray(c2w, dtype=np.float64))
        fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
        lines = [f"https://biwm.invalid/{name}"]
        for index, matrix in enumerate(w2c):
            lines.append(_fmt([round(index * 1e6 / fps), fx, fy, cx, cy, 0, 0, *matrix[:3].reshape(-1)]))
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "poses":
        pixel = np.array(intrinsics, dtype=np.float64) * np.array([[width], [height], [1.0]])
        np.savez(path, c2w=np.asarray(c2w, dtype=np.float64), intrinsics=pixel)
    elif fmt == "keys":
        path.write_text(format_keys(actions.tolist()) + "\n")
    elif fmt == "biwm-actions":
        path.write_text(json.dumps({"caption": caption, "action_frames": action_frames(actions, temporal_factor)},
                                   indent=2) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
    return path


def action_frames(actions: np.ndarray, temporal_factor: int) -> str:
    """Per-video-frame labels [1 + tf*k] -> the action JSON's ``"up-4, right-8"`` (counts in latent
    frames). Every latent frame's video frames must share one label."""
    actions = np.asarray(actions)
    if (len(actions) - 1) % temporal_factor:
        raise ValueError(f"{len(actions)} frames; the action JSON needs 1 + {temporal_factor}*k")
    groups = actions[1:].reshape(-1, temporal_factor)
    if (groups != groups[:, :1]).any():
        raise ValueError("the action JSON holds one action per latent frame; these actions change within one")
    latent = np.concatenate([actions[:1], groups[:, 0]])
    items = []
    for token in format_keys(latent.tolist()).split(","):
        keys, _, count = token.partition("*")
        name = "idle" if keys == "_" else "+".join(
            [k for k in keys if k not in _ARROW_OF] + [_ARROW_OF[k] for k in keys if k in _ARROW_OF])
        items.append(f"{name}-{count or 1}")
    return ", ".join(items)
