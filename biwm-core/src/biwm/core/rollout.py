"""Chunk-by-chunk bidirectional autoregressive rollout of a whole trajectory (METHODS.md §1): a loop over
:class:`biwm.core.sampling.RolloutSession`."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack
from biwm.core.protocols import AttentionMode
from biwm.core.sampling import RolloutSession, Sampler, guided_velocity  # noqa: F401 (guided_velocity: re-export)
from biwm.core.text import TextConditioning
from biwm.core.window import WorldModel


@torch.no_grad()
def rollout(world: WorldModel, text: TextConditioning, null_text: TextConditioning, history: Tensor | None,
            camera: CameraTrack | None, chunks: int, chunk_frames: int, steps: int, shift: float,
            cfg_scale: float = 1.0, generator: torch.Generator | None = None, attention: AttentionMode | None = None,
            on_chunk: Callable[[int, Tensor], None] | None = None, student_sigmas: Tensor | None = None,
            sampler: Sampler | None = None) -> Tensor:
    """Generate ``chunks`` chunks of ``chunk_frames`` latent frames after ``history``.

    ``camera`` is latent-aligned at video rate and covers history + all generated frames.
    Returns the generated latents only, [B, C, chunks*K, h, w]; ``on_chunk(i, latents)`` sees
    each chunk as soon as it is done (streaming decode). A CUDA ``generator`` keeps the loop free of
    host synchronisation (see :mod:`biwm.core.speed`). With ``student_sigmas`` (a distilled
    generator) each chunk takes those few steps, re-noising its x̂0 in between, without guidance.
    A whole ``sampler`` (e.g. one with ``history_sigma``) replaces steps, shift, cfg_scale and
    student_sigmas.
    """
    if history is None:
        raise ValueError("rollout needs at least the latent grid size: pass history (possibly with 0 frames)")
    if sampler is None:
        sampler = Sampler(steps, shift, cfg_scale, student=student_sigmas is not None, student_schedule=student_sigmas)
    h_video = history.shape[2] * world.backbone.temporal_factor
    session = RolloutSession(world, text, null_text, history, sampler,
                             None if camera is None else camera.frames(slice(0, h_video)), generator, attention,
                             chunk_frames)
    return session.run(chunks, None if camera is None else camera.frames(slice(h_video, None)), on_chunk)
