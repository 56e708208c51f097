"""Few-step distillation by distribution matching (DMD, METHODS.md §3), the pieces the ``distill``
stage puts together.

- The student denoises a chunk in a few steps (``student_sigmas``): at each step it predicts x̂0,
  which is re-noised with fresh noise to the next sigma (consistency-style sampling).
- ``self_rollout`` generates several chunks on the student's **own** history. Backward simulation:
  one exit step, drawn per iteration, ends every chunk's denoising; only that step keeps a graph.
- ``dmd_loss`` pushes a generated chunk along (x̂0_fake - x̂0_real): the critic's denoising minus
  the teacher's (with CFG), normalised per sample. ``critic_loss`` is plain flow matching on the
  student's detached samples.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from biwm.core.camera import CameraTrack
from biwm.core.sampling import few_step_chunk, guided_velocity, randn, share_rows, student_sigmas  # noqa: F401 (re-exported)
from biwm.core.schedule import add_noise, predict_x0, training_sigmas, velocity_target
from biwm.core.text import TextConditioning
from biwm.core.window import Window, WorldModel, noise_history


@dataclass
class RolledChunk:
    """One generated chunk (x̂0, with a graph at the exit step when training) and the window it was
    generated in: the teacher and critic see exactly this history, camera and text."""

    latents: Tensor
    window: Window


def self_rollout(world: WorldModel, text: TextConditioning, history: Tensor, camera: CameraTrack | None, chunks: int,
                 chunk_frames: int, sigmas: Tensor, generator: torch.Generator, exit_step: int | None = None,
                 attention: str | None = None, history_sigma: float = 0.0,
                 part: tuple[int, int] | None = None) -> list[RolledChunk]:
    """``chunks`` chunks, each conditioned on the true ``history`` followed by the student's own
    (detached) earlier chunks. ``camera`` (latent-aligned, video rate) covers all of them.
    ``history_sigma`` > 0 noises each chunk's history to that level, as the student samples at
    inference (the teacher and critic then judge the chunk in that same noised window).
    ``part`` (rank, processes): the batch is this rank's share of a global batch (see :func:`randn`)."""
    bb = world.backbone
    tf = bb.temporal_factor
    batch, channels = history.shape[0], history.shape[1]
    shape = (batch, channels, chunk_frames, *history.shape[-2:])
    device = history.device

    def noise() -> Tensor:
        return randn(shape, generator, device, part)

    out: list[RolledChunk] = []
    for c in range(chunks):
        end = history.shape[2] + chunk_frames
        window = Window(text=text, chunk=history.new_zeros(shape), timestep=history.new_zeros(batch), history=history,
                        camera=None if camera is None else camera.frames(slice(0, end * tf)), attention=attention)
        if history_sigma > 0:
            window = noise_history(window, history_sigma, randn(history.shape, generator, device, part))
        x0 = few_step_chunk(world, window, sigmas, noise, exit_step)
        out.append(RolledChunk(x0, window))
        history = torch.cat([history, x0.detach()], dim=2)
    return out


def sample_timestep(batch: int, shift: float, sigma_min: float, sigma_max: float, generator: torch.Generator,
                    part: tuple[int, int] | None = None) -> Tensor:
    """DMD's noise level (sigma) per sample: shifted uniform, clamped to [sigma_min, sigma_max]
    (``part``: this rank's rows of the global batch's draw, see :func:`randn`)."""
    return share_rows(training_sigmas(batch * (part[1] if part else 1), shift, generator), part).clamp(sigma_min,
                                                                                                     sigma_max)


def dmd_direction(x: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """(x̂0_fake - x̂0_real) / mean|x - x̂0_real|, per sample. The scale is floored (x equal to
    x̂0_real gives a zero direction, not 0/0), and NaN or inf in the predictions stay NaN or inf,
    so a diverged teacher or critic fails the stage's loss check instead of training on zeros."""
    dims = tuple(range(1, x.dim()))
    scale = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return (x0_fake - x0_real) / scale


def dmd_loss(chunk: RolledChunk, teacher: WorldModel, critic: WorldModel, null_text: TextConditioning, cfg_scale: float,
             sigma: Tensor, generator: torch.Generator, weights: Tensor | None = None,
             teacher_context: Callable = nullcontext, part: tuple[int, int] | None = None) -> Tensor:
    """0.5 ‖x - sg(x - g)‖², whose gradient on the generated chunk x is the DMD direction g (times
    optional per-sample ``weights``, e.g. forward-KL's h(r)). Teacher and critic denoise the same
    noisy chunk in the generator's own window; neither gets gradients. ``teacher_context`` wraps
    the teacher's forward (a LoRA critic's base runs as the teacher with its adapters off)."""
    x = chunk.latents
    b = x.shape[0]
    noise = randn(x.shape, generator, x.device, part)
    x_t = add_noise(x.detach(), noise, sigma)
    noisy = chunk.window.with_chunk(x_t, teacher.backbone.timestep(sigma))
    with torch.no_grad():
        with teacher_context():
            x0_real = predict_x0(x_t, guided_velocity(teacher, noisy, null_text, cfg_scale).to(x.dtype), sigma)
        x0_fake = predict_x0(x_t, critic(noisy).to(x.dtype), sigma)
        direction = dmd_direction(x.detach(), x0_real, x0_fake)
        if weights is not None:
            direction = direction * weights.view(b, *([1] * (x.dim() - 1)))
    return 0.5 * F.mse_loss(x.float(), (x.detach() - direction).float())


@dataclass
class DistillStep:
    """What the distillation losses see for one generated chunk."""

    chunk: RolledChunk
    teacher: WorldModel
    critic: WorldModel
    null_text: TextConditioning
    teacher_cfg: float
    sigma: Tensor  # DMD's noise level per sample, [B]
    critic_shift: float  # sigma shift of the critic's flow-matching loss
    generator: torch.Generator
    teacher_context: Callable = nullcontext  # e.g. LoRA adapters off: the critic's base is the teacher
    real: RolledChunk | None = None  # the true chunk at the same place, in its true-history window (GAN)
    dmd_weights: Tensor | None = None  # per-sample DMD weights (forward-KL sets them in prepare())
    part: tuple[int, int] | None = None  # (rank, processes) under FSDP2: the batch is this rank's share


class DMDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, gt=0, description="scale of the DMD generator loss")


class DMD(nn.Module):
    """The built-in loss ``dmd``: the DMD generator update, and the critic's flow matching on
    generated samples (the fake score it needs)."""

    def __init__(self, options: DMDOptions | None = None, **_):
        super().__init__()
        self.weight = (options or DMDOptions()).weight

    def generator_loss(self, step: DistillStep) -> Tensor:
        return self.weight * dmd_loss(step.chunk, step.teacher, step.critic, step.null_text, step.teacher_cfg,
                                      step.sigma, step.generator, step.dmd_weights, step.teacher_context,
                                      step.part)

    def critic_loss(self, step: DistillStep) -> Tensor:
        return critic_loss(step.chunk, step.critic, step.critic_shift, step.generator, step.part)


def critic_loss(chunk: RolledChunk, critic: WorldModel, shift: float, generator: torch.Generator,
                part: tuple[int, int] | None = None) -> Tensor:
    """Flow matching of the critic on the generator's detached sample, in the same window (``part``:
    this rank's share of a global batch, see :func:`randn`)."""
    x0 = chunk.latents.detach()
    b = x0.shape[0]
    noise = randn(x0.shape, generator, x0.device, part)
    sigma = share_rows(training_sigmas(b * (part[1] if part else 1), shift, generator), part).to(x0.device)
    v = critic(chunk.window.with_chunk(add_noise(x0, noise, sigma), critic.backbone.timestep(sigma)))
    return F.mse_loss(v.float(), velocity_target(x0, noise).float())
