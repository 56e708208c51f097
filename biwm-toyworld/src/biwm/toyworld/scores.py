"""The toy world's own evaluation scores, added to the evaluate stage's through the dataset's
:class:`biwm.core.protocols.EvaluationScores` (:class:`ToyWorldScorer`).

Every score compares a rollout with what really happens in the toy world from the same true
history:
- **camera following**: the IDM's labels for the rollout's consecutive frames against the
  commanded actions (and the poses those labels integrate to against the commanded poses);
- **shuffled actions**: the same trajectories driven by another trajectory's actions (PSNR, and
  the IDM against the actions the rollout was not given: near chance for a model that follows);
- **the judge itself**: the IDM on the true held-out clips, and chance;
- **dynamics**: under a still camera only the moving boxes change the image; the fraction of
  pixels that change, generated (above what changes when the boxes are frozen) vs true;
- **diversity**: spread of several samples with the same history and actions.
Quality and drift (PSNR/SSIM per chunk, sharpness) are core's, for every dataset
(:mod:`biwm.core.evaluation`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack, actions_to_poses
from biwm.core.data import encode_clips, video_frames_for
from biwm.core.evaluation import EvaluationRun, quality_scores, rollout_video, shuffled_camera
from biwm.core.metrics import diversity, motion, per_chunk, pose_errors
from biwm.core.sampling import Sampler
from biwm.core.text import TextConditioning
from biwm.core.video import as_uint8
from biwm.core.window import WorldModel
from biwm.toyworld.idm import (IDMTrainConfig, InverseDynamicsModel, LoadedIDM, action_accuracy, cache_dir,
                               evaluate_idm, find_idm, idm_key, load_idm, save_idm, train_idm)
from biwm.toyworld.world import ToyClips, ToyWorldConfig, render_clips, split_seeds


def resolve_idm(ctx, cfg, config: ToyWorldConfig) -> LoadedIDM:
    """The IDM for the rendering ``config``: the evaluate stage's ``cfg.idm``, shipped, cached, or
    trained now (``cfg.idm_steps``) and cached."""
    from biwm.core.runner import progress_bar

    path = cfg.idm or find_idm(config)
    if path is not None:
        return load_idm(path, config, ctx.device)
    target = cache_dir() / f"idm-{idm_key(config)}.safetensors"
    ctx.console.print(f"[yellow]no inverse-dynamics model for this toy-world rendering yet[/]: training one "
                      f"({cfg.idm_steps} steps) and caching it at {target}")
    train = IDMTrainConfig(steps=cfg.idm_steps)
    with progress_bar(ctx.console, "IDM", train.steps) as update:
        model, scores = train_idm(config, train, ctx.device, progress=lambda **kw: update(**kw))
    ctx.console.print(f"IDM held-out accuracy {scores['accuracy']:.3f}")
    info = {k: v for k, v in scores.items() if not isinstance(v, dict)}
    save_idm(target, model, config, info)
    return load_idm(target, config, ctx.device)


def camera_scores(idm: InverseDynamicsModel, frames: Tensor, commanded: CameraTrack, start: int,
                  config: ToyWorldConfig, frames_per_chunk: int = 1) -> dict[str, Any]:
    """How well frames follow the commanded camera from video frame ``start`` on: ``frames`` holds
    frames start-1 .. end (the last history frame first). IDM label accuracy (overall, per chunk of
    ``frames_per_chunk`` frames and over the last five chunks), and the error of the poses its
    labels integrate to from the last history pose."""
    predicted = idm.predict(frames)  # [B, T']
    actions = commanded.actions[:, start:].cpu()
    out = action_accuracy(predicted, actions)
    poses = actions_to_poses(predicted, commanded.c2w[:, start - 1].cpu(), config.move_step, config.turn_step_deg)
    angle, distance = pose_errors(poses, commanded.c2w[:, start:].cpu())
    out.update(rotation_error_deg=float(angle.mean()), translation_error=float(distance.mean()),
               final_rotation_error_deg=float(angle[:, -1].mean()), final_translation_error=float(distance[:, -1].mean()))
    hits = (predicted == actions).float()  # [B, T']
    if hits.shape[1] % frames_per_chunk == 0:
        chunk_hits = per_chunk(hits, frames_per_chunk).mean(dim=(0, 2))
        out["accuracy_per_chunk"] = chunk_hits.tolist()
        out["accuracy_last5"] = float(chunk_hits[-5:].mean())  # the last five chunks (16-20 of 20)
    out["predicted"] = predicted
    return out


def still_camera_clips(count: int, frames: int, config: ToyWorldConfig, device: torch.device | str = "cpu"):
    """Held-out scenes filmed by a camera that never moves (only the boxes do)."""
    seeds = split_seeds("heldout", count, start=1_000_000)
    return render_clips(seeds, frames, config, actions=torch.zeros(count, frames, dtype=torch.long), device=device)


def dynamics_scores(world: WorldModel, text: TextConditioning, null_text: TextConditioning, config: ToyWorldConfig,
                    scenes: int, samples: int, history_frames: int, chunks: int, chunk_frames: int, sampler: Sampler,
                    seed: int, attention: str | None, device: torch.device, threshold: float = 0.1,
                    on_chunk: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Still camera: how much of the image changes in generated vs true frames, and the spread of
    ``samples`` rollouts per scene.

    A generated video also changes where nothing moves (sampling noise, flicker, invented motion),
    so the same scenes are rolled out a second time with their boxes frozen (``max_speed`` 0: same
    layout, static history). ``dynamics`` is the change above that floor, relative to the true
    motion: 1 when the boxes move as much as in truth, 0 when they freeze, negative when the
    frozen scenes flicker more than the moving ones. Motion compares frames one chunk apart, so
    a box moves a few pixels rather than a fraction of one."""
    bb = world.backbone
    tf = bb.temporal_factor
    total = video_frames_for(history_frames + chunks * chunk_frames, tf)
    moving = still_camera_clips(scenes, total, config).to("cpu")
    frozen = still_camera_clips(scenes, total, config.model_copy(update={"max_speed": 0.0})).to("cpu")
    both = ToyClips(torch.cat([moving.frames, frozen.frames]), CameraTrack.cat([moving.camera, frozen.camera]),
                    moving.seeds * 2)
    frames = both.frames
    latents = encode_clips(both, bb, device=device).latents
    rows = torch.arange(2 * scenes).repeat_interleave(samples)
    history = latents[rows, :, :history_frames].to(device)
    camera = both.camera.select(rows)
    generated = as_uint8(rollout_video(world, text.select(0).expand(len(rows)), null_text, history, camera,
                                       chunks, chunk_frames, sampler, seed, attention, on_chunk))
    # From the last history frame on, one frame per chunk: each pair is one chunk apart.
    h_video = video_frames_for(history_frames, tf)
    gap = chunk_frames * tf
    sampled = torch.cat([frames[rows, h_video - 1:h_video], generated], 1)[:, ::gap]
    changed = motion(sampled, threshold).mean(1)  # [2 * scenes * samples]
    half = scenes * samples
    generated_moving, generated_frozen = float(changed[:half].mean()), float(changed[half:].mean())
    true_moving = float(motion(moving.frames[:, h_video - 1::gap], threshold).mean())
    spread = diversity(generated[:half].unflatten(0, (scenes, samples)))
    return {"dynamics": (generated_moving - generated_frozen) / true_moving if true_moving > 0 else None,
            "dynamics_generated": generated_moving, "dynamics_generated_frozen": generated_frozen,
            "dynamics_true": true_moving, "diversity": float(spread.mean()), "dynamics_scenes": scenes,
            "diversity_samples": samples}


def true_clip_scores(idm: InverseDynamicsModel, frames: Tensor, actions: Tensor) -> dict[str, Any]:
    """The IDM on true held-out frames (how much its verdicts can be trusted, and what it scores
    against another clip's actions), under ``*_true_clips`` names."""
    scores = evaluate_idm(idm, frames, actions)
    out = {f"idm_{k}_true_clips": scores[k] for k in ("accuracy", "translation_accuracy", "rotation_accuracy",
                                                         "per_translation", "per_rotation")}
    out["idm_chance"] = scores["chance"]
    if "shuffled_accuracy" in scores:
        out["idm_accuracy_true_clips_shuffled"] = scores["shuffled_accuracy"]
    return out


class ToyWorldScorer:
    """The toy world's :class:`biwm.core.protocols.DatasetScorer` for one evaluation: the IDM judges
    every rollout (``idm_*``, ``rotation_error_deg``, ...); then the shuffled-actions baseline
    (``psnr_shuffled_actions``, ``idm_accuracy_shuffled``), the IDM on the true clips
    (``idm_*_true_clips``, ``idm_chance``) and the still-camera scenes (``dynamics*``,
    ``diversity``), as the evaluate stage's options ask."""

    headline = ("idm_accuracy",)
    teacher_keys = ("idm_accuracy", "idm_accuracy_last5")

    def __init__(self, config, toyworld: ToyWorldConfig, idm: InverseDynamicsModel, device: torch.device):
        self.config, self.toyworld, self.idm, self.device = config, toyworld, idm, device

    @classmethod
    def for_evaluation(cls, ctx, config, toyworld: ToyWorldConfig) -> "ToyWorldScorer":
        """``config``: the evaluate stage's options; the IDM is resolved (and trained if need be) now."""
        return cls(config, toyworld, resolve_idm(ctx, config, toyworld).model, ctx.device)

    def _shuffled(self, trajectories: int) -> bool:
        return self.config.shuffled_baseline and trajectories > 1

    def extra_chunks(self, trajectories: int) -> int:
        return (self.config.chunks if self._shuffled(trajectories) else 0) + (
            self.config.dynamics_chunks if self.config.dynamics_scenes else 0)

    def _follows(self, run: EvaluationRun, video: Tensor, camera: CameraTrack) -> dict[str, Any]:
        return camera_scores(self.idm, torch.cat([run.last_history, as_uint8(video)], 1), camera,
                             run.history_video_frames, self.toyworld, run.frames_per_chunk)

    def rollout_scores(self, run: EvaluationRun, video: Tensor, camera: CameraTrack) -> dict[str, Any]:
        return {k if "error" in k else f"idm_{k}": v for k, v in self._follows(run, video, camera).items()
                if k not in ("predicted", "count")}

    def dataset_scores(self, run: EvaluationRun) -> dict[str, Any]:
        cfg, camera, h_video = self.config, run.camera, run.history_video_frames
        out: dict[str, Any] = {}
        if self._shuffled(len(run.clips)):
            other = shuffled_camera(camera, h_video, self.toyworld)
            moved = run.roll(run.world, run.sampler, other)
            out["psnr_shuffled_actions"] = quality_scores(moved, run.truth, run.frames_per_chunk)["psnr"]
            predicted = self._follows(run, moved, other)
            # Scored against the trajectory's own actions, which this rollout was not given: near chance
            # if the model follows its commands.
            out["idm_accuracy_shuffled"] = action_accuracy(predicted["predicted"],
                                                           camera.actions[:, h_video:].cpu())["accuracy"]
            out["idm_accuracy_shuffled_commands"] = predicted["accuracy"]
        out.update(true_clip_scores(self.idm, run.clips.frames, camera.actions))
        if cfg.dynamics_scenes:
            out.update(dynamics_scores(run.world, run.text, run.null_text, self.toyworld, cfg.dynamics_scenes,
                                       cfg.diversity_samples, cfg.history_frames, cfg.dynamics_chunks,
                                       cfg.chunk_frames, run.sampler, cfg.seed + 1, None, self.device,
                                       cfg.motion_threshold, on_chunk=lambda _i: run.progress()))
        return out

    def summary(self, metrics: dict[str, Any]) -> str:
        text = (f"IDM accuracy {metrics['idm_accuracy']:.3f} (true clips {metrics['idm_accuracy_true_clips']:.3f}, "
                f"chance {metrics['idm_chance']:.3f})")
        if metrics.get("dynamics") is not None:
            text += f"; dynamics {metrics['dynamics']:.2f}, diversity {metrics['diversity']:.4f}"
        return text
