"""``packforcing``: sink / mid / recent history partitions with a learned mid compressor and
per-chunk top-k selection of mid blocks (METHODS.md §5, after PackForcing, arXiv 2603.25730).

- **sink**: the first ``sink_frames`` history frames, full resolution.
- **recent**: the last ``recent_frames``, full resolution.
- **mid**: everything between, cut into blocks of ``block_frames`` from the sink on (the newest
  block replicate-padded). Each block goes through a learned compressor: a strided 3D
  convolution initialised like the backbone's patch embedding over a ``compress`` = (t, s) larger
  block (t·s² fewer tokens: 32 for the default (2, 4)), plus a zero-initialised two-convolution
  refinement branch. Control is pooled over the same cells.
- **selection**: for each chunk (each sample of the batch), the ``top_k`` mid blocks whose keys
  the chunk's queries match best: the mean q·k between an evenly spaced subsample of
  ``query_tokens`` chunk tokens and each block's tokens, with the query/key projections of the
  backbone's block ``score_block``.
- **repacking**: temporal positions are reassigned so the kept history is contiguous and ends
  just before the chunk (sink, then the selected blocks in temporal order, each spanning its
  ``block_frames``, then recent). The history's temporal extent is therefore bounded however long
  the rollout, and so is the token count: ``token_budget``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from biwm.core.protocols import HistoryTokens, zero_module
from biwm.compressors.common import ceil_div, centre_positions, coarse_patch_embedding, flat, pad_to_multiple, \
    pool_like_tokens


class PackForcingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sink_frames: int = Field(1, ge=0, description="first history frames kept at full resolution")
    recent_frames: int = Field(4, ge=1, description="last history frames kept at full resolution")
    block_frames: int = Field(4, ge=1, description="frames per mid block")
    top_k: int = Field(2, ge=0, description="mid blocks kept per chunk (0: sink + recent only)")
    compress: tuple[int, int] = Field((2, 4), description="(time, space) stride of the mid compressor, in tokens")
    hidden: int = Field(128, ge=1, description="width of the compressor's refinement branch")
    query_tokens: int = Field(64, ge=1, description="chunk tokens whose queries score the mid blocks")
    score_block: int = Field(0, description="transformer block whose query/key projections score the mid blocks")

    @model_validator(mode="after")
    def _fits(self) -> "PackForcingOptions":
        t, s = self.compress
        if t < 1 or s < 1:
            raise ValueError(f"compress = {list(self.compress)}: strides must be >= 1")
        if self.block_frames % t:
            raise ValueError(f"block_frames = {self.block_frames} must be a multiple of compress[0] = {t}")
        return self


class PackForcing(nn.Module):
    def __init__(self, options: PackForcingOptions, backbone=None, **_):
        super().__init__()
        if backbone is None:
            raise ValueError("packforcing needs the backbone: its patch embedding seeds the mid compressor")
        pt, ph, pw = backbone.patch_size
        if pt != 1:
            raise ValueError(f"packforcing needs a temporal patch size of 1; the backbone's is {pt}")
        o = options
        self.sink, self.recent, self.block, self.top_k = o.sink_frames, o.recent_frames, o.block_frames, o.top_k
        self.stride = (o.compress[0], o.compress[1], o.compress[1])  # in token cells
        self.query_tokens, self.score_block = o.query_tokens, o.score_block
        base = backbone.patch_embedding
        self.base = coarse_patch_embedding(base, self.stride)
        t, s = o.compress
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.refine = nn.Sequential(
            nn.Conv3d(base.in_channels, o.hidden, kernel_size=(t, s, s), stride=(t, s, s), **kw), nn.SiLU(),
            zero_module(nn.Conv3d(o.hidden, base.out_channels, kernel_size=(1, ph, pw), stride=(1, ph, pw), **kw)))

    # -- bookkeeping ---------------------------------------------------------------------------
    def frames_needed(self, history_length: int) -> slice:
        return slice(0, history_length)  # every mid block is a candidate

    def partition(self, n: int) -> tuple[int, int, int]:
        """(sink, mid, recent) frame counts of an n-frame history."""
        sink = min(n, self.sink)
        recent = min(n - sink, self.recent)
        return sink, n - sink - recent, recent

    def blocks(self, n: int) -> int:
        return ceil_div(self.partition(n)[1], self.block)

    def kept_blocks(self, n: int) -> int:
        return min(self.blocks(n), self.top_k)

    def block_tokens(self, grid_hw: tuple[int, int]) -> int:
        st, sh, sw = self.stride
        return self.block // st * ceil_div(grid_hw[0], sh) * ceil_div(grid_hw[1], sw)

    def token_budget(self, history_length: int, grid_hw: tuple[int, int]) -> int:
        sink, _, recent = self.partition(history_length)
        return (sink + recent) * grid_hw[0] * grid_hw[1] + self.kept_blocks(history_length) * self.block_tokens(grid_hw)

    # -- compression ---------------------------------------------------------------------------
    def compress_blocks(self, latents: Tensor) -> Tensor:
        """Mid blocks [N, C, block, h, w] -> tokens [N, D, block/t, h'/s, w'/s]."""
        _, sh, sw = self.base.kernel_size
        x = pad_to_multiple(latents, (1, sh, sw)).to(self.base.weight.dtype)
        return self.base(x) + self.refine(x)

    @torch.no_grad()
    def select(self, query: Tensor | None, keys: Tensor, backbone) -> Tensor:
        """Indices [B, k] (ascending) of the k mid blocks of ``keys`` [B, nb, Lb, D] that the chunk's
        queries match best."""
        b, nb = keys.shape[:2]
        k = min(nb, self.top_k)
        if k == nb or query is None:
            return torch.arange(nb - k, nb, device=keys.device).expand(b, -1)  # all, or the newest k
        pick = torch.linspace(0, query.shape[1] - 1, min(self.query_tokens, query.shape[1]),
                              device=query.device).round().long()
        q, _ = backbone.attention_features(query[:, pick].to(keys.dtype), self.score_block)
        _, kk = backbone.attention_features(keys.flatten(1, 2), self.score_block)
        scores = block_scores(q, kk.unflatten(1, (nb, -1)))
        return scores.topk(k, dim=1).indices.sort(dim=1).values

    def compress(self, latents: Tensor, frame_index: Tensor, control: Tensor | None, backbone,
                 modulation: Tensor | None = None, query: Tensor | None = None) -> HistoryTokens:
        b, _, n, hl, wl = latents.shape
        device = latents.device
        sink, mid, recent = self.partition(n)
        h, w = ceil_div(hl, backbone.patch_size[1]), ceil_div(wl, backbone.patch_size[2])
        start = n  # the chunk's first frame, in the history's own frame numbering (frames_needed is all of it)
        parts_tokens, parts_mod, positions = [], [], []

        def full(lo: int, hi: int) -> None:
            emb = backbone.patch_embed(latents[:, :, lo:hi])
            if control is not None:
                emb = emb + control[:, :, lo:hi].to(emb.dtype)
            parts_tokens.append(flat(emb))
            parts_mod.append(None if modulation is None else flat(modulation[:, :, lo:hi]))

        kept = self.kept_blocks(n)
        first = start - recent - kept * self.block - sink  # repacked: contiguous, ending at start - 1
        if sink:
            full(0, sink)
            positions.append(centre_positions(first, sink, h, w, (1, 1, 1), device))
        if kept:
            nb = self.blocks(n)
            emb = self.compress_blocks(self._blocks_of(latents, sink, mid, nb))  # [B*nb, D, f, r, c]
            f, r, c = emb.shape[2:]
            emb = emb.unflatten(0, (b, nb))
            ctl, mod = (None if x is None else pool_like_tokens(self._blocks_of(x, sink, mid, nb), self.stride,
                                                                front_time=False).unflatten(0, (b, nb))
                        for x in (control, modulation))
            if ctl is not None:
                emb = emb + ctl.to(emb.dtype)
            keys = emb.flatten(3).transpose(2, 3)  # [B, nb, Lb, D]
            chosen = self.select(query, keys, backbone)  # [B, kept]
            gather = chosen[:, :, None, None]
            parts_tokens.append(keys.gather(1, gather.expand(-1, -1, *keys.shape[2:])).flatten(1, 2))
            if mod is not None:
                mod = mod.flatten(3).transpose(2, 3)
                parts_mod.append(mod.gather(1, gather.expand(-1, -1, *mod.shape[2:])).flatten(1, 2))
            else:
                parts_mod.append(None)
            for slot in range(kept):
                positions.append(centre_positions(first + sink + slot * self.block, f, r, c, self.stride, device))
        if recent:
            full(n - recent, n)
            positions.append(centre_positions(start - recent, recent, h, w, (1, 1, 1), device))
        dtype = parts_tokens[-1].dtype
        # Positions above count from frame 0 of the history given; shift them to the caller's frame numbers.
        offset = frame_index[-1].to(torch.float64) + 1 - start
        pos = torch.cat(positions, 0)
        pos = torch.cat([pos[:, :1] + offset, pos[:, 1:]], 1)
        return HistoryTokens(torch.cat([t.to(dtype) for t in parts_tokens], 1), pos,
                             None if modulation is None else torch.cat(parts_mod, 1))

    def _blocks_of(self, x: Tensor, sink: int, mid: int, nb: int) -> Tensor:
        """[B, C, n, h, w] (latents or control) -> the mid blocks [B*nb, C, block, h, w], the newest
        block replicate-padded with its last frame."""
        span = nb * self.block
        seg = pad_to_multiple(x[:, :, sink:sink + mid], (span, 1, 1), front_time=False)[:, :, :span]
        return seg.unflatten(2, (nb, self.block)).transpose(1, 2).flatten(0, 1)


def block_scores(q: Tensor, keys: Tensor) -> Tensor:
    """Mean scaled q·k of queries [B, Lq, H, d] against each block's keys [B, nb, Lb, H, d] -> [B, nb]."""
    d = q.shape[-1]
    return torch.einsum("bqhd,bnkhd->bn", q.float(), keys.float()) / (q.shape[1] * keys.shape[2] * q.shape[2] * d**0.5)
