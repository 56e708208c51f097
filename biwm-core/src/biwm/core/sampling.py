"""Sampling a chunk, and rolling out chunk by chunk (METHODS.md §1, §3).

- :class:`Sampler`: how one chunk is denoised. The teacher's Euler steps on the flow-matching ODE
  with optional classifier-free guidance, or (``student``) a distilled generator's few steps,
  re-noising its x̂0 in between, without guidance.
- :class:`RolloutSession`: an open rollout that owns its history and camera track, driven one
  chunk at a time (``session.step(camera_of_the_chunk)``), as interactive play needs. Rolling out
  a whole trajectory (:func:`biwm.core.rollout.rollout`) is a loop over ``step``.

This module imports neither ``rollout`` nor ``dmd``: both import from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack
from biwm.core.protocols import AttentionMode
from biwm.core.schedule import add_noise, euler_step, predict_x0, sampling_sigmas, shift_sigma, timestep
from biwm.core.window import Window, WorldModel, noise_history


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
        history_sigma=None if window.history_sigma is None else window.history_sigma.repeat(2),
    )
    cond, uncond = world(doubled).chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def student_sigmas(steps: int, shift: float, device: torch.device | str = "cpu") -> Tensor:
    """The student's sigmas, ``steps`` of them from 1 down plus a final 0: t = 1000, 750, 500, 250
    warped by shift 5 gives 1000, 937.5, 833.3, 625."""
    return torch.cat([shift_sigma(torch.linspace(1.0, 0.0, steps + 1, device=device)[:-1], shift),
                      torch.zeros(1, device=device)])


def few_step_chunk(world: WorldModel, window: Window, sigmas: Tensor, noise: Callable[[], Tensor],
                   exit_step: int | None = None) -> Tensor:
    """Denoise ``window``'s chunk from pure noise with the student's steps and return x̂0.

    ``exit_step`` (backward simulation) stops after that step; only it runs with grad (when grad is
    enabled at all). None runs every step without grad, as at inference."""
    steps = len(sigmas) - 1
    last = steps - 1 if exit_step is None else exit_step
    if not 0 <= last < steps:
        raise ValueError(f"exit_step {exit_step} outside the {steps} student steps")
    want_grad = torch.is_grad_enabled() and exit_step is not None
    x = noise()
    batch = x.shape[0]
    for i in range(last + 1):
        with torch.set_grad_enabled(want_grad and i == last):
            v = world(window.with_chunk(x, timestep(sigmas[i].expand(batch))))
            x0 = predict_x0(x, v.to(x.dtype), sigmas[i])
        if i < last:
            x = add_noise(x0.detach(), noise(), sigmas[i + 1].expand(batch))
    return x0


def randn(shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Noise from ``generator`` on its own device (CPU by default, for results that do not depend on
    the GPU); a CUDA generator draws on the GPU, so the rollout never copies from the host."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where).to(device)


@dataclass
class Sampler:
    """How each chunk is denoised: Euler on the flow-matching ODE with optional CFG, or (``student``)
    a distilled generator's few steps, re-noising x̂0 in between, without CFG. ``student_schedule``
    gives the student's sigmas explicitly (default: :func:`student_sigmas` of steps and shift).
    ``history_sigma`` > 0 noises the history to that level once per chunk (fresh noise from the
    generator) and tells the model, for a model trained with noised history (``history_sigma_max``)."""

    steps: int = 20
    shift: float = 3.0
    cfg_scale: float = 1.0
    student: bool = False
    student_schedule: Tensor | None = None
    history_sigma: float = 0.0

    @property
    def nfe_per_chunk(self) -> int:
        return self.steps * (2 if self.cfg_scale != 1.0 and not self.student else 1)

    def describe(self) -> str:
        noised = f", history noised to {self.history_sigma:g}" if self.history_sigma > 0 else ""
        if self.student:
            return f"distilled generator, {self.steps} steps (shift {self.shift}), no CFG{noised}"
        return f"{self.steps} Euler steps (shift {self.shift}), CFG {self.cfg_scale}{noised}"

    @torch.no_grad()
    def sample_chunk(self, world: WorldModel, window: Window, null_text: Tensor,
                     generator: torch.Generator | None) -> Tensor:
        """The clean latents of ``window``'s chunk, denoised from the pure noise it holds; a student
        draws its re-noising from ``generator``."""
        x = window.chunk
        batch, device = x.shape[0], x.device
        if self.history_sigma > 0 and window.history_length:
            window = noise_history(window, self.history_sigma, randn(window.history.shape, generator, device))
        if self.student:
            sigmas = self.student_schedule if self.student_schedule is not None else student_sigmas(
                self.steps, self.shift)
            first = [x]  # the chunk's starting noise, then fresh noise for each re-noising

            def draw() -> Tensor:
                return first.pop() if first else randn(x.shape, generator, device)

            return few_step_chunk(world, window, sigmas.to(device), draw)
        sigmas = sampling_sigmas(self.steps, self.shift, device=device)
        for i in range(self.steps):
            window = window.with_chunk(x, timestep(sigmas[i].expand(batch)))
            v = guided_velocity(world, window, null_text, self.cfg_scale)
            x = euler_step(x, v.to(x.dtype), sigmas[i], sigmas[i + 1])
        return x


class RolloutSession:
    """An open bidirectional autoregressive rollout, one chunk per :meth:`step`.

    ``history`` [B, C, H, h, w] (H may be 0) holds the clean latents so far; ``camera`` (latent-aligned,
    video rate: ``temporal_factor`` frames per latent frame) covers them, or is None for a model
    without control. Each step appends the chunk's camera, samples the chunk with ``sampler`` and
    appends it to the history; the world model's compressor decides what of the history it attends.
    With the same generator and cameras, stepping chunk by chunk gives exactly the frames of a
    whole-trajectory :func:`~biwm.core.rollout.rollout`."""

    def __init__(self, world: WorldModel, text: Tensor, null_text: Tensor, history: Tensor, sampler: Sampler,
                 camera: CameraTrack | None = None, generator: torch.Generator | None = None,
                 attention: AttentionMode = "bidirectional", chunk_frames: int = 4):
        self.world, self.text, self.null_text, self.sampler = world, text, null_text, sampler
        self.history, self.camera, self.generator = history, camera, generator
        self.attention, self.chunk_frames = attention, chunk_frames
        tf = world.backbone.temporal_factor
        if camera is not None and camera.num_frames != history.shape[2] * tf:
            raise ValueError(f"RolloutSession: the camera covers {camera.num_frames} video frames, the history "
                             f"{history.shape[2]} latent frames ({history.shape[2] * tf} at temporal factor {tf})")

    @property
    def frames(self) -> int:
        """Latent frames so far (history and generated)."""
        return self.history.shape[2]

    def step(self, camera: CameraTrack | None = None) -> Tensor:
        """Generate the next chunk under ``camera`` (its ``chunk_frames * temporal_factor`` video
        frames; None for a model without control) and return its latents [B, C, K, h, w]."""
        k, tf = self.chunk_frames, self.world.backbone.temporal_factor
        if (camera is None) != (self.camera is None):
            raise ValueError("RolloutSession.step: give a camera exactly when the session was opened with one")
        if camera is not None:
            if camera.num_frames != k * tf:
                raise ValueError(f"RolloutSession.step: the chunk's camera has {camera.num_frames} video frames, "
                                 f"expected {k * tf} ({k} latent frames)")
            self.camera = CameraTrack(torch.cat([self.camera.c2w, camera.c2w], 1), self.camera.intrinsics,
                                      None if self.camera.actions is None else
                                      torch.cat([self.camera.actions, camera.actions], 1))
        b, c, _, h, w = self.history.shape
        noise = randn((b, c, k, h, w), self.generator, self.history.device)
        window = Window(text=self.text, chunk=noise, timestep=torch.zeros(b, device=noise.device),
                        history=self.history, camera=self.camera, attention=self.attention)
        x = self.sampler.sample_chunk(self.world, window, self.null_text, self.generator)
        self.history = torch.cat([self.history, x], dim=2)
        return x
