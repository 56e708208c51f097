"""Flow matching as in Wan: x_s = (1 - s) x0 + s eps, the network predicts v = eps - x0, t = 1000 s."""

from __future__ import annotations

import torch
from torch import Tensor


TIMESTEP_SCALE = 1000.0  # Window.timestep = TIMESTEP_SCALE * sigma: the scale Wan's timestep embedding was trained on


def timestep(sigma: Tensor) -> Tensor:
    """The network's timestep for noise level ``sigma`` (the one place the x1000 convention lives)."""
    return sigma * TIMESTEP_SCALE


def shift_sigma(sigma: Tensor, shift: float) -> Tensor:
    """Warp sigma towards 1: s' = shift*s / (1 + (shift - 1) s)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def training_sigmas(batch: int, shift: float, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> Tensor:
    u = torch.rand(batch, generator=generator, device=device)
    return shift_sigma(u, shift)


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    s = sigma.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def predict_x0(x_t: Tensor, velocity: Tensor, sigma: Tensor) -> Tensor:
    s = sigma.reshape(-1, *([1] * (x_t.dim() - 1))).to(x_t.dtype)
    return x_t - s * velocity


def sampling_sigmas(num_steps: int, shift: float, device: torch.device | str = "cpu") -> Tensor:
    """num_steps + 1 decreasing sigmas from 1 to 0 (Euler sampling)."""
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, device=device), shift)


def euler_step(x_t: Tensor, velocity: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    return x_t + (sigma_next - sigma).to(x_t.dtype) * velocity
