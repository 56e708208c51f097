"""Scoring a world model's rollouts against a dataset's true continuations: the evaluate stage's frame.

Generic scores, for any dataset: **quality over time**, PSNR / SSIM against the true
continuation per chunk (the drift curve) and sharpness. A dataset that knows more about its
clips adds scores of its own through :class:`biwm.core.protocols.EvaluationScores` (the toy
world of biwm-toyworld: camera following judged by an inverse-dynamics model, the
shuffled-actions baseline, still-camera dynamics and diversity); the stage hands it an
:class:`EvaluationRun`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack, actions_to_poses
from biwm.core.data import LatentClips, latent_aligned_camera
from biwm.core.metrics import finite_mean, per_chunk, psnr, psnr_per_chunk, sharpness, ssim
from biwm.core.sampling import RolloutSession, Sampler
from biwm.core.text import TextConditioning
from biwm.core.window import WorldModel

if TYPE_CHECKING:
    from biwm.core.protocols import ActionSteps


@dataclass
class EvaluationRun:
    """One evaluation as the evaluate stage runs it: what a dataset's
    :class:`biwm.core.protocols.DatasetScorer` scores with."""

    world: WorldModel  # the model evaluated, in eval mode on the stage's device
    sampler: Sampler  # how it samples
    text: TextConditioning  # the prompt's, one row per trajectory
    null_text: TextConditioning  # the empty prompt's (classifier-free guidance)
    clips: LatentClips  # the held-out trajectories, their uint8 frames kept
    camera: CameraTrack  # their commanded cameras, video rate, T = 1 + tf*(F-1): history then continuation
    history_video_frames: int  # true history, in video frames
    frames_per_chunk: int  # video frames per generated chunk
    roll: Callable[..., Tensor]  # roll(model, sampler[, camera]) -> continuation [B, T', 3, H, W] in [-1, 1]
    progress: Callable[[], None]  # call once per chunk a scorer rolls out itself (the progress bar)

    @property
    def truth(self) -> Tensor:
        """The true continuation [B, T', 3, H, W] uint8."""
        return self.clips.frames[:, self.history_video_frames:]

    @property
    def last_history(self) -> Tensor:
        """The last true history frame [B, 1, 3, H, W] uint8."""
        return self.clips.frames[:, self.history_video_frames - 1:self.history_video_frames]


def shuffled_camera(camera: CameraTrack, history_video_frames: int, steps: "ActionSteps") -> CameraTrack:
    """Each trajectory's continuation driven by the next trajectory's actions, integrated from its own
    last history pose with ``steps`` (the dataset's :class:`biwm.core.protocols.ActionSteps`), so the
    history is identical and only the commanded motion differs."""
    actions = camera.actions.clone()
    actions[:, history_video_frames:] = camera.actions.roll(1, dims=0)[:, history_video_frames:]
    c2w = camera.c2w.clone()
    c2w[:, history_video_frames:] = actions_to_poses(actions[:, history_video_frames:],
                                                      camera.c2w[:, history_video_frames - 1],
                                                      steps.move_step, steps.turn_step_deg)
    return CameraTrack(c2w, camera.intrinsics, actions)


def rollout_video(world: WorldModel, text: TextConditioning, null_text: TextConditioning, history: Tensor,
                  camera: CameraTrack, chunks: int, chunk_frames: int, sampler: Sampler, seed: int,
                  attention: str | None = None, on_chunk: Callable[[int], None] | None = None) -> Tensor:
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
