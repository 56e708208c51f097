"""Procedural 3D toy world: textured rooms with boxes, rendered by batched torch ray casting.

It is BiWM's default data and the ground truth of every test: frames, poses and actions.

- A scene is fully determined by its integer seed (``torch.Generator``, never the global RNG):
  a square room (checkered floor with colour noise, four walls with their own colours and
  vertical stripes, a skirting board and a band, a ceiling with a grid) and ``num_boxes``
  axis-aligned boxes on the floor. The first ``num_moving`` boxes slide horizontally at constant
  velocity and bounce off the walls (analytic triangle waves of the frame time); boxes may pass
  through each other. The camera starts level at eye height, at a random spot in the inner part
  of the room away from the boxes, with a random heading within 90 degrees of the room centre.
- World frame and camera conventions are those of :mod:`biwm.core.camera` (y down, floor y = 0,
  room centred on the origin).
- The camera keeps ``config.clearance`` away from the walls and from the static boxes: a move
  that would end closer is dropped (the frame keeps its rotation), and the stored actions are
  the moves that really happened, so ``actions_to_poses(actions, start)`` reproduces the poses.
  Moving boxes are not avoided; the camera may find itself inside one, which is then invisible.
- Shading: Lambert with a fixed light plus ambient (box faces get distinct brightness), darker
  box edges, and mild distance fog.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from biwm.core.camera import (
    CameraTrack,
    actions_to_poses,
    camera_rays,
    default_intrinsics,
    pose_from_yaw_pitch,
    poses_to_actions,
)

HELDOUT_SEED_START = 1_000_000_000
# The action policy draws from its own stream so a scene does not depend on the clip length.
_POLICY_SEED_OFFSET = 1 << 40
_STILL_SEED_OFFSET = 3 << 40  # still-camera stretches (still_stretches): a stream of their own too
_START_CANDIDATES = 64
_RAYS_PER_CHUNK = 1 << 18  # bounds renderer memory to roughly 100 MB per chunk
# On a GPU each chunk is a few dozen kernels, so fewer, bigger chunks (about 1.6 GB each) mean fewer
# launches; supersampling multiplies the rays (16 per pixel at supersample 4). Not yet timed.
_RAYS_PER_CHUNK_CUDA = 1 << 22
_LIGHT = torch.tensor([0.35, -1.0, 0.25]) / math.sqrt(0.35**2 + 1.0 + 0.25**2)  # towards the light
_AMBIENT, _DIFFUSE = 0.45, 0.6
_FOG_COLOUR = torch.tensor([0.72, 0.76, 0.82])
_EDGE_WIDTH = 0.035
_DATA_FILE, _CONFIG_FILE, _PREVIEW_FILE = "clips.safetensors", "config.json", "preview.png"


class ToyWorldConfig(BaseModel):
    """Toy-world scene, camera and rendering options."""

    model_config = ConfigDict(extra="forbid")

    height: int = Field(32, ge=8, description="frame height in pixels")
    width: int = Field(32, ge=8, description="frame width in pixels")
    fov_deg: float = Field(75.0, gt=10.0, lt=150.0, description="horizontal field of view in degrees")
    room_half_size: float = Field(4.0, gt=1.5, description="half the side of the square room (world units)")
    wall_height: float = Field(2.5, gt=0.5, description="height of the walls (world units)")
    eye_height: float = Field(1.2, gt=0.1, description="camera height above the floor")
    num_boxes: int = Field(6, ge=0, le=32, description="boxes standing on the floor")
    num_moving: int = Field(2, ge=0, description="how many of the boxes move")
    max_speed: float = Field(0.08, ge=0.0, description="top speed of moving boxes (world units per frame)")
    move_step: float = Field(0.15, gt=0.0, description="camera translation per action (world units)")
    turn_step_deg: float = Field(5.0, gt=0.0, le=30.0, description="camera rotation per action (degrees)")
    action_hold: tuple[int, int] = Field((2, 6), description="random policy holds each action this many frames")
    idle_prob: float = Field(0.15, ge=0.0, le=1.0, description="chance a random-policy action is idle")
    clearance: float = Field(0.3, ge=0.0, description="closest the camera may get to walls and static boxes")
    fog_density: float = Field(0.04, ge=0.0, description="fog extinction per world unit")
    supersample: int = Field(1, ge=1, le=8, description="rays per pixel along each axis, box-filtered: "
                             "anti-aliasing, so a sub-pixel camera move changes the image smoothly")

    @model_validator(mode="after")
    def _check(self) -> ToyWorldConfig:
        if self.num_moving > self.num_boxes:
            raise ValueError(f"num_moving ({self.num_moving}) must be <= num_boxes ({self.num_boxes})")
        low, high = self.action_hold
        if not 1 <= low <= high:
            raise ValueError(f"action_hold must be (low, high) with 1 <= low <= high, got {self.action_hold}")
        if self.eye_height >= self.wall_height:
            raise ValueError(f"eye_height ({self.eye_height}) must be below wall_height ({self.wall_height})")
        return self


# ----------------------------------------------------------------------------- scenes


@dataclass
class ToyScene:
    """Parameters of B scenes (all tensors have leading dimension B; N boxes, 4 walls)."""

    floor_colours: Tensor  # [B, 2, 3] checker colours
    floor_cell: Tensor  # [B] checker cell size
    floor_noise: Tensor  # [B, 4] frequencies (x, z) and phases of the colour noise
    wall_colours: Tensor  # [B, 4, 2, 3] stripe colours per wall (x+, x-, z+, z-)
    wall_stripes: Tensor  # [B, 4, 2] stripe frequency and phase per wall
    wall_band: Tensor  # [B, 4] height of the decorative band per wall
    ceiling_colour: Tensor  # [B, 3]
    box_centre: Tensor  # [B, N, 3] at frame time 0
    box_half: Tensor  # [B, N, 3] half extents
    box_colour: Tensor  # [B, N, 3]
    box_velocity: Tensor  # [B, N, 3] per frame, zero for static boxes and along y
    start_c2w: Tensor  # [B, 4, 4] camera pose before the first action
    room_half_size: float
    wall_height: float
    clearance: float
    fog_density: float

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), Tensor)}

    def to(self, device: torch.device | str) -> ToyScene:
        return replace(self, **{name: t.to(device) for name, t in self._tensors().items()})

    def index(self, clips: Tensor) -> ToyScene:
        """Scenes picked (and possibly repeated) by clip index."""
        return replace(self, **{name: t[clips] for name, t in self._tensors().items()})

    def box_centres(self, times: Tensor) -> Tensor:
        """Box centres [B, T, N, 3] at frame times [B, T]; moving boxes bounce off the walls."""
        low = -self.room_half_size + self.box_half[:, None]
        span = 2 * (self.room_half_size - self.box_half[:, None])
        travelled = self.box_centre[:, None] - low + self.box_velocity[:, None] * times[..., None, None]
        # Unfolding the bounces: position along a wall-to-wall span is a triangle wave of distance.
        folded = span - (torch.remainder(travelled, 2 * span) - span).abs()
        moving = self.box_velocity[:, None] != 0
        return torch.where(moving, low + folded, self.box_centre[:, None].expand_as(folded))

    def is_free(self, positions: Tensor) -> Tensor:
        """Whether camera centres [B, 3] keep the clearance from walls and static boxes."""
        inside = (positions[:, [0, 2]].abs() <= self.room_half_size - self.clearance).all(-1)
        static = (self.box_velocity == 0).all(-1)  # [B, N]
        gap = _footprint_distance(positions[:, None, [0, 2]], self.box_centre[..., [0, 2]], self.box_half[..., [0, 2]])
        return inside & ((gap >= self.clearance) | ~static).all(-1)


def _footprint_distance(points: Tensor, centres: Tensor, halves: Tensor) -> Tensor:
    """Distance on the floor plane from points [..., 2] to box footprints [..., 2] (0 inside)."""
    return torch.linalg.vector_norm((points - centres).abs().sub(halves).clamp_min(0.0), dim=-1)


def _hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """HSV in [0, 1] to RGB [..., 3]."""
    k = torch.remainder(torch.tensor([5.0, 3.0, 1.0]) + hue[..., None] * 6, 6)
    return value[..., None] * (1 - saturation[..., None] * (torch.minimum(k, 4 - k).clamp(0, 1)))


def _sample_scene(seed: int, config: ToyWorldConfig) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    half_size, num_boxes = config.room_half_size, config.num_boxes
    floor_hue = uniform(0, 1)
    floor_colours = _hsv_to_rgb(
        torch.stack([floor_hue, floor_hue + uniform(-0.08, 0.08)]),
        uniform(0.2, 0.6, 2),
        torch.stack([uniform(0.3, 0.45), uniform(0.65, 0.85)]),
    )
    # Each wall gets a base hue and a stripe hue up to half the colour wheel away.
    wall_hues = uniform(0, 1, 4, 1) + torch.tensor([0.0, 0.5]) * uniform(0, 1, 4, 1)
    wall_values = torch.stack([uniform(0.55, 0.75, 4), uniform(0.8, 0.95, 4)], -1)
    wall_colours = _hsv_to_rgb(wall_hues, uniform(0.25, 0.7, 4, 2), wall_values)

    box_half = torch.stack(
        [uniform(0.15, 0.55, num_boxes), uniform(0.2, 0.9, num_boxes), uniform(0.15, 0.55, num_boxes)], -1
    )
    box_floor = uniform(-1, 1, num_boxes, 2) * (half_size - box_half[:, [0, 2]] - 0.05)
    box_centre = torch.stack([box_floor[:, 0], -box_half[:, 1], box_floor[:, 1]], -1)
    heading = uniform(0, 2 * math.pi, num_boxes)
    speed = uniform(0.3, 1.0, num_boxes) * config.max_speed * (torch.arange(num_boxes) < config.num_moving)
    box_velocity = torch.stack([heading.sin() * speed, torch.zeros(num_boxes), heading.cos() * speed], -1)

    # Start in the inner part of the room, at the first candidate spot with comfortable room
    # around it (else the roomiest one), facing within 90 degrees of the room centre so the
    # first frames are not a close-up of a wall.
    inner = 0.6 * half_size
    candidates = uniform(-inner, inner, _START_CANDIDATES, 2)
    gap = _footprint_distance(candidates[:, None], box_centre[None, :, [0, 2]], box_half[None, :, [0, 2]])
    gap = torch.cat([gap, torch.full((_START_CANDIDATES, 1), math.inf)], 1).amin(1)
    start = candidates[gap.clamp(max=config.clearance + 0.5).argmax()]
    start_position = torch.stack([start[0], torch.tensor(-config.eye_height), start[1]])
    centre_heading = torch.atan2(-start[0], -start[1])

    return {
        "floor_colours": floor_colours,
        "floor_cell": uniform(0.4, 1.0),
        "floor_noise": torch.cat([uniform(1.0, 4.0, 2), uniform(0, 2 * math.pi, 2)]),
        "wall_colours": wall_colours,
        "wall_stripes": torch.stack([uniform(0.5, 3.0, 4), uniform(0, 2 * math.pi, 4)], -1),
        "wall_band": uniform(0.6, config.wall_height - 0.4, 4),
        "ceiling_colour": _hsv_to_rgb(uniform(0, 1), uniform(0, 0.15), uniform(0.85, 1.0)),
        "box_centre": box_centre,
        "box_half": box_half,
        "box_colour": _hsv_to_rgb(uniform(0, 1, num_boxes), uniform(0.5, 0.9, num_boxes), uniform(0.6, 1.0, num_boxes)),
        "box_velocity": box_velocity,
        "start_c2w": pose_from_yaw_pitch(start_position, centre_heading + uniform(-math.pi / 2, math.pi / 2)),
    }


def make_scenes(
    seeds: Sequence[int], config: ToyWorldConfig | None = None, device: torch.device | str = "cpu"
) -> ToyScene:
    """Sample the scenes of ``seeds`` (on the CPU, so every device sees the same scene)."""
    config = config or ToyWorldConfig()
    if not seeds:
        raise ValueError("make_scenes needs at least one seed")
    samples = [_sample_scene(int(seed), config) for seed in seeds]
    stacked = {name: torch.stack([s[name] for s in samples]) for name in samples[0]}
    scenes = ToyScene(
        **stacked,
        room_half_size=config.room_half_size,
        wall_height=config.wall_height,
        clearance=config.clearance,
        fog_density=config.fog_density,
    )
    return scenes.to(device)


def random_actions(seeds: Sequence[int], num_frames: int, config: ToyWorldConfig | None = None) -> Tensor:
    """Sticky random policy [B, T]: each action (uniform over 81, or idle) is held for a while."""
    config = config or ToyWorldConfig()
    low, high = config.action_hold
    frames = torch.arange(num_frames)
    clips = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed) + _POLICY_SEED_OFFSET)
        holds = torch.randint(low, high + 1, (num_frames,), generator=generator)
        labels = torch.randint(0, 81, (num_frames,), generator=generator)
        labels = torch.where(torch.rand(num_frames, generator=generator) < config.idle_prob, 0, labels)
        clips.append(labels[torch.searchsorted(torch.cumsum(holds, 0), frames, right=True)])
    return torch.stack(clips)



def still_stretches(seeds: Sequence[int], num_frames: int, fraction: float) -> Tensor:
    """Which frames [B, T] of each clip hold the camera still: for a ``fraction`` of the clips
    (chosen by seed, so a clip keeps its choice wherever it is rendered) one contiguous stretch of
    half to all of the clip, at a random place. Training on such clips shows the model boxes that
    move while the camera does not, which the random policy alone almost never holds."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"still fraction must be in [0, 1], got {fraction}")
    mask = torch.zeros(len(seeds), num_frames, dtype=torch.bool)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed) + _STILL_SEED_OFFSET)
        if float(torch.rand((), generator=generator)) >= fraction:
            continue
        length = int(torch.randint((num_frames + 1) // 2, num_frames + 1, (), generator=generator))
        start = int(torch.randint(0, num_frames - length + 1, (), generator=generator))
        mask[row, start:start + length] = True
    return mask


# ----------------------------------------------------------------------------- rendering


def _shade(scene: ToyScene, origins: Tensor, directions: Tensor, box_centres: Tensor) -> Tensor:
    """Colours [P, 3, R] in [0, 1] of rays: origins [P, 3], unit directions [P, 3, R]."""
    device = directions.device
    origin = origins[..., None]
    # Exact zeros would give inf - inf in the slab tests; a tiny component is harmless.
    safe = torch.where(directions.abs() < 1e-8, torch.full_like(directions, 1e-8), directions)
    inverse = 1.0 / safe
    half, height = scene.room_half_size, scene.wall_height
    room_low = torch.tensor([-half, -height, -half], device=device)[:, None]
    room_high = torch.tensor([half, 0.0, half], device=device)[:, None]
    # The camera is inside the room: the visible surface is where the ray leaves it.
    distance, axis = ((torch.where(safe > 0, room_high, room_low) - origin) * inverse).min(dim=1)
    box_id = torch.full_like(axis, -1)
    for index in range(box_centres.shape[1]):
        centre, extent = box_centres[:, index, :, None], scene.box_half[:, index, :, None]
        entry, exit_ = (centre - extent - origin) * inverse, (centre + extent - origin) * inverse
        near, near_axis = torch.minimum(entry, exit_).max(dim=1)
        hit = (near < torch.maximum(entry, exit_).amin(dim=1)) & (near > 1e-4) & (near < distance)
        distance = torch.where(hit, near, distance)
        axis = torch.where(hit, near_axis, axis)
        box_id = torch.where(hit, index, box_id)

    point = origin + distance[:, None] * directions
    x, y, z = point.unbind(1)
    positive = directions.gather(1, axis[:, None])[:, 0] > 0
    # Every visible face is axis-aligned and faces the camera, so its normal is -sign(d) e_axis.
    lambert = (torch.where(positive, -1.0, 1.0) * _LIGHT.to(device)[axis]).clamp_min(0)

    floor_colours = scene.floor_colours[..., None]  # [P, 2, 3, 1]
    cell = scene.floor_cell[:, None]
    checker = torch.remainder(torch.floor(x / cell) + torch.floor(z / cell), 2)[:, None]
    noise = scene.floor_noise[:, :, None]
    grain = torch.sin(noise[:, 0] * x + noise[:, 2]) * torch.sin(noise[:, 1] * z + noise[:, 3])
    floor = torch.lerp(floor_colours[:, 0], floor_colours[:, 1], checker) * (0.85 + 0.15 * grain[:, None])

    lines = (torch.remainder(x, 1.0) < 0.04) | (torch.remainder(z, 1.0) < 0.04)
    ceiling = scene.ceiling_colour[..., None] * (1.0 - 0.25 * lines[:, None])

    wall = torch.where(axis == 0, torch.where(positive, 0, 1), torch.where(positive, 2, 3))  # x+, x-, z+, z-
    along = torch.where(axis == 0, z, x)
    stripes = scene.wall_stripes.gather(1, wall[..., None].expand(*wall.shape, 2))  # [P, R, 2]
    stripe = (3.0 * torch.sin(2 * math.pi * stripes[..., 0] * along + stripes[..., 1])).clamp(-1, 1) * 0.5 + 0.5
    wall_colours = scene.wall_colours.flatten(2).gather(1, wall[..., None].expand(*wall.shape, 6))  # [P, R, 6]
    wall_colours = wall_colours.unflatten(-1, (2, 3)).permute(0, 2, 3, 1)  # [P, 2, 3, R]
    elevation = -y
    band = (elevation - scene.wall_band.gather(1, wall)).abs() < 0.05
    skirting = elevation < 0.12
    wall_light = (0.7 + 0.3 * elevation / height) * torch.where(band, 0.6, 1.0) * torch.where(skirting, 0.4, 1.0)
    walls = torch.lerp(wall_colours[:, 0], wall_colours[:, 1], stripe[:, None]) * wall_light[:, None]

    room = torch.where((axis == 1)[:, None], torch.where(positive[:, None], floor, ceiling), walls)

    colour = room
    if box_centres.shape[1] > 0:
        box = box_id.clamp_min(0)[..., None].expand(*box_id.shape, 3)
        box_colour = scene.box_colour.gather(1, box).transpose(1, 2)
        box_centre = box_centres.gather(1, box).transpose(1, 2)
        box_half = scene.box_half.gather(1, box).transpose(1, 2)
        # Distance to the face's border, measured along the two axes other than the hit one.
        inset = (box_half - (point - box_centre).abs()).scatter(1, axis[:, None], math.inf).amin(1)
        box_colour = box_colour * torch.where(inset < _EDGE_WIDTH, 0.55, 1.0)[:, None]
        colour = torch.where((box_id >= 0)[:, None], box_colour, room)
    colour = colour * (_AMBIENT + _DIFFUSE * lambert)[:, None]
    fog = (1.0 - torch.exp(-scene.fog_density * distance))[:, None]
    return torch.lerp(colour, _FOG_COLOUR.to(device)[:, None], fog)


def render(
    scenes: ToyScene,
    c2w: Tensor,
    intrinsics: Tensor,
    times: Tensor,
    height: int,
    width: int,
    supersample: int = 1,
) -> Tensor:
    """Render frames uint8 [B, T, 3, height, width] of scenes at poses [B, T, 4, 4] and times [B, T].

    Intrinsics are normalised [B, 3, 3]; times are frame indices (may be fractional). Each pixel
    averages ``supersample``² rays on a regular sub-pixel grid.
    """
    batch, frames = c2w.shape[:2]
    device = c2w.device
    clip_of_frame = torch.arange(batch, device=device).repeat_interleave(frames)
    flat_c2w = c2w.reshape(-1, 4, 4).float()
    flat_centres = scenes.box_centres(times.to(device).float()).flatten(0, 1)
    out = torch.empty(batch * frames, 3, height, width, dtype=torch.uint8, device=device)
    s = supersample
    budget = _RAYS_PER_CHUNK_CUDA if device.type == "cuda" else _RAYS_PER_CHUNK
    chunk = max(1, budget // (height * width * s * s))
    for start in range(0, batch * frames, chunk):
        rows = slice(start, start + chunk)
        clips = clip_of_frame[rows]
        origins, directions = camera_rays(flat_c2w[rows, None], intrinsics[clips], height * s, width * s)
        colour = _shade(scenes.index(clips), origins[:, 0], directions[:, 0].flatten(2), flat_centres[rows])
        colour = colour.unflatten(-1, (height * s, width * s))
        if s > 1:  # box filter over each pixel's s x s rays
            colour = torch.nn.functional.avg_pool2d(colour, s)
        out[rows] = (colour.clamp(0, 1) * 255).round().to(torch.uint8)
    return out.view(batch, frames, 3, height, width)


# ----------------------------------------------------------------------------- clips


@dataclass
class ToyClips:
    """Rendered clips: frames uint8 [B, T, 3, H, W], their cameras and scene seeds."""

    frames: Tensor
    camera: CameraTrack
    seeds: list[int]

    def __post_init__(self) -> None:
        if self.frames.dim() != 5 or self.frames.shape[2] != 3 or self.frames.dtype != torch.uint8:
            raise ValueError(
                f"frames must be uint8 [B, T, 3, H, W], got {self.frames.dtype} {tuple(self.frames.shape)}"
            )
        if self.frames.shape[:2] != self.camera.c2w.shape[:2] or len(self.seeds) != self.frames.shape[0]:
            raise ValueError(
                f"frames {tuple(self.frames.shape[:2])}, camera {tuple(self.camera.c2w.shape[:2])} "
                f"and {len(self.seeds)} seeds disagree on [B, T]"
            )

    def frames_float(self) -> Tensor:
        """Frames as float32 in [-1, 1]."""
        return self.frames.float() / 127.5 - 1.0

    def to(self, device: torch.device | str) -> ToyClips:
        return ToyClips(self.frames.to(device), self.camera.to(device), list(self.seeds))


def render_clips(
    seeds: Sequence[int],
    num_frames: int,
    config: ToyWorldConfig | None = None,
    actions: Tensor | None = None,
    c2w: Tensor | None = None,
    device: torch.device | str = "cpu",
    keep_clearance: bool = True,
) -> ToyClips:
    """Render one clip per seed.

    Cameras come from ``c2w`` [B, T, 4, 4] if given (actions are then the nearest labels, the
    first one idle), else from ``actions`` [B, T] (default: the seeded random policy) applied
    from the scene's start pose, with moves that would break the clearance dropped (unless
    ``keep_clearance`` is False: then every move happens, through walls and boxes if need be).
    """
    config = config or ToyWorldConfig()
    seeds = [int(seed) for seed in seeds]
    if num_frames < 1:
        raise ValueError(f"render_clips needs at least one frame, got num_frames={num_frames}")
    if actions is not None and c2w is not None:
        raise ValueError("render_clips takes actions or c2w, not both")
    shape = (len(seeds), num_frames)
    scenes = make_scenes(seeds, config, device)
    steps = {"move_step": config.move_step, "turn_step_deg": config.turn_step_deg}
    if c2w is None:
        actions = random_actions(seeds, num_frames, config) if actions is None else actions
        if actions.shape != shape:
            raise ValueError(f"actions must be [B, T] = {list(shape)}, got {list(actions.shape)}")
        actions = actions.to(device=device, dtype=torch.long)
        c2w = actions_to_poses(actions, scenes.start_c2w, is_free=scenes.is_free if keep_clearance else None, **steps)
        actions = poses_to_actions(c2w, start_c2w=scenes.start_c2w, **steps)
    else:
        if c2w.shape != (*shape, 4, 4):
            raise ValueError(f"c2w must be [B, T, 4, 4] = {[*shape, 4, 4]}, got {list(c2w.shape)}")
        c2w = c2w.to(device=device, dtype=torch.float32)
        actions = poses_to_actions(c2w, **steps)
    intrinsics = default_intrinsics(config.fov_deg, config.width / config.height, len(seeds), device)
    times = torch.arange(num_frames, device=device, dtype=torch.float32).expand(shape)
    frames = render(scenes, c2w, intrinsics, times, config.height, config.width, config.supersample)
    return ToyClips(frames, CameraTrack(c2w, intrinsics, actions), seeds)


# ----------------------------------------------------------------------------- datasets


def split_seeds(split: Literal["train", "heldout"], count: int, start: int = 0) -> list[int]:
    """Scene seeds of a split; train and held-out ranges never overlap."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if count < 0 or start < 0:
        raise ValueError(f"count and start must be >= 0, got count={count}, start={start}")
    if split == "train" and start + count > HELDOUT_SEED_START:
        raise ValueError(f"train seeds must stay below {HELDOUT_SEED_START}, got start={start}, count={count}")
    first = start + (HELDOUT_SEED_START if split == "heldout" else 0)
    return list(range(first, first + count))


def preview_image(clips: ToyClips, max_clips: int = 4, max_frames: int = 8) -> Image.Image:
    """Grid of frames: one row per clip, evenly spaced frames along each row."""
    frames = clips.frames[:max_clips].cpu()
    columns = torch.linspace(0, frames.shape[1] - 1, min(max_frames, frames.shape[1])).round().long()
    grid = frames[:, columns].permute(0, 3, 1, 4, 2)  # [rows, H, columns, W, 3]
    return Image.fromarray(grid.reshape(grid.shape[0] * grid.shape[1], -1, 3).numpy())


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_dataset(
    out_dir: str | Path,
    split: Literal["train", "heldout"],
    num_clips: int,
    num_frames: int,
    config: ToyWorldConfig | None = None,
    seed_start: int = 0,
    progress: Callable[[int, int], None] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> Path:
    """Render a split to ``out_dir`` (clips.safetensors, config.json, preview.png); returns out_dir.

    ``progress(done, total)`` is called after each batch of clips. Files are written under a
    temporary name and renamed, so a reader never sees a partial file.
    """
    config = config or ToyWorldConfig()
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = split_seeds(split, num_clips, seed_start)
    batches = []
    for start in range(0, num_clips, batch_size):
        batches.append(render_clips(seeds[start : start + batch_size], num_frames, config, device=device).to("cpu"))
        if progress is not None:
            progress(min(start + batch_size, num_clips), num_clips)
    clips = ToyClips(
        torch.cat([b.frames for b in batches]), CameraTrack.cat([b.camera for b in batches]), seeds
    )
    description = {
        "split": split,
        "num_clips": num_clips,
        "num_frames": num_frames,
        "config": config.model_dump(mode="json"),
    }
    tensors = {
        "frames": clips.frames,
        "c2w": clips.camera.c2w,
        "intrinsics": clips.camera.intrinsics,
        "actions": clips.camera.actions,
        "seeds": torch.tensor(seeds, dtype=torch.int64),
    }
    _write_atomically(out_dir / _CONFIG_FILE, lambda p: p.write_text(json.dumps(description, indent=2) + "\n"))
    _write_atomically(out_dir / _PREVIEW_FILE, lambda p: preview_image(clips).save(p, format="png"))
    metadata = {"biwm": json.dumps(description)}
    _write_atomically(out_dir / _DATA_FILE, lambda p: save_file(tensors, str(p), metadata=metadata))
    return out_dir


_EXPECTED = {
    "frames": (torch.uint8, "[B, T, 3, H, W]", 5),
    "c2w": (torch.float32, "[B, T, 4, 4]", 4),
    "intrinsics": (torch.float32, "[B, 3, 3]", 3),
    "actions": (torch.int64, "[B, T]", 2),
    "seeds": (torch.int64, "[B]", 1),
}


def load_dataset(path: str | Path) -> ToyClips:
    """Load clips written by :func:`write_dataset` (its directory or its clips.safetensors)."""
    path = Path(path)
    file = path / _DATA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no toy-world dataset; expected {_DATA_FILE} written by write_dataset")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{file}: not a readable safetensors file ({error})") from error
    expected = ", ".join(f"{name} {dtype} {shape}" for name, (dtype, shape, _) in _EXPECTED.items())
    for name, (dtype, shape, dims) in _EXPECTED.items():
        tensor = tensors.get(name)
        if tensor is None or tensor.dtype != dtype or tensor.dim() != dims:
            found = "missing" if tensor is None else f"{tensor.dtype} {list(tensor.shape)}"
            raise ValueError(f"{file}: tensor {name!r} is {found}; expected {expected}")
    try:
        camera = CameraTrack(tensors["c2w"], tensors["intrinsics"], tensors["actions"])
        return ToyClips(tensors["frames"], camera, tensors["seeds"].tolist())
    except ValueError as error:
        raise ValueError(f"{file}: inconsistent toy-world dataset ({error})") from error
