"""Pieces both compressors share: coarser patch embeddings derived from the backbone's own,
replicate padding to kernel multiples, control pooled like the tokens, and token positions at the
centre of what each token covers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def coarse_patch_embedding(base: nn.Conv3d, scale: tuple[int, int, int]) -> nn.Conv3d:
    """A patch embedding whose kernel is ``scale`` times the backbone's (per axis), initialised by
    repeating each kernel element over a ``scale`` block and dividing by the block's size: the new
    kernel equals average-pooling by ``scale`` followed by the backbone's own embedding, so a
    constant latent embeds exactly as before."""
    kernel = tuple(k * s for k, s in zip(base.kernel_size, scale))
    conv = nn.Conv3d(base.in_channels, base.out_channels, kernel_size=kernel, stride=kernel,
                     bias=base.bias is not None, device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        weight = base.weight
        for axis, s in zip((2, 3, 4), scale):
            weight = weight.repeat_interleave(s, dim=axis)
        conv.weight.copy_(weight / (scale[0] * scale[1] * scale[2]))
        if base.bias is not None:
            conv.bias.copy_(base.bias)
    return conv


def pad_to_multiple(x: Tensor, multiple: tuple[int, int, int], front_time: bool = True) -> Tensor:
    """Replicate-pad [B, C, F, h, w] so F, h, w are multiples of ``multiple``; time is padded at the
    older end (front) unless ``front_time`` is False, space at the bottom/right."""
    pf, ph, pw = ((-n) % m for n, m in zip(x.shape[2:], multiple))
    if pf:
        edge = x[:, :, :1] if front_time else x[:, :, -1:]
        pad = edge.expand(-1, -1, pf, -1, -1)
        x = torch.cat([pad, x] if front_time else [x, pad], dim=2)
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph, 0, 0), mode="replicate")  # all three axes: older torch pads 5-D no other way
    return x


def pool_like_tokens(x: Tensor | None, scale: tuple[int, int, int], front_time: bool = True) -> Tensor | None:
    """Control at token resolution [B, D, F, h', w'] pooled over ``scale`` token cells, as the
    coarser kernels pool the latents (same replicate padding)."""
    if x is None or scale == (1, 1, 1):
        return x
    return F.avg_pool3d(pad_to_multiple(x.float(), scale, front_time), scale, scale).to(x.dtype)


def flat(x: Tensor | None) -> Tensor | None:
    """[B, D, F, h, w] -> [B, F*h*w, D] in patch-embedding order."""
    return None if x is None else x.flatten(2).transpose(1, 2)


def centre_positions(first_frame: Tensor | float, frames: int, rows: int, cols: int, scale: tuple[int, int, int],
                     device: torch.device) -> Tensor:
    """[frames*rows*cols, 3] (frame, row, col) positions of a coarse token grid whose tokens each
    cover ``scale`` (frames, rows, cols) of the full-resolution token grid: the centre of what a token
    covers. ``first_frame`` is the frame index of the grid's first covered frame."""
    st, sh, sw = scale
    t = torch.arange(frames, device=device, dtype=torch.float64) * st + (st - 1) / 2
    t = t + torch.as_tensor(first_frame, device=device, dtype=torch.float64)
    r = torch.arange(rows, device=device, dtype=torch.float64) * sh + (sh - 1) / 2
    c = torch.arange(cols, device=device, dtype=torch.float64) * sw + (sw - 1) / 2
    return torch.stack(torch.meshgrid(t, r, c, indexing="ij"), dim=-1).reshape(-1, 3)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
