"""Inverse-dynamics model (IDM): which of the 81 actions moved the camera between two toy-world frames.

It is the judge of camera following: run it on a rollout's consecutive frames and compare its
labels with the commanded actions. It is trained on true toy-world clips only (never on a world
model's output), one model per rendering configuration (resolution, field of view, step sizes,
scene layout), and cached; the quickstart's configuration ships with biwm-toyworld.

Design, and why:
- Two 9-way heads (translation, rotation) rather than one 81-way head: the two factors are
  independent, so each head sees every example of its class.
- Besides the two frames and their difference, the network gets, for each of the 9 rotation
  hypotheses, how far the current frame is from the previous frame warped by that rotation
  (a rotation's image motion does not depend on depth, so it is a fixed homography). At 32x32 a
  5-degree turn moves the image by about 2 pixels and a step by about 1 near the floor; without
  the hint a small CNN confuses turning and strafing. The warp assumes a level camera, so for a
  pitched camera the yaw hypotheses are approximate and the network learns the rest.
- Training data are streamed: a fresh pool of clips is rendered every ``refresh_every`` steps, so
  the model cannot memorise scenes (with a fixed set of 768 scenes it reached 100% on them and
  41% on held-out ones).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel
from safetensors import safe_open
from torch import Tensor, nn

from biwm.core.camera import NUM_ACTIONS, ROTATIONS, TRANSLATIONS, _ROTATION_AXES, pose_from_yaw_pitch, split_action
from biwm.core.checkpoint import atomic_save_tensors, load_tensors
from biwm.toyworld.world import ToyClips, ToyWorldConfig, render_clips, split_seeds

# Fields of ToyWorldConfig that only shape the random action policy: an IDM serves any value.
_POLICY_FIELDS = ("action_hold", "idle_prob")
# IDM training scenes: a slice of the train split far from what recipes use.
IDM_SEED_START = 500_000_000
ASSETS = Path(__file__).parent / "assets" / "idm"


def idm_key(config: ToyWorldConfig) -> str:
    """Identifies the rendering an IDM was trained for (everything but the action policy)."""
    fields = {k: v for k, v in config.model_dump(mode="json").items() if k not in _POLICY_FIELDS}
    if fields.get("supersample") == 1:
        del fields["supersample"]  # renders as before anti-aliasing existed: the same key, the same IDM
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def _rotation_grids(height: int, width: int, fov_deg: float, turn_step_deg: float) -> Tensor:
    """Sampling grids [9, H, W, 2] that warp the previous frame by each rotation hypothesis."""
    fx = 0.5 / math.tan(math.radians(fov_deg) / 2)
    k = torch.tensor([[fx * width, 0.0, width / 2], [0.0, fx * width, height / 2], [0.0, 0.0, 1.0]])
    v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    rays = torch.linalg.inv(k) @ torch.stack([u, v, torch.ones_like(u)]).reshape(3, -1)
    turn = math.radians(turn_step_deg)
    axes = torch.tensor(_ROTATION_AXES, dtype=torch.float32) * turn
    delta = pose_from_yaw_pitch(torch.zeros(9, 3), axes[:, 0], axes[:, 1])[:, :3, :3]
    # cur = prev @ delta, so a current pixel's ray is delta @ ray in the previous camera.
    projected = k @ (delta @ rays)
    pixels = projected[:, :2] / projected[:, 2:].clamp_min(1e-6)
    grid = torch.stack([pixels[:, 0] / width, pixels[:, 1] / height], -1) * 2 - 1
    return grid.reshape(9, height, width, 2)


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class InverseDynamicsModel(nn.Module):
    """Frames [B, 3, H, W] in [-1, 1] before and after a move -> translation and rotation logits."""

    def __init__(self, height: int, width: int, fov_deg: float, turn_step_deg: float, channels: int = 48):
        super().__init__()
        self.height, self.width = height, width
        self.register_buffer("grids", _rotation_grids(height, width, fov_deg, turn_step_deg), persistent=False)
        v, u = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("coords", torch.stack([u, v])[None], persistent=False)
        c = channels
        self.features = nn.Sequential(
            _block(3 * 3 + 9 + 2, c, 1), _block(c, c, 1), _block(c, 2 * c, 2), _block(2 * c, 2 * c, 1),
            _block(2 * c, 4 * c, 2), _block(4 * c, 4 * c, 1), nn.AdaptiveAvgPool2d(4), nn.Conv2d(4 * c, 64, 1),
            nn.SiLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(64 * 16, 256), nn.SiLU(), nn.Linear(256, 18))

    def inputs(self, prev: Tensor, cur: Tensor) -> Tensor:
        b = prev.shape[0]
        warped = F.grid_sample(prev.repeat_interleave(9, 0), self.grids.repeat(b, 1, 1, 1).to(prev.dtype),
                               padding_mode="border", align_corners=False)
        residual = (cur.repeat_interleave(9, 0) - warped).abs().mean(1).view(b, 9, *cur.shape[-2:])
        return torch.cat([prev, cur, cur - prev, residual, self.coords.expand(b, -1, -1, -1).to(prev.dtype)], 1)

    def forward(self, prev: Tensor, cur: Tensor) -> tuple[Tensor, Tensor]:
        if prev.shape[-2:] != (self.height, self.width) or prev.shape != cur.shape:
            raise ValueError(f"IDM trained for {self.height}x{self.width} frames, got {tuple(prev.shape)} "
                             f"and {tuple(cur.shape)}")
        logits = self.head(self.features(self.inputs(prev, cur)))
        return logits[:, :9], logits[:, 9:]

    @torch.no_grad()
    def predict(self, frames: Tensor, batch_size: int = 512) -> Tensor:
        """Action labels [B, T-1] of the moves between consecutive frames of [B, T, 3, H, W]
        (uint8, or float in [-1, 1])."""
        b, t = frames.shape[:2]
        device = next(self.parameters()).device
        x = frames.float() / 127.5 - 1 if frames.dtype == torch.uint8 else frames.float()
        prev, cur = x[:, :-1].flatten(0, 1), x[:, 1:].flatten(0, 1)
        out = []
        for i in range(0, prev.shape[0], batch_size):
            lt, lr = self(prev[i:i + batch_size].to(device), cur[i:i + batch_size].to(device))
            out.append((lt.argmax(1) * 9 + lr.argmax(1)).cpu())
        return torch.cat(out).view(b, t - 1) if out else torch.zeros(b, 0, dtype=torch.long)


# ----------------------------------------------------------------------------- scoring


def action_accuracy(predicted: Tensor, commanded: Tensor) -> dict[str, Any]:
    """Agreement of predicted and commanded labels (same shape): full label, each factor, and per
    commanded class (None for a class that never occurs)."""
    if predicted.shape != commanded.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and commanded {tuple(commanded.shape)} actions differ")
    pt, pr = split_action(predicted.long())
    ct, cr = split_action(commanded.long())
    hit_t, hit_r = pt == ct, pr == cr

    def per_class(hit: Tensor, target: Tensor, names: tuple[str, ...]) -> dict[str, float | None]:
        return {name: (float(hit[target == i].float().mean()) if (target == i).any() else None)
                for i, name in enumerate(names)}

    return {"accuracy": float((hit_t & hit_r).float().mean()),
            "translation_accuracy": float(hit_t.float().mean()),
            "rotation_accuracy": float(hit_r.float().mean()),
            "per_translation": per_class(hit_t, ct, TRANSLATIONS),
            "per_rotation": per_class(hit_r, cr, ROTATIONS),
            "count": int(commanded.numel())}


def chance_accuracy(labels: Tensor) -> float:
    """Expected agreement of two independent draws from the labels' empirical distribution: what
    an IDM scores against actions unrelated to the frames."""
    p = torch.bincount(labels.flatten().long(), minlength=NUM_ACTIONS).float()
    p = p / p.sum()
    return float((p * p).sum())


# ----------------------------------------------------------------------------- training


class IDMTrainConfig(BaseModel):
    """Defaults are the recipe of the shipped 32x32 IDM (5 min on an H100; far slower on a CPU)."""

    steps: int = 6000
    batch_size: int = 512
    lr: float = 2e-3
    channels: int = 48
    pool_clips: int = 48
    # Long clips: the random policy then reaches the steep pitches and wall-hugging poses of long
    # rollouts (trained on 16-frame clips, accuracy on 84-frame clips was 93.5% instead of 98%).
    clip_frames: int = 48
    refresh_every: int = 8
    noise_std: float = 0.04  # augmentation: generated frames are noisier than rendered ones
    heldout_clips: int = 64
    seed: int = 0


def _pairs(clips: ToyClips) -> tuple[Tensor, Tensor, Tensor]:
    f = clips.frames_float()
    return f[:, :-1].flatten(0, 1), f[:, 1:].flatten(0, 1), clips.camera.actions[:, 1:].flatten()


def evaluate_idm(model: InverseDynamicsModel, frames: Tensor, actions: Tensor) -> dict[str, Any]:
    """IDM scores on true clips (frames [B, T, 3, H, W], actions [B, T]): against their own
    actions, against another clip's actions, and chance."""
    predicted = model.predict(frames)
    actions = actions[:, 1:].cpu()
    out = action_accuracy(predicted, actions)
    if frames.shape[0] > 1:
        out["shuffled_accuracy"] = action_accuracy(predicted, actions.roll(1, 0))["accuracy"]
    out["chance"] = chance_accuracy(actions)
    return out


def train_idm(config: ToyWorldConfig, train: IDMTrainConfig | None = None, device: torch.device | str = "cpu",
              progress: Callable[..., None] | None = None) -> tuple[InverseDynamicsModel, dict[str, Any]]:
    """Train an IDM on freshly rendered clips of ``config``; returns it with held-out scores."""
    train = train or IDMTrainConfig()
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(train.seed)
    model = InverseDynamicsModel(config.height, config.width, config.fov_deg, config.turn_step_deg,
                                 train.channels).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), train.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, train.lr, total_steps=train.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(train.seed)
    started = time.time()
    pool_index = 0
    model.train()
    for step in range(train.steps):
        if step % train.refresh_every == 0:
            seeds = split_seeds("train", train.pool_clips, IDM_SEED_START + pool_index * train.pool_clips)
            pool_index += 1
            prev_pool, cur_pool, action_pool = _pairs(render_clips(seeds, train.clip_frames, config, device=device))
        idx = torch.randint(prev_pool.shape[0], (train.batch_size,), generator=generator).to(device)
        prev, cur, target = prev_pool[idx], cur_pool[idx], action_pool[idx]
        if train.noise_std > 0:
            std = torch.rand(prev.shape[0], 1, 1, 1, generator=generator).to(device) * train.noise_std
            prev = prev + std * torch.randn(prev.shape, generator=generator).to(device)
            cur = cur + std * torch.randn(cur.shape, generator=generator).to(device)
        lt, lr = model(prev, cur)
        tt, tr = split_action(target)
        loss = F.cross_entropy(lt, tt) + F.cross_entropy(lr, tr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(loss=loss.item())
    model.eval()
    heldout = render_clips(split_seeds("heldout", train.heldout_clips), train.clip_frames, config, device=device)
    scores = evaluate_idm(model, heldout.frames, heldout.camera.actions)
    scores.update(steps=train.steps, seconds=round(time.time() - started, 1))
    return model, scores


# ----------------------------------------------------------------------------- storage


@dataclass
class LoadedIDM:
    model: InverseDynamicsModel
    path: Path
    info: dict[str, Any]


def save_idm(path: Path, model: InverseDynamicsModel, config: ToyWorldConfig, info: dict[str, Any]) -> None:
    meta = {"toyworld": json.dumps(config.model_dump(mode="json")), "key": idm_key(config),
            "channels": str(model.features[0][0].out_channels), "info": json.dumps(info)}
    atomic_save_tensors({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, path, meta)


def load_idm(path: Path, config: ToyWorldConfig | None = None, device: torch.device | str = "cpu") -> LoadedIDM:
    """Load an IDM; with ``config``, refuse one trained for a different rendering."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDM weights not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "toyworld" not in meta:
        raise ValueError(f"{path} is not a biwm IDM (no 'toyworld' metadata)")
    trained_for = ToyWorldConfig.model_validate_json(meta["toyworld"])
    if config is not None and idm_key(config) != idm_key(trained_for):
        diff = {k: (v, getattr(config, k)) for k, v in trained_for.model_dump().items()
                if k not in _POLICY_FIELDS and getattr(config, k) != v}
        raise ValueError(f"{path} was trained for another toy-world rendering; differing fields "
                         + ", ".join(f"{k}: {a} (IDM) vs {b} (data)" for k, (a, b) in diff.items()))
    model = InverseDynamicsModel(trained_for.height, trained_for.width, trained_for.fov_deg,
                                 trained_for.turn_step_deg, int(meta["channels"]))
    model.load_state_dict({k: v.float() for k, v in load_tensors(path, "IDM file").items()})
    return LoadedIDM(model.to(device).eval(), path, json.loads(meta.get("info", "{}")))


def cache_dir() -> Path:
    root = os.environ.get("BIWM_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "biwm"
    return Path(root) / "idm"


def find_idm(config: ToyWorldConfig) -> Path | None:
    """A shipped or cached IDM for this rendering, if there is one."""
    name = f"idm-{idm_key(config)}.safetensors"
    for folder in (ASSETS, cache_dir()):
        if (folder / name).is_file():
            return folder / name
    return None
