"""Sampling a chunk, and rolling out chunk by chunk (METHODS.md §1, §3).

- :class:`Sampler`: how one chunk is denoised. The teacher's Euler steps on the flow-matching ODE
  with optional classifier-free guidance, or (``student``) a distilled generator's few steps,
  re-noising its x̂0 in between, without guidance.
- :class:`RolloutSession`: an open rollout driven one chunk at a time (``session.step(camera)``),
  as interactive play needs. It owns the history and camera track (the world model's compressor
  decides what of them a window attends), the speed options, an optional streaming decoder that
  turns each chunk into frames, and optional timings. Rolling out a whole trajectory
  (:meth:`RolloutSession.run`, :func:`biwm.core.rollout.rollout`) is a loop over ``step``.

This module imports neither ``rollout`` nor ``dmd``: both import from it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from biwm.core.camera import CameraTrack, actions_to_poses
from biwm.core.protocols import AttentionMode
from biwm.core.schedule import add_noise, euler_step, predict_x0, sampling_sigmas, shift_sigma
from biwm.core.speed import Clock, FrameStream, Mark, SpeedOptions, apply_speedups, elapsed
from biwm.core.text import TextConditioning
from biwm.core.window import Window, WorldModel, noise_history


def guided_velocity(world: WorldModel, window: Window, null_text: TextConditioning, cfg_scale: float) -> Tensor:
    """One velocity prediction; with guidance, conditional and unconditional (null text, one row or
    one per sample; control dropped) run as one doubled batch."""
    if cfg_scale == 1.0:
        return world(window)
    b = window.chunk.shape[0]
    cam = window.camera
    doubled = Window(
        text=TextConditioning.cat([window.text, null_text.expand(b)]),
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
            v = world(window.with_chunk(x, world.backbone.timestep(sigmas[i].expand(batch))))
            x0 = predict_x0(x, v.to(x.dtype), sigmas[i])
        if i < last:
            x = add_noise(x0.detach(), noise(), sigmas[i + 1].expand(batch))
    return x0


def randn(shape, generator: torch.Generator | None, device: torch.device,
          part: tuple[int, int] | None = None) -> Tensor:
    """Noise from ``generator`` on its own device (CPU by default, for results that do not depend on
    the GPU); a CUDA generator draws on the GPU, so the rollout never copies from the host.
    ``part`` (rank, processes): ``shape[0]`` is this rank's consecutive share of a global batch; the
    global batch's noise is drawn and this share returned, so N processes draw what one would."""
    where = generator.device if generator is not None else device
    processes = part[1] if part else 1
    return share_rows(torch.randn((shape[0] * processes, *shape[1:]), generator=generator, device=where),
                      part).to(device)


def share_rows(values: Tensor, part: tuple[int, int] | None) -> Tensor:
    """Rank ``part[0]``'s consecutive rows of a global batch's draw ``values`` (all of it without ``part``)."""
    if part is None:
        return values
    rows = values.shape[0] // part[1]
    return values[part[0] * rows:(part[0] + 1) * rows]


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

    def sigmas(self, device: torch.device | str = "cpu") -> Tensor:
        """The noise levels each chunk steps through, from 1 down to 0, on ``device``."""
        if not self.student:
            return sampling_sigmas(self.steps, self.shift, device=device)
        if self.student_schedule is not None:
            return self.student_schedule.to(device)
        return student_sigmas(self.steps, self.shift).to(device)

    @torch.no_grad()
    def sample_chunk(self, world: WorldModel, window: Window, null_text: TextConditioning,
                     generator: torch.Generator | None) -> Tensor:
        """The clean latents of ``window``'s chunk, denoised from the pure noise it holds; a student
        draws its re-noising from ``generator``."""
        x = window.chunk
        batch, device = x.shape[0], x.device
        if self.history_sigma > 0 and window.history_length:
            window = noise_history(window, self.history_sigma, randn(window.history.shape, generator, device))
        sigmas = self.sigmas(device)
        if self.student:
            first = [x]  # the chunk's starting noise, then fresh noise for each re-noising

            def draw() -> Tensor:
                return first.pop() if first else randn(x.shape, generator, device)

            return few_step_chunk(world, window, sigmas, draw)
        for i in range(self.steps):
            window = window.with_chunk(x, world.backbone.timestep(sigmas[i].expand(batch)))
            v = guided_velocity(world, window, null_text, self.cfg_scale)
            x = euler_step(x, v.to(x.dtype), sigmas[i], sigmas[i + 1])
        return x


@dataclass
class ChunkTiming:
    """When the parts of one :meth:`RolloutSession.step` ran, as :class:`~biwm.core.speed.Clock`
    marks (CUDA events on a GPU, read only when asked; seconds of ``perf_counter`` on the CPU):
    read a span with :func:`~biwm.core.speed.elapsed`."""

    start: Mark  # the step began
    sample: tuple[Mark, Mark]  # the sampler's denoising of the chunk
    forwards: list[tuple[Mark, Mark]]  # each world-model forward within it (a CFG step is one doubled forward)
    decode: tuple[Mark, Mark] | None = None  # decoding the chunk to frames (with decode)
    ready: Mark | None = None  # the chunk's frames are in host memory (with decode)


class RolloutSession:
    """An open bidirectional autoregressive rollout, one chunk per :meth:`step`.

    ``history`` [B, C, H, h, w] (H may be 0) holds the clean latents so far; ``camera`` (latent-aligned,
    video rate: ``temporal_factor`` frames per latent frame) covers them, or is None for a model
    without control. Each step appends the chunk's camera, samples the chunk with ``sampler`` and
    appends it to the history; the world model's compressor decides what of the history it attends.
    With the same generator and cameras, stepping chunk by chunk gives exactly the latents of a
    whole-trajectory :func:`~biwm.core.rollout.rollout`. A CUDA ``generator`` draws the noise on the
    GPU, so a step never waits for the host.

    - ``speed``: :class:`~biwm.core.speed.SpeedOptions`; the session converts the world model as they
      ask (once per model, :func:`~biwm.core.speed.apply_speedups`) and decodes on a side stream when
      they ask for ``overlap_decode``. None: the model as it is, decoded inline.
    - ``decode``: each step also decodes its chunk with the backbone's streaming decoder (primed with
      the history, so the frames continue it) to frames [B, T, H, W, 3] of ``frames_dtype`` in host
      memory (uint8, or float in [-1, 1]), handed over by :meth:`ready` and :meth:`finish`.
    - ``timing``: each step appends a :class:`ChunkTiming` to ``timings`` (no host synchronisation:
      on a GPU the marks are CUDA events, read after the loop)."""

    def __init__(self, world: WorldModel, text: TextConditioning, null_text: TextConditioning, history: Tensor,
                 sampler: Sampler, camera: CameraTrack | None = None, generator: torch.Generator | None = None,
                 attention: AttentionMode | None = None, chunk_frames: int = 4, *,
                 speed: SpeedOptions | None = None, decode: bool = False, frames_dtype: torch.dtype = torch.uint8,
                 timing: bool = False):
        tf = world.backbone.temporal_factor
        if camera is not None and camera.num_frames != history.shape[2] * tf:
            raise ValueError(f"RolloutSession: the camera covers {camera.num_frames} video frames, the history "
                             f"{history.shape[2]} latent frames ({history.shape[2] * tf} at temporal factor {tf})")
        device = history.device
        if sampler.student:  # its schedule on the device once, not copied there every chunk
            sampler = replace(sampler, student_schedule=sampler.sigmas(device))
        if speed is not None:
            apply_speedups(world, speed)
        self.world, self.text, self.null_text, self.sampler, self.speed = world, text, null_text, sampler, speed
        self.history, self.camera, self.generator = history, camera, generator
        self.attention, self.chunk_frames = attention, chunk_frames
        self.clock = Clock(device)
        self.timings: list[ChunkTiming] | None = [] if timing else None
        self.stream: FrameStream | None = None
        if decode:
            decoder = world.backbone.stream_decoder()
            if history.shape[2]:
                with torch.no_grad():
                    decoder.decode(history)  # the decoder's state continues the history's frames
            overlap = speed is not None and speed.overlap_decode
            self.stream = FrameStream(decoder, device, overlap, frames_dtype)

    @classmethod
    def from_prompt(cls, world: WorldModel, history: Tensor, prompt: str = "", sampler: Sampler | None = None,
                    camera: CameraTrack | None = None, **kwargs) -> "RolloutSession":
        """A session from a prompt string: the backbone's text encoder embeds ``prompt`` for every clip
        of ``history`` and the empty prompt for classifier-free guidance. ``sampler``: the model's own
        (the second value of :func:`biwm.core.load`; None: :class:`Sampler` defaults). Other keyword
        arguments are the constructor's (``generator``, ``speed``, ``decode``, ...)::

            world, sampler = biwm.core.load("examples/weights/toyworld-teacher")
            session = RolloutSession.from_prompt(world, history, "a room", sampler, camera)
            latents = session.step(torch.tensor([[KEY] * 4]))  # one chunk, driven by action labels
        """
        if not isinstance(prompt, str):
            raise TypeError(f"RolloutSession.from_prompt: prompt must be a str, got {type(prompt).__name__}")
        with torch.no_grad():
            text = world.backbone.encode_text([prompt]).to(history.device)
            null = world.backbone.encode_text([""]).to(history.device)
        return cls(world, text.expand(history.shape[0]), null, history, sampler or Sampler(), camera, **kwargs)

    @property
    def frames(self) -> int:
        """Latent frames so far (history and generated)."""
        return self.history.shape[2]

    @torch.no_grad()
    def step(self, camera: CameraTrack | Tensor | None = None, move_step: float = 0.15,
             turn_step_deg: float = 5.0) -> Tensor:
        """Generate the next chunk under ``camera`` (its ``chunk_frames * temporal_factor`` video
        frames; None for a model without control) and return its latents [B, C, K, h, w]. With
        ``decode`` its frames follow through :meth:`ready` / :meth:`finish`.

        ``camera`` may also be the chunk's action labels [B, K*tf] (keys, as in interactive play):
        they are integrated into poses from the last pose the session holds, ``move_step`` and
        ``turn_step_deg`` per frame (the toy world's defaults), with the session's intrinsics."""
        start = self.clock.mark() if self.timings is not None else None
        k, tf = self.chunk_frames, self.world.backbone.temporal_factor
        if (camera is None) != (self.camera is None):
            raise ValueError("RolloutSession.step: give a camera exactly when the session was opened with one")
        if isinstance(camera, Tensor):
            if camera.dim() != 2 or camera.shape != (self.camera.c2w.shape[0], k * tf) or camera.is_floating_point():
                raise ValueError(f"RolloutSession.step: action labels must be integers [B, K*tf] = "
                                 f"{[self.camera.c2w.shape[0], k * tf]}, got {camera.dtype} {list(camera.shape)}")
            actions = camera.to(self.camera.c2w.device, torch.long)
            camera = CameraTrack(actions_to_poses(actions, self.camera.c2w[:, -1], move_step, turn_step_deg),
                                 self.camera.intrinsics, actions if self.camera.actions is not None else None)
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
        if self.timings is None:
            x = self.sampler.sample_chunk(self.world, window, self.null_text, self.generator)
        else:
            x, sample, forwards = self._timed_sample(window)
        self.history = torch.cat([self.history, x], dim=2)
        decode, ready = self.stream.submit(x) if self.stream is not None else (None, None)
        if self.timings is not None:
            self.timings.append(ChunkTiming(start, sample, forwards, decode, ready))
        return x

    def _timed_sample(self, window: Window) -> tuple[Tensor, tuple[Mark, Mark], list[tuple[Mark, Mark]]]:
        """``sample_chunk`` with a mark before and after it and around each world-model forward
        (module hooks, held only for this chunk)."""
        marks: list[Mark] = []
        hooks = [self.world.register_forward_pre_hook(lambda *_: marks.append(self.clock.mark())),
                 self.world.register_forward_hook(lambda *_: marks.append(self.clock.mark()))]
        try:
            begin = self.clock.mark()
            x = self.sampler.sample_chunk(self.world, window, self.null_text, self.generator)
            end = self.clock.mark()
        finally:
            for hook in hooks:
                hook.remove()
        return x, (begin, end), list(zip(marks[::2], marks[1::2]))

    def run(self, chunks: int, camera: CameraTrack | None = None,
            on_chunk: Callable[[int, Tensor], None] | None = None) -> Tensor:
        """``chunks`` steps; ``camera`` (video rate) covers them, from the first frame after what the
        session holds. Returns their latents [B, C, chunks*K, h, w]; ``on_chunk(i, latents)`` sees
        each chunk as soon as it is sampled."""
        per_chunk = self.chunk_frames * self.world.backbone.temporal_factor
        generated = []
        for i in range(chunks):
            x = self.step(None if camera is None else camera.frames(slice(i * per_chunk, (i + 1) * per_chunk)))
            generated.append(x)
            if on_chunk is not None:
                on_chunk(i, x)
        return torch.cat(generated, dim=2)

    def ready(self) -> list[Tensor]:
        """With ``decode``: the frames [B, T, H, W, 3] of the chunks finished since the last call, in
        order; never waits (with inline decode every stepped chunk is finished)."""
        return self._stream().ready()

    def finish(self) -> list[Tensor]:
        """With ``decode``: waits for every stepped chunk's frames; returns those not yet handed over."""
        return self._stream().finish()

    def _stream(self) -> FrameStream:
        if self.stream is None:
            raise ValueError("RolloutSession: open the session with decode=True to get frames")
        return self.stream
