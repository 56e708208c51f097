"""Video metrics on frames in [-1, 1] or uint8, shaped [..., 3, H, W] (pixel values are taken to
[0, 1] first, so thresholds and distances below are in those units)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _unit(x: Tensor) -> Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else (x.float() + 1) / 2


def _same_shape(name: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name} needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(pred: Tensor, target: Tensor, dims: tuple[int, ...] | None = None) -> Tensor:
    """PSNR in dB over ``dims`` (all but the first by default); identical inputs give +inf."""
    a, b = _unit(pred), _unit(target)
    _same_shape("psnr", a, b)
    dims = dims if dims is not None else tuple(range(1, a.dim()))
    mse = ((a - b) ** 2).mean(dim=dims)
    return 10 * torch.log10(1.0 / mse)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(pred: Tensor, target: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K = 0.01, 0.03, data range 1), per
    image: [..., 3, H, W] -> [...], the mean over channels and valid window positions. Matches
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1, channel_axis=...)``. Images smaller than the window
    use the largest odd window that fits."""
    a, b = _unit(pred).double(), _unit(target).double()  # float64: var = E[x^2] - E[x]^2 cancels badly
    _same_shape("ssim", a, b)
    lead, (c, h, w) = a.shape[:-3], a.shape[-3:]
    size = min(window, h - (h + 1) % 2, w - (w + 1) % 2)
    g = _gaussian_window(size, sigma).to(a.device, a.dtype)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, size, size)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=c)

    a, b = a.reshape(-1, c, h, w), b.reshape(-1, c, h, w)
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead).float()


def per_chunk(per_frame_error: Tensor, frames_per_chunk: int) -> Tensor:
    """Split the time axis of [B, T, ...] into chunks: [B, T // frames_per_chunk, frames_per_chunk, ...]."""
    t = per_frame_error.shape[1]
    if t % frames_per_chunk:
        raise ValueError(f"{t} frames do not split into chunks of {frames_per_chunk}")
    return per_frame_error.unflatten(1, (t // frames_per_chunk, frames_per_chunk))


def psnr_per_chunk(pred: Tensor, target: Tensor, frames_per_chunk: int) -> Tensor:
    """PSNR of each chunk of videos [B, T, 3, H, W] (MSE pooled over the chunk's frames): [B, chunks]."""
    a, b = _unit(pred), _unit(target)
    _same_shape("psnr_per_chunk", a, b)
    mse = per_chunk(((a - b) ** 2).mean(dim=(2, 3, 4)), frames_per_chunk).mean(2)
    return 10 * torch.log10(1.0 / mse)


def high_frequency_energy(video: Tensor) -> Tensor:
    """Mean squared response of the 3x3 Laplacian over frames [..., 3, H, W] (pixel values in [0, 1])."""
    x = _unit(video).flatten(0, -4)
    kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], device=x.device)
    response = F.conv2d(x, kernel.expand(3, 1, 3, 3), groups=3)
    return response.pow(2).mean()


def sharpness(generated: Tensor, truth: Tensor) -> float:
    """High-frequency energy of the generated frames over that of the true ones: 1 is as sharp as
    the world, below 1 blurry (a model averaging its options), above 1 noisy or over-sharpened."""
    return float(high_frequency_energy(generated) / high_frequency_energy(truth).clamp_min(1e-12))


def motion(video: Tensor, threshold: float = 0.1) -> Tensor:
    """Fraction of pixels that change by more than ``threshold`` (largest channel change) between
    consecutive frames of [B, T, 3, H, W]: [B, T-1]. Under a still camera this is the motion of
    the moving objects; the threshold keeps low-amplitude sampling noise from counting as motion."""
    x = _unit(video)
    change = (x[:, 1:] - x[:, :-1]).abs().amax(dim=2)
    return (change > threshold).float().mean(dim=(2, 3))


def diversity(samples: Tensor) -> Tensor:
    """Spread of samples [B, S, T, 3, H, W] drawn with the same conditioning: the mean absolute
    pixel difference between two different samples, averaged over all pairs: [B]."""
    s = samples.shape[1]
    if s < 2:
        raise ValueError(f"diversity needs at least 2 samples per condition, got {s}")
    x = _unit(samples).flatten(2)
    i, j = torch.triu_indices(s, s, offset=1)
    return (x[:, i] - x[:, j]).abs().mean(dim=(1, 2))


def pose_errors(pred_c2w: Tensor, target_c2w: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation error (geodesic angle, degrees) and camera-centre distance between poses
    [..., 4, 4]: two tensors shaped [...]."""
    _same_shape("pose_errors", pred_c2w, target_c2w)
    relative = pred_c2w[..., :3, :3].transpose(-1, -2) @ target_c2w[..., :3, :3]
    cos = ((relative.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = torch.rad2deg(torch.acos(cos))
    distance = torch.linalg.vector_norm(pred_c2w[..., :3, 3] - target_c2w[..., :3, 3], dim=-1)
    return angle, distance


def finite_mean(values: Tensor, what: str = "score") -> float:
    """Mean that skips +inf (the PSNR of identical frames) rather than returning inf; +inf when
    every value is (all identical). NaN or -inf come only from non-finite frames (NaN or inf
    pixels): FloatingPointError, never a score."""
    bad = torch.isnan(values) | torch.isneginf(values)
    if bool(bad.any()):
        raise FloatingPointError(f"{what}: {int(bad.sum())} of {values.numel()} values are NaN or -inf, so the "
                                 "frames scored hold NaN or inf (a diverged model or sampler setting)")
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.inf
