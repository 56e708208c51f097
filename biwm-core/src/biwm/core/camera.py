"""Camera maths shared by the whole toolkit: poses, intrinsics, the 81 actions, Plücker rays.

Conventions
-----------
- Camera axes are OpenCV's: x right, y down, z forward.
- The world frame is y-down too, so "up" is -y. The floor is the plane y = 0 and a camera at
  eye height e sits at y = -e. The identity pose is a level camera at the origin looking
  along +z with +x to its right.
- Poses are camera-to-world 4x4 matrices ``c2w`` (rotation columns = camera axes in world
  coordinates, last column = camera centre), float32.
- Camera orientation is yaw then pitch, never roll: ``R = R_y(yaw) @ R_x(pitch)``. The horizontal
  heading is ``(sin yaw, 0, cos yaw)``, so yaw grows when the view turns right (a positive
  rotation about the down axis); pitch > 0 tilts the view up (a positive rotation about the
  camera's own x axis). Pitch is clamped to +-PITCH_LIMIT_DEG.
- Intrinsics are normalised 3x3 matrices ``[[fx, s, cx], [0, fy, cy], [0, 0, 1]]``: fx and fy in
  units of image width and height, cx and cy in [0, 1], so one matrix serves any resolution.
  Pixel (u, v) of an (h, w) image has normalised coordinates ((u + 0.5) / w, (v + 0.5) / h).

Actions
-------
``label = translation * 9 + rotation`` with the names in TRANSLATIONS and ROTATIONS.
``actions[:, t]`` is the move that took the camera from frame t-1 to frame t (``actions[:, 0]``
is the move from a start pose into the first frame). A step first translates along the heading
of the previous pose on the horizontal plane (pitch ignored; diagonals have the same length as
straight moves), then turns: yaw about the world up axis, pitch about the camera's x axis.
Diagonal rotations turn a full step on both axes, as pressing two keys would.

Keys (minWM style): ``"w*8,a*4,j*2"``; w/s forward/back, a/d left/right, i/k pitch up/down,
j/l yaw left/right, ``_`` idle. A token may combine keys (``"wa*3"``, ``"wj"``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

NUM_ACTIONS = 81
PITCH_LIMIT_DEG = 60.0

TRANSLATIONS = (
    "none", "forward", "back", "left", "right",
    "forward_left", "forward_right", "back_left", "back_right",
)  # fmt: skip
ROTATIONS = (
    "none", "yaw_left", "yaw_right", "pitch_up", "pitch_down",
    "up_left", "up_right", "down_left", "down_right",
)  # fmt: skip

# (forward, right) and (yaw_right, pitch_up) components of each translation / rotation index.
_TRANSLATION_AXES = ((0, 0), (1, 0), (-1, 0), (0, -1), (0, 1), (1, -1), (1, 1), (-1, -1), (-1, 1))
_ROTATION_AXES = ((0, 0), (-1, 0), (1, 0), (0, 1), (0, -1), (-1, 1), (1, 1), (-1, -1), (1, -1))
# Rotation index for [yaw_right + 1][pitch_up + 1].
_ROTATION_LOOKUP = [[_ROTATION_AXES.index((yaw, pitch)) for pitch in (-1, 0, 1)] for yaw in (-1, 0, 1)]

# Canonical key order for format_keys; each key sets one component of (forward, right, yaw, pitch).
_KEYS = {"w": (0, 1), "s": (0, -1), "a": (1, -1), "d": (1, 1),
         "i": (3, 1), "k": (3, -1), "j": (2, -1), "l": (2, 1)}  # fmt: skip
_IDLE_KEY = "_"
_KEY_HELP = (
    "allowed keys: w/s (forward/back), a/d (left/right), i/k (pitch up/down), "
    "j/l (yaw left/right), _ (idle); write tokens like 'w*8' or 'wa*3' separated by commas"
)
_TOKEN = re.compile(r"^([a-z_]+)(?:\*(\d+))?$")


# ----------------------------------------------------------------------------- action labels


def action_label(translation: int | Tensor, rotation: int | Tensor) -> int | Tensor:
    """Combine translation and rotation indices (ints or tensors) into an action label."""
    if isinstance(translation, int) and isinstance(rotation, int):
        if not (0 <= translation < 9 and 0 <= rotation < 9):
            raise ValueError(f"translation and rotation must be in [0, 8], got {translation}, {rotation}")
    return translation * 9 + rotation


def split_action(label: int | Tensor) -> tuple[int | Tensor, int | Tensor]:
    """Split an action label (int or tensor) into (translation, rotation) indices."""
    if isinstance(label, int) and not 0 <= label < NUM_ACTIONS:
        raise ValueError(f"action label must be in [0, {NUM_ACTIONS - 1}], got {label}")
    return label // 9, label % 9


def _label_from_components(forward: int, right: int, yaw: int, pitch: int) -> int:
    return _TRANSLATION_AXES.index((forward, right)) * 9 + _ROTATION_AXES.index((yaw, pitch))


# ----------------------------------------------------------------------------- key strings


def _parse_token(token: str) -> tuple[int, int]:
    match = _TOKEN.match(token)
    if match is None:
        raise ValueError(f"bad key token {token!r}; {_KEY_HELP}")
    keys, count = match.group(1), match.group(2)
    repeat = 1 if count is None else int(count)
    if repeat < 1:
        raise ValueError(f"bad count in key token {token!r}: must be >= 1; {_KEY_HELP}")
    if keys == _IDLE_KEY:
        return 0, repeat
    if _IDLE_KEY in keys:
        raise ValueError(f"idle key '_' cannot be combined with other keys in token {token!r}; {_KEY_HELP}")
    components = [0, 0, 0, 0]
    for key in keys:
        if key not in _KEYS:
            raise ValueError(f"unknown key {key!r} in token {token!r}; {_KEY_HELP}")
        axis, sign = _KEYS[key]
        if components[axis] == sign:
            raise ValueError(f"key {key!r} repeated in token {token!r}; {_KEY_HELP}")
        if components[axis] != 0:
            raise ValueError(f"contradictory keys in token {token!r}; {_KEY_HELP}")
        components[axis] = sign
    return _label_from_components(*components), repeat


def parse_keys(keys: str) -> Tensor:
    """Parse a key string like ``"w*8,wa*3,j*2"`` into action labels (LongTensor [T])."""
    if not keys.strip():
        raise ValueError(f"empty key string; {_KEY_HELP}")
    labels: list[int] = []
    for position, raw in enumerate(keys.split(",")):
        token = "".join(raw.split()).lower()
        if not token:
            raise ValueError(f"empty key token at position {position} of {keys!r}; {_KEY_HELP}")
        label, repeat = _parse_token(token)
        labels.extend([label] * repeat)
    return torch.tensor(labels, dtype=torch.long)


def key_frames(keys: str) -> int | None:
    """Frames a key string like ``w*8,a*3`` stands for, counted without expanding it (a count
    like ``w*99999999999999`` is a number, not a list); None when it does not parse (parse_keys
    says why)."""
    total = 0
    for raw in keys.split(","):
        token = "".join(raw.split())
        _, star, count = token.partition("*")
        if not star:
            total += 1
        elif count.isdigit() and len(count) <= 1000:
            total += int(count)
        else:
            return None
    return total


def _token(label: int) -> str:
    if label == 0:
        return _IDLE_KEY
    translation, rotation = split_action(label)
    forward, right = _TRANSLATION_AXES[translation]
    yaw, pitch = _ROTATION_AXES[rotation]
    components = (forward, right, yaw, pitch)
    return "".join(key for key, (axis, sign) in _KEYS.items() if components[axis] == sign)


def format_keys(labels: Tensor | Sequence[int]) -> str:
    """Run-length key string of action labels; the inverse of :func:`parse_keys`."""
    values = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    if not values:
        raise ValueError("format_keys needs at least one action label")
    tokens: list[str] = []
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or values[end] != values[start]:
            if not 0 <= values[start] < NUM_ACTIONS:
                raise ValueError(f"action label must be in [0, {NUM_ACTIONS - 1}], got {values[start]}")
            count = end - start
            tokens.append(_token(values[start]) + (f"*{count}" if count > 1 else ""))
            start = end
    return ",".join(tokens)


# ----------------------------------------------------------------------------- camera track


def _index_time(tensor: Tensor, index: slice | Tensor) -> Tensor:
    """Index dim 1 of a [B, T, ...] tensor with a slice, a [K] index or a per-clip [B, K] index."""
    if isinstance(index, slice):
        return tensor[:, index]
    if index.dim() == 1:
        return tensor.index_select(1, index.to(tensor.device))
    gather_index = index.to(tensor.device).reshape(*index.shape, *([1] * (tensor.dim() - 2)))
    return tensor.gather(1, gather_index.expand(*index.shape, *tensor.shape[2:]))


@dataclass
class CameraTrack:
    """Per-frame cameras of a batch of clips.

    ``c2w`` [B, T, 4, 4] float32 camera-to-world poses, ``intrinsics`` [B, 3, 3] normalised,
    ``actions`` [B, T] long action labels or None.
    """

    c2w: Tensor
    intrinsics: Tensor
    actions: Tensor | None = None

    def __post_init__(self) -> None:
        if self.c2w.dim() != 4 or self.c2w.shape[-2:] != (4, 4) or not self.c2w.is_floating_point():
            raise ValueError(f"c2w must be a float tensor [B, T, 4, 4], got {self.c2w.dtype} {tuple(self.c2w.shape)}")
        batch, frames = self.c2w.shape[:2]
        if self.intrinsics.shape != (batch, 3, 3) or not self.intrinsics.is_floating_point():
            raise ValueError(
                f"intrinsics must be a float tensor [B={batch}, 3, 3], "
                f"got {self.intrinsics.dtype} {tuple(self.intrinsics.shape)}"
            )
        if self.actions is not None and (self.actions.shape != (batch, frames) or self.actions.dtype != torch.long):
            raise ValueError(
                f"actions must be a long tensor [B={batch}, T={frames}], "
                f"got {self.actions.dtype} {tuple(self.actions.shape)}"
            )
        tensors = [self.c2w, self.intrinsics] + ([] if self.actions is None else [self.actions])
        if len({t.device for t in tensors}) > 1:
            raise ValueError(f"CameraTrack tensors are on different devices: {[str(t.device) for t in tensors]}")

    @property
    def batch_size(self) -> int:
        return self.c2w.shape[0]

    @property
    def num_frames(self) -> int:
        return self.c2w.shape[1]

    def to(self, device: torch.device | str) -> CameraTrack:
        actions = None if self.actions is None else self.actions.to(device)
        return CameraTrack(self.c2w.to(device), self.intrinsics.to(device), actions)

    def contiguous(self) -> CameraTrack:
        """The same track in contiguous tensors at offset 0 (a compiled forward then sees no strides or
        storage offsets that vary with the slice a window was cut from)."""
        actions = None if self.actions is None else self.actions.contiguous()
        return CameraTrack(self.c2w.contiguous(), self.intrinsics.contiguous(), actions)

    def frames(self, index: slice | Tensor) -> CameraTrack:
        """Frames along T: a slice, a LongTensor [K] for every clip, or [B, K] per clip."""
        actions = None if self.actions is None else _index_time(self.actions, index)
        return CameraTrack(_index_time(self.c2w, index), self.intrinsics, actions)

    def select(self, batch_index: int | slice | Tensor) -> CameraTrack:
        """Clips along B; an int keeps the batch dimension (size 1)."""
        if isinstance(batch_index, int):
            batch_index = slice(batch_index, batch_index + 1 if batch_index != -1 else None)
        actions = None if self.actions is None else self.actions[batch_index]
        return CameraTrack(self.c2w[batch_index], self.intrinsics[batch_index], actions)

    @classmethod
    def cat(cls, tracks: Sequence[CameraTrack], dim: int = 0) -> CameraTrack:
        """Concatenate along clips (dim=0) or frames (dim=1, intrinsics must match)."""
        if not tracks:
            raise ValueError("CameraTrack.cat needs at least one track")
        if dim not in (0, 1):
            raise ValueError(f"CameraTrack.cat dim must be 0 (clips) or 1 (frames), got {dim}")
        with_actions = {t.actions is not None for t in tracks}
        if len(with_actions) > 1:
            raise ValueError("CameraTrack.cat: either all tracks have actions or none does")
        if dim == 0:
            intrinsics = torch.cat([t.intrinsics for t in tracks])
        else:
            intrinsics = tracks[0].intrinsics
            if any(not torch.equal(t.intrinsics, intrinsics) for t in tracks[1:]):
                raise ValueError("CameraTrack.cat along frames needs identical intrinsics")
        actions = torch.cat([t.actions for t in tracks], dim) if with_actions == {True} else None
        return cls(torch.cat([t.c2w for t in tracks], dim), intrinsics, actions)


# ----------------------------------------------------------------------------- poses


def pose_from_yaw_pitch(position: Tensor, yaw: Tensor, pitch: Tensor | None = None) -> Tensor:
    """Roll-free c2w [..., 4, 4] from a camera centre [..., 3] and yaw / pitch [...] in radians."""
    pitch = torch.zeros_like(yaw) if pitch is None else pitch
    cy, sy, cp, sp = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin()
    zero = torch.zeros_like(yaw)
    rotation = torch.stack(
        [
            torch.stack([cy, sy * sp, sy * cp], -1),
            torch.stack([zero, cp, -sp], -1),
            torch.stack([-sy, cy * sp, cy * cp], -1),
        ],
        -2,
    )
    c2w = torch.zeros(*yaw.shape, 4, 4, dtype=position.dtype, device=position.device)
    c2w[..., :3, :3] = rotation
    c2w[..., :3, 3] = position
    c2w[..., 3, 3] = 1.0
    return c2w


def yaw_pitch_from_pose(c2w: Tensor) -> tuple[Tensor, Tensor]:
    """Yaw and pitch (radians, [...]) of roll-free poses [..., 4, 4]."""
    forward = c2w[..., :3, 2]
    yaw = torch.atan2(forward[..., 0], forward[..., 2])
    pitch = torch.atan2(-forward[..., 1], torch.hypot(forward[..., 0], forward[..., 2]))
    return yaw, pitch


def _horizontal_axes(yaw: Tensor) -> tuple[Tensor, Tensor]:
    """World-space horizontal forward and right unit vectors [..., 3] for a heading."""
    zero = torch.zeros_like(yaw)
    forward = torch.stack([yaw.sin(), zero, yaw.cos()], -1)
    right = torch.stack([yaw.cos(), zero, -yaw.sin()], -1)
    return forward, right


def _action_components(actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-label (forward, right, yaw_right, pitch_up) components as float tensors."""
    translation, rotation = split_action(actions)
    move = torch.tensor(_TRANSLATION_AXES, dtype=torch.float32, device=actions.device)[translation]
    turn = torch.tensor(_ROTATION_AXES, dtype=torch.float32, device=actions.device)[rotation]
    return move[..., 0], move[..., 1], turn[..., 0], turn[..., 1]


def actions_to_poses(
    actions: Tensor,
    start_c2w: Tensor | None = None,
    move_step: float = 0.15,
    turn_step_deg: float = 5.0,
    is_free: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Integrate action labels [B, T] into poses c2w [B, T, 4, 4].

    ``start_c2w`` [B, 4, 4] is the (roll-free) pose before the first action; identity if None.
    ``is_free(positions [B, 3]) -> bool [B]`` optionally vetoes moves: a translation that would
    end where it is False is dropped for that frame (its rotation still happens). Pitch is
    clamped to +-PITCH_LIMIT_DEG, so a pitch key at the limit is a no-op; poses_to_actions
    of the result returns the moves that really happened.
    """
    if actions.dim() != 2:
        raise ValueError(f"actions must be [B, T], got {tuple(actions.shape)}")
    batch, frames = actions.shape
    device = actions.device
    if start_c2w is None:
        start_c2w = torch.eye(4, device=device).expand(batch, 4, 4)
    start_c2w = start_c2w.to(device=device, dtype=torch.float32)
    forward, right, yaw_dir, pitch_dir = _action_components(actions)
    # Diagonal moves are normalised so every translation has length move_step.
    length = torch.hypot(forward, right).clamp_min(1.0)
    forward, right = forward * move_step / length, right * move_step / length

    turn = math.radians(turn_step_deg)
    limit = math.radians(PITCH_LIMIT_DEG)
    # Yaw is unbounded, so headings are a cumulative sum; the move of frame t uses heading t-1.
    start_yaw, pitch = yaw_pitch_from_pose(start_c2w)
    yaws = start_yaw[:, None] + torch.cumsum(yaw_dir * turn, dim=1)
    previous_yaws = torch.cat([start_yaw[:, None], yaws[:, :-1]], dim=1)
    heading, strafe = _horizontal_axes(previous_yaws)
    moves = forward[..., None] * heading + right[..., None] * strafe

    # Pitch clamping and move vetoes depend on the running state: integrate frame by frame.
    position = start_c2w[:, :3, 3]
    positions, pitches = [], []
    for t in range(frames):
        pitch = (pitch + pitch_dir[:, t] * turn).clamp(-limit, limit)
        candidate = position + moves[:, t]
        position = candidate if is_free is None else torch.where(is_free(candidate)[:, None], candidate, position)
        positions.append(position)
        pitches.append(pitch)
    return pose_from_yaw_pitch(torch.stack(positions, 1), yaws, torch.stack(pitches, 1))


def poses_to_actions(
    c2w: Tensor,
    move_step: float = 0.15,
    turn_step_deg: float = 5.0,
    start_c2w: Tensor | None = None,
) -> Tensor:
    """Nearest action label [B, T] for each consecutive pair of poses [B, T, 4, 4].

    ``actions[:, 0]`` is the move from ``start_c2w`` [B, 4, 4] if given, else 0 (idle).
    Exactly inverts actions_to_poses (from a start whose pitch is a multiple of the turn step);
    a pitch key that hit the clamp comes back without its pitch component.
    """
    if c2w.dim() != 4 or c2w.shape[-2:] != (4, 4):
        raise ValueError(f"c2w must be [B, T, 4, 4], got {tuple(c2w.shape)}")
    c2w = c2w.float()
    previous = torch.cat([c2w[:, :1] if start_c2w is None else start_c2w.to(c2w)[:, None], c2w[:, :-1]], dim=1)
    yaw, pitch = yaw_pitch_from_pose(c2w)
    previous_yaw, previous_pitch = yaw_pitch_from_pose(previous)

    heading, strafe = _horizontal_axes(previous_yaw)
    delta = (c2w[..., :3, 3] - previous[..., :3, 3]) / move_step
    local = torch.stack([(delta * heading).sum(-1), (delta * strafe).sum(-1)], -1)
    candidates = torch.tensor(_TRANSLATION_AXES, dtype=torch.float32, device=c2w.device)
    candidates = candidates / torch.linalg.vector_norm(candidates, dim=-1, keepdim=True).clamp_min(1.0)
    translation = (local[..., None, :] - candidates).square().sum(-1).argmin(-1)

    turn = math.radians(turn_step_deg)
    # Wrap the yaw change into (-pi, pi] so headings crossing +-pi stay one step apart.
    yaw_delta = torch.remainder(yaw - previous_yaw + math.pi, 2 * math.pi) - math.pi
    yaw_steps = torch.round(yaw_delta / turn).clamp(-1, 1).long()
    pitch_steps = torch.round((pitch - previous_pitch) / turn).clamp(-1, 1).long()
    rotation_lookup = torch.tensor(_ROTATION_LOOKUP, device=c2w.device)
    rotation = rotation_lookup[yaw_steps + 1, pitch_steps + 1]
    actions = translation * 9 + rotation
    if start_c2w is None:
        actions[:, 0] = 0
    return actions


def invert_pose(c2w: Tensor) -> Tensor:
    """Inverse of rigid transforms [..., 4, 4] (w2c from c2w), without a general matrix inverse."""
    rotation_t = c2w[..., :3, :3].transpose(-1, -2)
    inverse = torch.zeros_like(c2w)
    inverse[..., :3, :3] = rotation_t
    inverse[..., :3, 3] = -(rotation_t @ c2w[..., :3, 3:4])[..., 0]
    inverse[..., 3, 3] = 1.0
    return inverse


def relative_poses(c2w: Tensor) -> Tensor:
    """Poses [B, T, 4, 4] relative to each clip's first frame, with scale-normalised translations.

    The first frame becomes the identity. Translations are divided by the clip's largest camera
    distance from its first frame, so the farthest camera is at distance 1; a clip whose camera
    never moves (largest distance < 1e-6) keeps scale 1.
    """
    relative = invert_pose(c2w[:, :1]) @ c2w
    distance = torch.linalg.vector_norm(relative[..., :3, 3], dim=-1).amax(dim=1)
    scale = torch.where(distance < 1e-6, torch.ones_like(distance), distance)
    relative[..., :3, 3] = relative[..., :3, 3] / scale[:, None, None]
    return relative


# ----------------------------------------------------------------------------- intrinsics and rays


def default_intrinsics(
    fov_x_deg: float, aspect: float = 1.0, batch: int = 1, device: torch.device | str = "cpu"
) -> Tensor:
    """Normalised pinhole intrinsics [batch, 3, 3] with a horizontal field of view.

    ``aspect`` is width / height; the principal point is the image centre and pixels are square.
    """
    fx = 0.5 / math.tan(math.radians(fov_x_deg) / 2)
    matrix = torch.tensor([[fx, 0.0, 0.5], [0.0, fx * aspect, 0.5], [0.0, 0.0, 1.0]], device=device)
    return matrix.expand(batch, 3, 3).clone()


def camera_rays(c2w: Tensor, intrinsics: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Ray origins [B, T, 3] and unit world directions [B, T, 3, height, width] of pixel centres,
    in float32 (also under autocast: geometry in bf16 would misplace rays by a pixel)."""
    with torch.autocast(c2w.device.type, enabled=False):
        return _camera_rays(c2w, intrinsics, height, width)


def _camera_rays(c2w: Tensor, intrinsics: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    device = c2w.device
    v = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    grid_v, grid_u = torch.meshgrid(v, u, indexing="ij")
    pixels = torch.stack([grid_u, grid_v, torch.ones_like(grid_u)]).reshape(3, -1)
    camera_dirs = torch.linalg.inv_ex(intrinsics.float()).inverse @ pixels  # [B, 3, HW]; no host sync
    world_dirs = c2w[..., :3, :3].float() @ camera_dirs[:, None]  # [B, T, 3, HW]
    world_dirs = world_dirs / torch.linalg.vector_norm(world_dirs, dim=2, keepdim=True)
    return c2w[..., :3, 3].float(), world_dirs.unflatten(-1, (height, width))


def plucker_rays(c2w: Tensor, intrinsics: Tensor, height: int, width: int) -> Tensor:
    """Plücker embeddings ``(o x d, d)`` [B, T, 6, height, width] of every pixel's ray."""
    origins, directions = camera_rays(c2w, intrinsics, height, width)
    origins = origins[..., None, None].expand_as(directions)
    with torch.autocast(c2w.device.type, enabled=False):
        return torch.cat([torch.linalg.cross(origins, directions, dim=2), directions], dim=2)
