"""The plugin protocols and the data structures they exchange.

Keep them small: the window engine (``biwm.core.window``) composes them.

What a plugin must know beyond the method signatures (the registry checks the first two when the
plugin registers, and lists a plugin that breaks them as ``broken``):

- **How factories are called.** ``register(name, factory, options=Model, description=...)``; the
  registry calls ``factory(options)`` for backbones and quantizers and
  ``factory(options, backbone=backbone)`` for controls, compressors and losses (``options`` is an
  instance of ``Model``; ``backbone`` the model's :class:`Backbone`, for a loss the critic's).
- **A compressor is a** ``torch.nn.Module`` (its parameters, if any, train and save with the
  model); a plain class satisfies ``isinstance(x, HistoryCompressor)`` but cannot be saved.
- **Options are strict.** Whatever ``Model`` declares, the registry uses a subclass that forbids
  unknown fields and numbers outside float32/int64, so a misspelled option is a recipe error.
- **modulation.** A compressor that returns ``HistoryTokens(modulation=None)`` while the model has a
  modulation-targeted control (``actions``) gives the history tokens *no* action control (zeros):
  pool the ``modulation`` it is given exactly like the tokens to keep it.
- **token_budget** takes the token grid of one frame, ``(h', w')`` after the patch embedding (not
  pixels, not latents).
- **A dataset's factory** is called ``factory(options)`` and returns a :class:`ClipSource`; its
  options model is what a recipe's ``data:`` holds (picked by ``data.source``). Its optional
  capabilities (:class:`ActionSteps`, :class:`EvaluationScores`) are found with ``isinstance``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from biwm.core.text import TextConditioning

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from biwm.core.camera import CameraTrack
    from biwm.core.data import LatentClips

AttentionMode = Literal["bidirectional", "causal"]


@dataclass
class BlockOutput:
    """Hidden states after the transformer blocks plus what un-embedding needs."""

    hidden: Tensor  # [B, L, D]
    temb: Tensor  # [B, L, D] per-token timestep embedding


@dataclass
class HistoryTokens:
    """Compressed history: embedded tokens (control already added) and their positions."""

    tokens: Tensor  # [B, L, D]
    positions: Tensor  # [L, 3] float (frame, row, col) in latent-patch units
    modulation: Tensor | None = None  # [B, L, D] control added to the timestep embedding, or None

    @property
    def length(self) -> int:
        return self.tokens.shape[1]


@runtime_checkable
class Backbone(Protocol):
    """A pretrained video DiT + latent codec + text encoder, at the level BiWM needs.

    Optional capabilities, each its own protocol below, checked with ``isinstance`` where used:
    :class:`AttentionKernelChoice`, :class:`ChannelsLastDecoder` and :class:`CompilableDecoder`
    (``biwm.core.speed.SpeedOptions``; a backbone without them runs with attention "auto" and its
    decoder as it is, and asking for more is a clear error) and :class:`BlockAccess` (losses that
    read hidden states, such as ``gan``)."""

    hidden_dim: int
    latent_channels: int
    patch_size: tuple[int, int, int]
    temporal_factor: int  # video frames per latent frame (after the first)
    spatial_factor: int  # pixels per latent pixel

    def trainable(self) -> nn.Module: ...

    def patch_embed(self, latents: Tensor) -> Tensor:
        """[B, C, F, h, w] -> [B, D, F/pt, h/ph, w/pw] with the backbone's own patch embedding."""

    @property
    def patch_embedding(self) -> nn.Conv3d:
        """The backbone's patch embedding as a convolution over the latent channels (compressors derive
        coarser kernels from it): its own, or an equivalent copy where the patchifier is not one (LTX-2's
        Linear over packed patches, HunyuanVideo-1.5's extra conditioning channels)."""

    def attention_features(self, tokens: Tensor, block: int = 0) -> tuple[Tensor, Tensor]:
        """Self-attention queries and keys [B, L, heads, head_dim] of ``block`` for [B, L, D] tokens,
        before rotary embedding (history selection by attention score)."""

    def rotary(self, positions: Tensor) -> Any:
        """Rotary embedding for arbitrary (also fractional) [L, 3] (frame, row, col) positions."""

    def run_blocks(self, tokens: Tensor, timesteps: Tensor, text: TextConditioning, rotary: Any,
                   attention_mask: Tensor | None = None, modulation: Tensor | None = None) -> BlockOutput:
        """Transformer blocks on [B, L, D] with per-token timesteps [B, L]; ``modulation`` [B, L, D] is
        added to the per-token timestep embedding (AdaLN conditioning). ``text``: what
        :meth:`encode_text` made, one row per sample; the backbone decides how its encoders' embeddings
        and masks condition the blocks (padding, ``mask`` False, must not)."""

    def unembed(self, out: BlockOutput, grid: tuple[int, int, int]) -> Tensor:
        """Output tokens (in grid order) -> latents [B, C, F, h, w]."""

    def encode_video(self, frames: Tensor) -> Tensor:
        """Frames [B, 3, T, H, W] in [-1, 1] -> latents [B, C, F, h, w]."""

    def decode_video(self, latents: Tensor) -> Tensor:
        """Latents -> frames [B, 3, T, H, W] in [-1, 1]."""

    def stream_decoder(self) -> "StreamDecoder": ...

    def encode_text(self, prompts: list[str]) -> TextConditioning:
        """One row per prompt, float32 embeddings; the empty prompt is classifier-free guidance's null
        condition."""

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep for noise level ``sigma`` in [0, 1], in the convention its timestep
        embedding was trained on (Wan: 1000 sigma, :func:`biwm.core.schedule.timestep`). Every window
        BiWM builds gets its timesteps from here."""


@runtime_checkable
class AttentionKernelChoice(Protocol):
    """A backbone whose transformer attention can be pinned to one SDPA kernel."""

    def set_attention_kernel(self, name: str) -> None:
        """One of "auto", "flash", "cudnn", "efficient", "math"."""


@runtime_checkable
class ChannelsLastDecoder(Protocol):
    """A backbone whose video decoder's Conv3d weights can be made channels-last."""

    def channels_last_decoder(self) -> None: ...


@runtime_checkable
class CompilableDecoder(Protocol):
    """A backbone whose video decoder can be ``torch.compile``d in place."""

    def compile_decoder(self, **torch_compile_kwargs: Any) -> None: ...


@runtime_checkable
class BlockAccess(Protocol):
    """A backbone that hands out its transformer blocks in order (for losses that read hidden states):
    modules called once per block on a window, each returning the video tokens' hidden states [B, L, D],
    or a tuple that starts with them (dual-stream blocks also return the text stream's)."""

    def block_modules(self) -> list[nn.Module]: ...


class StreamDecoder(Protocol):
    """Decodes a rollout chunk by chunk; carries whatever state the codec needs across chunks."""

    def decode(self, latents: Tensor) -> Tensor: ...


@runtime_checkable
class ControlInjector(Protocol):
    """Camera/action control -> embeddings added to the patch tokens or, with ``target ==
    "modulation"``, to the per-token timestep embedding (zero-initialised either way)."""

    target: Literal["tokens", "modulation"]

    def forward(self, camera: "CameraTrack", grid: tuple[int, int, int], backbone: Backbone) -> Tensor:
        """Video-rate camera for ``grid[0]`` latent frames -> [B, D, F, h', w'] aligned with patch tokens."""


@runtime_checkable
class HistoryCompressor(Protocol):
    """History latents -> a bounded number of history tokens with positions. Must be an
    ``nn.Module`` (see the module docstring); returning ``modulation=None`` zeroes the history's
    modulation-targeted control."""

    def compress(self, latents: Tensor, frame_index: Tensor, control: Tensor | None,
                 backbone: Backbone, modulation: Tensor | None = None, query: Tensor | None = None) -> HistoryTokens:
        """``latents`` [B, C, F, h, w] clean history frames read (see ``frames_needed``) at
        latent-frame positions ``frame_index`` [F]; ``control`` / ``modulation`` the token- and
        modulation-targeted control of those frames at token resolution [B, D, F, h', w'] or None,
        to be pooled exactly like the tokens. ``query`` [B, Lc, D]: the embedded tokens of the chunk
        being generated (for selection by attention score), or None. Returned positions are in the
        window's frame coordinates: the chunk starts at frame ``frame_index[-1] + 1``."""

    def frames_needed(self, history_length: int) -> "slice | list[int]":
        """Which history latent frames the compressor reads (so callers embed only those): a slice,
        or a sorted list of frame indices."""

    def token_budget(self, history_length: int, grid_hw: tuple[int, int]) -> int:
        """The most history tokens :meth:`compress` returns for ``history_length`` latent frames
        whose token grid is ``grid_hw`` = (h', w'), the patch-embedded rows and columns of one frame."""


@runtime_checkable
class DistillLoss(Protocol):
    """A term of the stage-2 objective (DMD, GAN, forward-KL), built by the ``distill`` stage with
    its options (and ``backbone=``, the critic's). Both methods see one generated chunk as a
    ``biwm.core.dmd.DistillStep`` and return a scalar to add to that side's loss, or None. Optional:
    ``prepare(step)``, called on every loss before any generator loss (to set ``step.dmd_weights``);
    ``bind(losses)``, called once with all the stage's losses; a class attribute ``requires``
    naming losses that must be in the same stage. A loss that is an ``nn.Module`` with parameters
    (a discriminator head) has them trained with the critic."""

    def generator_loss(self, step: Any) -> Tensor | None: ...

    def critic_loss(self, step: Any) -> Tensor | None: ...


@runtime_checkable
class ClipSource(Protocol):
    """A dataset, as the stages read it: clips of latents (encoded with the model's backbone) with
    their cameras and actions, for a split, plus the text prompt and the training-set size. Clips
    whose captions differ carry their own text conditioning (``LatentClips.text``, one row per clip,
    encoded by the backbone's text encoder); the stages then condition each clip on its own.

    Optional capabilities, each a protocol of its own that the stages check with ``isinstance``:
    :class:`ActionSteps` (its action labels integrate to poses: generate's shuffled-actions
    baseline and key strings) and :class:`EvaluationScores` (scores only it can give, added to the
    evaluate stage's). A dataset without them gets the generic rollouts and scores, with a note.
    Its options model may also have ``frame_size_fields() -> {path under data: size}`` for the
    fields that set the frame size (validation checks them against the backbone)."""

    prompt: str  # the text prompt of every clip that carries no text of its own (LatentClips.text None)
    train_clips: int  # clips a training stage reads
    frames: int  # video frames per training clip

    def latents(self, split: Literal["train", "heldout"], count: int, latent_frames: int, backbone: Backbone,
                cache_dir: "Path | None", cache_key: str, device: torch.device | str = "cpu",
                keep_frames: bool = False, start: int = 0) -> "LatentClips":
        """Clips ``start .. start+count-1`` of ``split``, ``latent_frames`` latent frames each, encoded
        by ``backbone`` (``LatentClips.frames``: the uint8 video frames when ``keep_frames``), cached
        under ``cache_dir`` (None: no cache) by a key that includes ``cache_key``."""


@runtime_checkable
class StreamedClips(Protocol):
    """Optional on a :class:`ClipSource`: training batches read from storage as they are needed (a
    latent cache, memory-mapped) instead of every training clip held in memory.

    ``train_batches`` returns an endless iterator of :class:`LatentClips` of ``batch_size`` clips,
    ``latent_frames`` each, shuffled across the whole training split (this ``rank``'s share of
    ``world_size``) and drawn without replacement: every run of as many clips as the share holds
    is each of its clips once (a batch may straddle two such passes); with their own text
    conditioning when their captions differ. None when it has nothing stored for ``cache_key`` (the
    stage then reads :meth:`ClipSource.latents` as usual). The stages train on each batch's clips
    in its order."""

    def train_batches(self, batch_size: int, latent_frames: int, backbone: Backbone, cache_key: str, seed: int,
                      rank: int = 0, world_size: int = 1) -> "Iterator[LatentClips] | None": ...


@runtime_checkable
class ActionSteps(Protocol):
    """Optional on a :class:`ClipSource`: its action labels integrate to poses
    (:func:`biwm.core.camera.actions_to_poses`), ``move_step`` world units per move and
    ``turn_step_deg`` degrees per turn."""

    move_step: float
    turn_step_deg: float


@runtime_checkable
class EvaluationScores(Protocol):
    """Optional on a :class:`ClipSource`: scores that only this dataset can give (it knows more than
    its frames: a judge of camera following, scenes it can render again), added to the evaluate
    stage's metrics under names of its own. Core names none of them.

    ``evaluation_scorer(ctx, config)`` is called once per evaluation before any rollout (``ctx``
    the :class:`biwm.core.runner.RunContext`, ``config`` the stage's ``EvaluateConfig``); it may
    load or train what it judges with."""

    def evaluation_scorer(self, ctx: Any, config: Any) -> "DatasetScorer": ...


@runtime_checkable
class DatasetScorer(Protocol):
    """A dataset's scores for one evaluation (made by :meth:`EvaluationScores.evaluation_scorer`).
    ``run`` is the :class:`biwm.core.evaluation.EvaluationRun`; each method returns metrics by name.

    ``headline``: the names among its rollout scores that stand for the rest: logged to the tracker
    and, for a distilled model compared with its teacher, reported as ``student_NAME``;
    ``teacher_keys``: those reported for that teacher's rollout as ``teacher_NAME``."""

    headline: tuple[str, ...]
    teacher_keys: tuple[str, ...]

    def extra_chunks(self, trajectories: int) -> int:
        """Chunks its own rollouts in :meth:`dataset_scores` take (the progress bar's share)."""

    def rollout_scores(self, run: Any, video: Tensor, camera: "CameraTrack") -> dict[str, Any]:
        """Scores of one rollout of the evaluation's trajectories (the model's, and a distilled model's
        teacher's): ``video`` [B, T', 3, H, W] in [-1, 1] after the true history, driven by ``camera``
        (video rate, history included)."""

    def dataset_scores(self, run: Any) -> dict[str, Any]:
        """Its own scores, once, after the model's rollout: baselines, its judge on the true clips,
        scenes of its own (rolled out with ``run.roll`` or ``run.world``, calling ``run.progress()``
        per chunk)."""

    def summary(self, metrics: dict[str, Any]) -> str:
        """Its part of the stage's one-line summary ("" for none)."""


@runtime_checkable
class Quantizer(Protocol):
    """Converts a model's linear layers for training or inference.

    Optional: ``full_precision(module)``, a context manager in which the linears it converted for
    training multiply their full-precision weights; with it, options that have a ``self_distill``
    weight get the stages' self-distillation term (:mod:`biwm.core.selfdistill`)."""

    def convert(self, module: nn.Module, *, training: bool) -> nn.Module: ...

    def requirements(self) -> str: ...


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters so the control branch starts as a no-op."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def grid_positions(frames: Tensor | int, height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """[F*h*w, 3] float (frame, row, col) positions of a token grid, in the patch-embedding order."""
    if isinstance(frames, int):
        frames = torch.arange(frames, device=device)
    frames = frames.to(device=device, dtype=torch.float64)
    rows = torch.arange(height, device=device, dtype=torch.float64)
    cols = torch.arange(width, device=device, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(frames, rows, cols, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)
