"""Chunk-by-chunk bidirectional autoregressive rollout (METHODS.md §1)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack
from biwm.core.protocols import AttentionMode
from biwm.core.schedule import euler_step, sampling_sigmas
from biwm.core.window import Window, WorldModel


def guided_velocity(world: WorldModel, window: Window, null_text: Tensor, cfg_scale: float) -> Tensor:
    """One velocity prediction; with guidance, conditional and unconditional (null text, control
    dropped) run as one doubled batch."""
    if cfg_scale == 1.0:
        return world(window)
    b = window.chunk.shape[0]
    cam = window.camera
    doubled = Window(
        text=torch.cat([window.text, null_text.expand_as(window.text)]),
        chunk=torch.cat([window.chunk, window.chunk]),
        timestep=torch.cat([window.timestep, window.timestep]),
        history=None if window.history is None else torch.cat([window.history, window.history]),
        camera=None if cam is None else CameraTrack.cat([cam, cam]),
        control_mask=torch.cat([torch.ones(b), torch.zeros(b)]).to(window.chunk.device),
        attention=window.attention,
    )
    cond, uncond = world(doubled).chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Noise from ``generator`` on its own device (CPU by default, for results that do not depend on
    the GPU); a CUDA generator draws on the GPU, so the rollout never copies from the host."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


@torch.no_grad()
def rollout(world: WorldModel, text: Tensor, null_text: Tensor, history: Tensor | None, camera: CameraTrack | None,
            chunks: int, chunk_frames: int, steps: int, shift: float, cfg_scale: float = 1.0,
            generator: torch.Generator | None = None, attention: AttentionMode = "bidirectional",
            on_chunk: Callable[[int, Tensor], None] | None = None, student_sigmas: Tensor | None = None) -> Tensor:
    """Generate ``chunks`` chunks of ``chunk_frames`` latent frames after ``history``.

    ``camera`` is latent-aligned at video rate and covers history + all generated frames.
    Returns the generated latents only, [B, C, chunks*K, h, w]; ``on_chunk(i, latents)`` sees
    each chunk as soon as it is done (streaming decode). A CUDA ``generator`` keeps the loop free of
    host synchronisation (see :mod:`biwm.core.speed`). With ``student_sigmas`` (a distilled
    generator) each chunk takes those few steps, re-noising its x̂0 in between, without guidance.
    """
    bb = world.backbone
    tf = bb.temporal_factor
    batch = text.shape[0]
    h_len = 0 if history is None else history.shape[2]
    channels = bb.latent_channels
    if history is not None:
        hw = history.shape[-2:]
    else:
        raise ValueError("rollout needs at least the latent grid size: pass history (possibly with 0 frames)")
    device = history.device
    sigmas = sampling_sigmas(steps, shift, device=device)
    generated = []
    for c in range(chunks):
        start = h_len + c * chunk_frames
        cam = None if camera is None else camera.frames(slice(0, (start + chunk_frames) * tf))
        noise = _randn((batch, channels, chunk_frames, *hw), generator, device)
        x = noise
        window = Window(text=text, chunk=x, timestep=torch.zeros(batch, device=device), history=history,
                        camera=cam, attention=attention)
        if student_sigmas is not None:
            from biwm.core.dmd import few_step_chunk

            first = [noise]  # the chunk's starting noise, then fresh noise for each re-noising

            def draw() -> Tensor:
                return first.pop() if first else _randn(noise.shape, generator, device)

            x = few_step_chunk(world, window, student_sigmas.to(device), draw)
        else:
            for i in range(steps):
                window = window.with_chunk(x, sigmas[i].expand(batch) * 1000)
                v = guided_velocity(world, window, null_text, cfg_scale)
                x = euler_step(x, v.to(x.dtype), sigmas[i], sigmas[i + 1])
        history = torch.cat([history, x], dim=2)
        generated.append(x)
        if on_chunk is not None:
            on_chunk(c, x)
    return torch.cat(generated, dim=2)
