"""Inference speed-ups, each chosen by option and applied to a built ``WorldModel`` (the torchtitan
pattern: small converters, nothing threaded through the model code); ``FrameStream``, which
turns generated chunks into frames in host memory without stalling the generator; and ``Clock``,
which marks points in time without waiting for the GPU. A ``biwm.core.sampling.RolloutSession``
puts them together.

- ``attention``: which ``scaled_dot_product_attention`` kernel the transformer's attention uses
  (through diffusers' attention dispatcher, so the VAE keeps PyTorch's choice: its attention has
  384-dim heads that only some kernels take).
- ``compile``: ``torch.compile`` of the transformer's repeated blocks (regional compilation,
  static shapes: a window's shape is fixed once the history compressor's budget is full, so a
  rollout compiles a handful of shapes during its first chunks and then reuses them).
- ``compile_decoder``: the same for the codec's decoder, where the backbone offers it.
- ``channels_last_decoder``: the decoder's 3-D convolution weights in channels-last layout, so
  cuDNN's bf16 kernels read and write it without transposing around every convolution.
- ``quantize``: a quantizer plugin (e.g. ``fp8`` from biwm-quant) converts the linear layers.
- ``overlap_decode``: decode on a second CUDA stream, overlapped with the next chunk's denoising,
  and copy the frames to pinned host memory asynchronously; with a CUDA generator for the noise
  (``biwm.core.sampling``) the loop then never waits for the GPU.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from biwm.core.protocols import AttentionKernelChoice, ChannelsLastDecoder, CompilableDecoder
from biwm.core.config import PluginRef
from biwm.core.video import as_uint8
from biwm.core.window import WorldModel

class SpeedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attention: Literal["auto", "flash", "cudnn", "efficient", "math"] = Field(
        "auto", description="scaled_dot_product_attention kernel (auto: PyTorch's choice)")
    compile: bool = Field(False, description="torch.compile the transformer's blocks (static window shapes)")
    compile_mode: str | None = Field(None, description="torch.compile mode of the blocks, e.g. reduce-overhead "
                                                       "(CUDA graphs) or max-autotune-no-cudagraphs")
    compile_decoder: bool = Field(False, description="torch.compile the codec's decoder (where the backbone can)")
    channels_last_decoder: bool = Field(False, description="channels-last 3-D convolution weights in the decoder "
                                                           "(where the backbone has them)")
    quantize: PluginRef | None = Field(None, description="quantizer plugin for the linear layers, e.g. {name: fp8}")
    overlap_decode: bool = Field(True, description="decode on a side CUDA stream while the next chunk denoises")

    def describe(self) -> str:
        parts = [f"attention {self.attention}"]
        if self.quantize is not None:
            parts.append(f"quantize {self.quantize.name}")
        if self.compile:
            parts.append("compiled blocks" + (f" ({self.compile_mode})" if self.compile_mode else ""))
        if self.compile_decoder:
            parts.append("compiled decoder")
        if self.channels_last_decoder:
            parts.append("channels-last decoder")
        parts.append("overlapped decode" if self.overlap_decode else "inline decode")
        return ", ".join(parts)


def apply_speedups(world: WorldModel, options: SpeedOptions) -> WorldModel:
    """Quantise and compile ``world`` in place (for inference) as ``options`` ask; returns it. Options
    that convert the model as it already was (``overlap_decode`` aside) change nothing, so every
    rollout session opened with them may apply them."""
    if _conversions(getattr(world, "speed_options", None)) == _conversions(options):
        return world
    if options.quantize is not None:
        from biwm.core.plugins import get_plugin_manager

        quantizer = get_plugin_manager().get("quantizer", options.quantize.name).create(options.quantize.options)
        quantizer.convert(world.backbone.trainable(), training=False)
    set_attention(world, options.attention)
    if options.compile or options.compile_decoder:
        import torch._dynamo

        # one compiled graph per window shape and grad mode (the first chunks of a rollout see a few),
        # and per frame-cache state of the decoder
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    if options.compile:
        compile_blocks(world, dynamic=False, mode=options.compile_mode)
        if options.compile_mode == "reduce-overhead":
            # each forward is a new step of the CUDA-graph tree, so the last one's outputs may be reused
            world.register_forward_pre_hook(lambda *_: torch.compiler.cudagraph_mark_step_begin())
    if options.channels_last_decoder:
        _capable(world, ChannelsLastDecoder, "channels_last_decoder").channels_last_decoder()
    if options.compile_decoder:  # default mode: its frame caches are fed back in, which CUDA graphs would overwrite
        _capable(world, CompilableDecoder, "compile_decoder").compile_decoder(dynamic=False)
    world.speed_options = options
    return world


def _conversions(options: SpeedOptions | None) -> dict[str, Any] | None:
    """What of ``options`` converts the model: all but how the frames are decoded."""
    return None if options is None else options.model_dump(exclude={"overlap_decode"})


def compile_blocks(world: WorldModel, dynamic: bool | None = False, mode: str | None = None, **kwargs: Any) -> None:
    """torch.compile the transformer's repeated blocks in place (regional compilation: one graph
    serves every block, so compiling costs a block's time, not the model's). ``dynamic=True`` makes
    the token count symbolic, so windows of every history length share one graph (training);
    ``False`` specialises a graph per window shape (inference, where a rollout sees a handful).
    Other keyword arguments go to ``torch.compile`` (e.g. ``backend``)."""
    kwargs = {"fullgraph": True, "dynamic": dynamic, "mode": mode, **kwargs}
    module = world.backbone.trainable()
    if hasattr(module, "compile_repeated_blocks"):  # diffusers models name their repeated blocks
        module.compile_repeated_blocks(**kwargs)
    else:
        module.compile(**kwargs)


def compile_world(world: WorldModel, dynamic: bool | None = True, mode: str | None = None, recompile_limit: int = 64,
                  **kwargs: Any) -> None:
    """torch.compile the world model's whole forward in place (window -> velocity): the embeddings,
    controls, history, blocks and un-embedding in one graph, so inductor fuses across them and the
    step has no eager parts left to launch one by one; the state dict keeps its names.

    ``dynamic=True`` (training): the history length is symbolic, so a run compiles three graphs, for
    no history, one frame (sizes 0 and 1 always specialise) and every longer history, provided the
    inputs are contiguous (their strides would otherwise be guarded per length; ``sample_batch`` makes
    them so). Duck sizing is turned off (globally), or a history length equal to another size (the batch,
    say) would be tied to it. ``dynamic=None``: torch's automatic dynamic shapes: the first graph is
    static and a recompile makes symbolic only the sizes that changed (the history length), not the
    batch, channels and frame size too. ``dynamic=False``: one static graph per window shape. ``mode="reduce-overhead"``
    adds CUDA graphs. Other keyword arguments go to ``torch.compile`` (e.g. ``backend="cudagraphs"``:
    CUDA graphs of eager kernels, captured in seconds rather than compiled in minutes)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config
    import torch.fx.experimental._config as fx_config

    # inductor's memory-coalescing tiling analysis stops this graph with an AssertionError in
    # tiling_utils.get_pw_red_splits on torch 2.11 (CUDA, symbolic history length); it only picks
    # between tilings, so turning it off changes kernel choices, not results
    inductor_config.triton.coalesce_tiling_analysis = False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    if dynamic is not False:
        fx_config.use_duck_shape = False
    world.compile(dynamic=dynamic, mode=mode, **kwargs)


def _capable(world: WorldModel, capability: type, name: str) -> Any:
    """The backbone, if it has the optional ``capability`` (a protocol of :mod:`biwm.core.protocols`)."""
    if not isinstance(world.backbone, capability):
        raise ValueError(f"{name}: the {type(world.backbone).__name__} backbone has no {name}()")
    return world.backbone


def set_attention(world: WorldModel, name: str) -> None:
    """Make the transformer's attention use one SDPA kernel ("auto": PyTorch's choice), through the
    backbone's ``set_attention_kernel`` (a backbone without one supports only "auto")."""
    if not isinstance(world.backbone, AttentionKernelChoice):
        if name != "auto":
            raise ValueError(f"attention: the {type(world.backbone).__name__} backbone cannot choose an attention "
                             "kernel (no set_attention_kernel); use attention: auto")
        return
    world.backbone.set_attention_kernel(name)


Mark = Union["torch.cuda.Event", float]


class Clock:
    """Marks points in time without waiting for the GPU: CUDA events recorded on the current (or a
    given) stream, read only when asked, on a CUDA device; ``perf_counter`` seconds on the CPU."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self, stream: "torch.cuda.Stream | None" = None) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event


def elapsed(start: Mark, end: Mark) -> float:
    """Seconds from mark ``start`` to mark ``end`` (waits until the GPU has passed ``end``)."""
    if isinstance(end, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1000


class FrameStream:
    """Decodes generated chunks to frames [B, T, H, W, 3] in host memory, in order: uint8, or (with a
    float ``dtype``) values in [-1, 1].

    With ``overlap`` on a CUDA device, each chunk is decoded on a side stream that waits only for
    that chunk, converted on the GPU and copied to pinned memory asynchronously: the caller's stream
    goes on with the next chunk, and ``ready()`` hands over finished chunks without blocking.
    Otherwise decoding happens inline and each chunk is on the host when ``submit`` returns.
    ``pending`` keeps each chunk's frames, until they are handed over, with the :class:`Clock` mark
    after which they are in host memory."""

    def __init__(self, decoder, device: torch.device, overlap: bool = True, dtype: torch.dtype = torch.uint8):
        self.decoder = decoder
        self.clock = Clock(device)
        self.overlap = overlap and self.clock.cuda
        self.dtype = dtype
        self.stream = torch.cuda.Stream(device) if self.overlap else None
        self.pending: list[tuple[Tensor, Mark]] = []  # submitted, not yet handed over

    def _decode(self, latents: Tensor) -> Tensor:
        frames = self.decoder.decode(latents)  # [B, 3, T, H, W] in [-1, 1]
        frames = as_uint8(frames) if self.dtype == torch.uint8 else frames.to(self.dtype)
        return frames.permute(0, 2, 3, 4, 1).contiguous()

    def submit(self, latents: Tensor) -> tuple[tuple[Mark, Mark], Mark]:
        """Decode ``latents`` [B, C, K, h, w]; returns the marks of its decode and of its frames
        arriving in host memory."""
        stream = self.stream
        produced = torch.cuda.current_stream(latents.device) if stream is not None else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            if stream is not None:
                stream.wait_stream(produced)  # this chunk (and nothing later) must be finished
                latents.record_stream(stream)  # keep its memory until the side stream is done with it
            start = self.clock.mark(stream)
            frames = self._decode(latents)
            end = self.clock.mark(stream)
            if stream is None:
                host = frames.cpu()
            else:
                host = torch.empty(frames.shape, dtype=frames.dtype, pin_memory=True)
                host.copy_(frames, non_blocking=True)
            ready = self.clock.mark(stream)
        self.pending.append((host, ready))
        return (start, end), ready

    def ready(self) -> list[Tensor]:
        """Chunks whose frames have arrived since the last call (never waits). Handed-over frames are
        no longer held here, so an endless session (biwm play) keeps only what is in flight."""
        out = []
        while self.pending and (not self.overlap or self.pending[0][1].query()):
            out.append(self.pending.pop(0)[0])
        return out

    def finish(self) -> list[Tensor]:
        """Waits for every submitted chunk; returns those not yet handed over."""
        if self.stream is not None:
            self.stream.synchronize()
        out = [host for host, _ in self.pending]
        self.pending = []
        return out
