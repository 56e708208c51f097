"""Scoring a world model against the toy world's ground truth.

Every score compares a rollout with what really happens in the toy world from the same true
history:
- **camera following**: the IDM's labels for the rollout's consecutive frames against the
  commanded actions (and the poses those labels integrate to against the commanded poses);
- **quality over time**: PSNR / SSIM against the true continuation, per chunk (the drift curve);
- **dynamics**: under a still camera only the moving boxes change the image; the fraction of
  pixels that change, generated (above what changes when the boxes are frozen) vs true;
- **diversity**: spread of several samples with the same history and actions.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack, actions_to_poses
from biwm.core.data import encode_clips, latent_aligned_camera, video_frames_for
from biwm.core.idm import InverseDynamicsModel, action_accuracy, evaluate_idm
from biwm.core.metrics import (diversity, finite_mean, motion, per_chunk, pose_errors, psnr, psnr_per_chunk,
                                sharpness, ssim)
from biwm.core.sampling import RolloutSession, Sampler
from biwm.core.toyworld import ToyClips, ToyWorldConfig, render_clips, split_seeds
from biwm.core.video import as_uint8
from biwm.core.window import WorldModel


def shuffled_camera(camera: CameraTrack, history_video_frames: int, config: ToyWorldConfig) -> CameraTrack:
    """Each trajectory's continuation driven by the next trajectory's actions, integrated from its own
    last history pose (so the history is identical and only the commanded motion differs)."""
    actions = camera.actions.clone()
    actions[:, history_video_frames:] = camera.actions.roll(1, dims=0)[:, history_video_frames:]
    c2w = camera.c2w.clone()
    c2w[:, history_video_frames:] = actions_to_poses(actions[:, history_video_frames:],
                                                      camera.c2w[:, history_video_frames - 1],
                                                      config.move_step, config.turn_step_deg)
    return CameraTrack(c2w, camera.intrinsics, actions)


def rollout_video(world: WorldModel, text: Tensor, null_text: Tensor, history: Tensor, camera: CameraTrack,
                  chunks: int, chunk_frames: int, sampler: Sampler, seed: int, attention: str | None = None,
                  on_chunk: Callable[[int], None] | None = None) -> Tensor:
    """Roll out from latent ``history`` with ``camera`` (video rate, T = 1 + tf*(F-1) frames covering
    history and continuation) and decode as it goes: the continuation's frames [B, T', 3, H, W] in
    [-1, 1], on the CPU. ``on_chunk(i)`` is called as each chunk is decoded."""
    tf = world.backbone.temporal_factor
    camera = latent_aligned_camera(camera, tf).to(history.device)
    h_video = history.shape[2] * tf
    session = RolloutSession(world, text, null_text, history, sampler, camera.frames(slice(0, h_video)),
                             torch.Generator().manual_seed(seed), attention, chunk_frames, decode=True,
                             frames_dtype=torch.float32)
    session.run(chunks, camera.frames(slice(h_video, None)), None if on_chunk is None else lambda i, _: on_chunk(i))
    frames = torch.cat(session.finish(), dim=1)  # [B, T', H, W, 3]
    # laid out in memory as [B, 3, T', H, W], as the scores were always computed (sums run in memory order)
    return frames.permute(0, 4, 1, 2, 3).contiguous().transpose(1, 2)


def quality_scores(generated: Tensor, truth: Tensor, frames_per_chunk: int, prefix: str = "") -> dict[str, Any]:
    """PSNR and SSIM against the truth, overall and per chunk, with the drop from the first chunk
    to the last (the drift), and the sharpness."""
    psnr_chunks = psnr_per_chunk(generated, truth, frames_per_chunk)  # [B, C]
    ssim_frames = ssim(generated, truth)  # [B, T]
    ssim_chunks = per_chunk(ssim_frames, frames_per_chunk).mean(2)
    p = [finite_mean(psnr_chunks[:, i]) for i in range(psnr_chunks.shape[1])]
    s = ssim_chunks.mean(0).tolist()
    last = len(p)
    return {f"{prefix}psnr": finite_mean(psnr(generated, truth)), f"{prefix}ssim": float(ssim_frames.mean()),
            f"{prefix}psnr_per_chunk": p, f"{prefix}ssim_per_chunk": s,
            f"{prefix}psnr_chunk1": p[0], f"{prefix}psnr_chunk{last}": p[-1],
            f"{prefix}psnr_drop_1_to_{last}": p[0] - p[-1],
            f"{prefix}ssim_chunk1": s[0], f"{prefix}ssim_chunk{last}": s[-1],
            f"{prefix}sharpness": sharpness(generated, truth)}


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


def dynamics_scores(world: WorldModel, text: Tensor, null_text: Tensor, config: ToyWorldConfig, scenes: int,
                    samples: int, history_frames: int, chunks: int, chunk_frames: int, sampler: Sampler, seed: int,
                    attention: str | None, device: torch.device, threshold: float = 0.1,
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
    generated = as_uint8(rollout_video(world, text[:1].expand(len(rows), -1, -1), null_text, history, camera,
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
