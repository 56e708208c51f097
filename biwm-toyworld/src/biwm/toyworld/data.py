"""The toy world as a dataset plugin (``toyworld``, the default of a recipe's ``data:``).

:class:`ToyWorldDataset` is a :class:`biwm.core.protocols.ClipSource` with options
:class:`ToyWorldData`: clips rendered from per-split seeds and encoded by the backbone
(:func:`toyworld_latents`, cached by content key). It also has the optional capabilities the
stages look for: :class:`biwm.core.protocols.ActionSteps` (its action labels integrate to poses)
and :class:`biwm.core.protocols.EvaluationScores` (camera following judged by its
inverse-dynamics model, the shuffled-actions baseline and still-camera dynamics:
:mod:`biwm.toyworld.scores`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from biwm.core.camera import CameraTrack
from biwm.core.checkpoint import atomic_save_tensors, load_tensors
from biwm.core.config import Strict
from biwm.core.data import LatentClips, encode_clips, video_frames_for
from biwm.core.protocols import Backbone
from biwm.toyworld.world import ToyWorldConfig, random_actions, render_clips, split_seeds, still_stretches


def toyworld_latents(split: str, count: int, latent_frames: int, config: ToyWorldConfig, backbone: Backbone,
                     cache_dir: Path | None, cache_key: str, device: torch.device | str = "cpu",
                     keep_frames: bool = False, start: int = 0, still_fraction: float = 0.0) -> LatentClips:
    """Render + encode toy-world clips ``start .. start+count-1`` of ``split``, cached as safetensors
    under ``cache_dir`` by content key. ``still_fraction`` of the clips (chosen by seed) hold the
    camera still over a stretch of half to all of their frames (:func:`biwm.toyworld.world.still_stretches`)."""
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
    """Options of the ``toyworld`` dataset: a recipe's ``data:`` (``source`` defaults to it)."""

    source: Literal["toyworld"] = "toyworld"
    train_clips: int = Field(256, ge=1)
    heldout_clips: int = Field(8, ge=1)
    frames: int = Field(16, ge=2, description="video frames per clip")
    prompt: str = ""
    toyworld: ToyWorldConfig = Field(default_factory=ToyWorldConfig)
    still_fraction: float = Field(0.0, ge=0.0, le=1.0, description="share of the training clips that hold the "
                                  "camera still over half to all of their frames (held-out clips never do): the "
                                  "random policy alone almost never holds it still for a whole chunk")

    def frame_size_fields(self) -> dict[str, int]:
        """The fields that set the frame size, by their path under ``data:`` (recipe validation checks
        them against the backbone's codec and patch size)."""
        return {"toyworld.height": self.toyworld.height, "toyworld.width": self.toyworld.width}


class ToyWorldDataset:
    """The procedural toy world as a :class:`biwm.core.protocols.ClipSource`: clips rendered from
    per-split seeds and encoded by the backbone (:func:`toyworld_latents`)."""

    def __init__(self, options: ToyWorldData):
        self.options = options
        self.prompt, self.train_clips, self.frames = options.prompt, options.train_clips, options.frames
        self.toyworld = options.toyworld

    @property
    def move_step(self) -> float:
        """World units per translation action (:class:`biwm.core.protocols.ActionSteps`)."""
        return self.toyworld.move_step

    @property
    def turn_step_deg(self) -> float:
        """Degrees per rotation action (:class:`biwm.core.protocols.ActionSteps`)."""
        return self.toyworld.turn_step_deg

    def latents(self, split: str, count: int, latent_frames: int, backbone: Backbone, cache_dir: Path | None,
                cache_key: str, device: torch.device | str = "cpu", keep_frames: bool = False,
                start: int = 0) -> LatentClips:
        return toyworld_latents(split, count, latent_frames, self.toyworld, backbone, cache_dir, cache_key,
                                device=device, keep_frames=keep_frames, start=start,
                                still_fraction=self.options.still_fraction if split == "train" else 0.0)

    def evaluation_scorer(self, ctx, config):
        """The toy world's scores for one evaluation (:class:`biwm.core.protocols.EvaluationScores`):
        loads the inverse-dynamics model for this rendering (trains and caches one if there is none)."""
        from biwm.toyworld.scores import ToyWorldScorer

        return ToyWorldScorer.for_evaluation(ctx, config, self.toyworld)
