"""``framepack``: the nearer a history frame is to the chunk, the more tokens it keeps
(METHODS.md §5, after FramePack).

The layout is a list of (scale, frames) levels, newest first: ``[[1, 1], [2, 2], [4, 16]]`` keeps
the newest frame at full resolution, the 2 before it through a patch embedding 2× coarser on every
axis (8× fewer tokens) and the 16 before those 4× coarser (64× fewer); older frames are dropped
(``tail: drop``) or averaged into one coarsest-scale slot (``tail: average``). ``anchor_first``
keeps history frame 0 at full resolution too. The coarser embeddings start as the backbone's own
kernel repeated over the larger block and divided by its size, so a constant latent embeds exactly
as before; they are trained in stage 1 with the rest. Every token sits at the centre of the frames
and patch cells it covers; control is pooled over the same cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from biwm.core.protocols import HistoryTokens
from biwm.compressors.common import (ceil_div, centre_positions, coarse_patch_embedding, flat, pad_to_multiple,
                                     pool_like_tokens)


class FramePackOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layout: list[tuple[int, int]] = Field(
        [(1, 1), (2, 2), (4, 16)], min_length=1,
        description="(scale, frames) per level, newest first; scale s embeds s x (s, s) patches per token")
    anchor_first: bool = Field(False, description="also keep history frame 0 at full resolution (i2v anchor)")
    tail: Literal["drop", "average"] = Field(
        "drop", description="frames older than the layout: dropped, or averaged into one coarsest-scale slot")

    @field_validator("layout")
    @classmethod
    def _positive(cls, layout: list[tuple[int, int]]) -> list[tuple[int, int]]:
        for i, (scale, frames) in enumerate(layout):
            if scale < 1 or frames < 1:
                raise ValueError(f"layout[{i}] = [{scale}, {frames}]: scale and frames must be >= 1")
        return layout


@dataclass(frozen=True)
class Piece:
    kind: Literal["anchor", "tail", "level"]
    scale: int
    lo: int  # range of the compressor's input frames (the frames_needed order)
    hi: int


class FramePack(nn.Module):
    def __init__(self, options: FramePackOptions, backbone=None, **_):
        super().__init__()
        if backbone is None:
            raise ValueError("framepack needs the backbone: its patch embedding seeds the coarser kernels")
        pt, _, _ = backbone.patch_size
        if pt != 1:
            raise ValueError(f"framepack needs a temporal patch size of 1; the backbone's is {pt}")
        self.layout = [tuple(level) for level in options.layout]
        self.anchor_first = options.anchor_first
        self.tail = options.tail
        self.total = sum(frames for _, frames in self.layout)
        self.coarsest = max(scale for scale, _ in self.layout)
        scales = {scale for scale, _ in self.layout} | ({self.coarsest} if self.tail == "average" else set())
        self.kernels = nn.ModuleDict({str(s): coarse_patch_embedding(backbone.patch_embedding, (s, s, s))
                                      for s in sorted(scales) if s > 1})

    # -- bookkeeping ---------------------------------------------------------------------------
    def frames_needed(self, history_length: int) -> slice | list[int]:
        if self.tail == "average" or history_length <= self.total:
            return slice(0, history_length)
        recent = range(history_length - self.total, history_length)
        return [0, *recent] if self.anchor_first else slice(recent.start, recent.stop)

    def plan(self, n: int) -> list[Piece]:
        """How ``n`` input frames (as ``frames_needed`` gives them) split into slots, oldest first."""
        body = min(n, self.total)
        rest = n - body
        anchor = 1 if self.anchor_first and rest > 0 else 0
        pieces = []
        if anchor:
            pieces.append(Piece("anchor", 1, 0, 1))
        if rest - anchor > 0:
            pieces.append(Piece("tail", self.coarsest, anchor, rest))
        levels, hi = [], n
        for scale, frames in self.layout:
            lo = max(n - body, hi - frames)
            if lo >= hi:
                break
            levels.append(Piece("level", scale, lo, hi))
            hi = lo
        return pieces + levels[::-1]

    def token_budget(self, history_length: int, grid_hw: tuple[int, int]) -> int:
        needed = self.frames_needed(history_length)
        n = needed.stop - needed.start if isinstance(needed, slice) else len(needed)
        h, w = grid_hw
        total = 0
        for p in self.plan(n):
            frames = 1 if p.kind != "level" else ceil_div(p.hi - p.lo, p.scale)
            total += frames * ceil_div(h, p.scale) * ceil_div(w, p.scale)
        return total

    # -- compression ---------------------------------------------------------------------------
    def embed(self, latents: Tensor, scale: int, backbone) -> Tensor:
        """[B, C, F, h, w] (F a multiple of ``scale``) -> [B, D, F/s, h'/s, w'/s], replicate-padded in space."""
        if scale == 1:
            return backbone.patch_embed(latents)
        kernel = self.kernels[str(scale)]
        x = pad_to_multiple(latents, (1, *kernel.kernel_size[1:]))
        return kernel(x.to(kernel.weight.dtype))

    def compress(self, latents: Tensor, frame_index: Tensor, control: Tensor | None, backbone,
                 modulation: Tensor | None = None, query: Tensor | None = None) -> HistoryTokens:
        tokens, positions, mods = [], [], []
        device = latents.device
        index = frame_index.to(torch.float64)
        for p in self.plan(latents.shape[2]):
            s = p.scale
            seg = latents[:, :, p.lo:p.hi]
            ctl = None if control is None else control[:, :, p.lo:p.hi]
            mod = None if modulation is None else modulation[:, :, p.lo:p.hi]
            if p.kind == "tail":  # one slot: the mean frame, at the mean position
                seg = seg.mean(2, keepdim=True).expand(-1, -1, s, -1, -1)
                ctl, mod = (None if x is None else x.mean(2, keepdim=True) for x in (ctl, mod))
                pooled, pad = (1, s, s), 0
                first = index[p.lo:p.hi].mean()
            else:
                pad = (-(p.hi - p.lo)) % s
                seg = pad_to_multiple(seg, (s, 1, 1))
                pooled = (s, s, s)
                first = index[p.lo] - pad
            emb = self.embed(seg, s, backbone)  # [B, D, f, r, c]
            ctl, mod = pool_like_tokens(ctl, pooled), pool_like_tokens(mod, pooled)
            if ctl is not None:
                emb = emb + ctl.to(emb.dtype)
            f, r, c = emb.shape[2:]
            tokens.append(flat(emb))
            pos = centre_positions(first, f, r, c, pooled, device)
            if p.kind == "level" and pad:  # the oldest group holds s - pad real frames: sit at their centre
                pos[:r * c, 0] += pad / 2
            positions.append(pos)
            mods.append(flat(mod))
        dtype = tokens[-1].dtype
        return HistoryTokens(torch.cat([t.to(dtype) for t in tokens], 1), torch.cat(positions, 0),
                             None if modulation is None else torch.cat(mods, 1))
