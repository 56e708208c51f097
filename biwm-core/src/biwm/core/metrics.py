"""Image-quality metrics on videos in [-1, 1] or uint8."""

from __future__ import annotations

import torch
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else (x.float() + 1) / 2


def psnr(pred: Tensor, target: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """PSNR in dB over ``dims`` (all but the first by default); identical inputs give +inf."""
    a, b = _unit(pred), _unit(target)
    if a.shape != b.shape:
        raise ValueError(f"psnr needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    dims = dims if dims is not None else tuple(range(1, a.dim()))
    mse = ((a - b) ** 2).mean(dim=dims)
    return 10 * torch.log10(1.0 / mse)
