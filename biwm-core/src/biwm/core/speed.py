"""Inference speed-ups, each chosen by option and applied to a built ``WorldModel`` (the torchtitan
pattern: small converters, nothing threaded through the model code), and ``FrameStream``, which
turns generated chunks into uint8 frames in host memory without stalling the generator.

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
  (``biwm.core.rollout``) the loop then never waits for the GPU.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

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
    """Quantise and compile ``world`` in place (for inference) as ``options`` ask; returns it."""
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
        _backbone_method(world, "channels_last_decoder")()
    if options.compile_decoder:  # default mode: its frame caches are fed back in, which CUDA graphs would overwrite
        _backbone_method(world, "compile_decoder")(dynamic=False)
    return world


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


def _backbone_method(world: WorldModel, name: str):
    if not hasattr(world.backbone, name):
        raise ValueError(f"{name}: the {type(world.backbone).__name__} backbone has no {name}()")
    return getattr(world.backbone, name)


def set_attention(world: WorldModel, name: str) -> None:
    """Make the transformer's attention use one SDPA kernel ("auto": PyTorch's choice), through the
    backbone's ``set_attention_kernel`` (a backbone without one supports only "auto")."""
    if not hasattr(world.backbone, "set_attention_kernel"):
        if name != "auto":
            raise ValueError(f"attention: the {type(world.backbone).__name__} backbone cannot choose an attention "
                             "kernel (no set_attention_kernel); use attention: auto")
        return
    world.backbone.set_attention_kernel(name)


class FrameStream:
    """Decodes generated chunks to uint8 frames [B, T, H, W, 3] in host memory, in order.

    With ``overlap`` on a CUDA device, each chunk is decoded on a side stream that waits only for
    that chunk, converted to uint8 on the GPU and copied to pinned memory asynchronously: the
    caller's stream goes on with the next chunk, and ``ready()`` hands over finished chunks without
    blocking. Otherwise decoding happens inline and each chunk is on the host when ``submit``
    returns. ``decode_events`` keep (start, end) CUDA events per chunk for profiling."""

    def __init__(self, decoder, device: torch.device, overlap: bool = True):
        self.decoder = decoder
        self.cuda = torch.device(device).type == "cuda"
        self.overlap = overlap and self.cuda
        self.stream = torch.cuda.Stream(device) if self.overlap else None
        self.pending: list[tuple[Tensor, torch.cuda.Event | None]] = []
        self.delivered = 0
        self.decode_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _decode(self, latents: Tensor) -> Tensor:
        frames = self.decoder.decode(latents)  # [B, 3, T, H, W] in [-1, 1]
        return as_uint8(frames).permute(0, 2, 3, 4, 1).contiguous()

    def submit(self, latents: Tensor) -> None:
        if not self.overlap:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            frames = self._decode(latents)
            if self.cuda:
                end.record()
                self.decode_events.append((start, end))
            self.pending.append((frames.cpu(), None))
            return
        produced = torch.cuda.current_stream(latents.device)
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(produced)  # this chunk (and nothing later) must be finished
            latents.record_stream(self.stream)  # keep its memory until the side stream is done with it
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            frames = self._decode(latents)
            end.record(self.stream)
            host = torch.empty(frames.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(frames, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)  # timed from a start event by benchmarks
            done.record(self.stream)
        self.decode_events.append((start, end))
        self.pending.append((host, done))

    def ready(self) -> list[Tensor]:
        """Chunks whose frames have arrived since the last call (never waits)."""
        out = []
        while self.delivered < len(self.pending):
            host, done = self.pending[self.delivered]
            if done is not None and not done.query():
                break
            out.append(host)
            self.delivered += 1
        return out

    def finish(self) -> list[Tensor]:
        """Waits for every submitted chunk; returns those not yet handed over."""
        if self.stream is not None:
            self.stream.synchronize()
        out = [host for host, _ in self.pending[self.delivered:]]
        self.delivered = len(self.pending)
        return out

    def done_event(self, index: int) -> torch.cuda.Event | None:
        """The event after which chunk ``index``'s frames are in host memory (overlapped mode)."""
        return self.pending[index][1]
