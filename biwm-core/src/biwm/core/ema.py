"""Exponential moving average of a model's trained modules, updated without host synchronisation.

``torch.optim.swa_utils.AveragedModel`` branches on a device-side counter at every update (a host
sync per step); here the decay schedule lives on the host (it depends only on the step number) and
the update is one fused ``_foreach_lerp_`` per dtype, so a training loop on a GPU never waits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(decay: float, step: int) -> float:
    """The decay of the update after step ``step`` (0-based): ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step))


class ModelEMA(nn.Module):
    """A frozen copy of ``modules`` (name -> module) that follows their parameters:
    ``ema = decay' * ema + (1 - decay') * live`` with ``decay' = min(decay, (1 + step) / (10 + step))``,
    so early updates move fast instead of keeping the random initialisation for thousands of steps.
    Buffers are copied as they are."""

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = nn.ModuleDict({name: copy.deepcopy(m) for name, m in modules.items()}).requires_grad_(False)

    def modules_by_name(self) -> dict[str, nn.Module]:
        return dict(self.shadow.items())

    @torch.no_grad()
    def update(self, modules: dict[str, nn.Module], step: int) -> None:
        decay = ema_decay(self.decay, step)
        live = nn.ModuleDict(modules)
        ema_params, live_params = [], []
        for (name, ema), (other, param) in zip(self.shadow.named_parameters(), live.named_parameters()):
            if name != other:
                raise RuntimeError(f"EMA parameters out of step with the model: {name} vs {other}")
            ema_params.append(ema)
            live_params.append(param.detach())
        torch._foreach_lerp_(ema_params, live_params, 1.0 - decay)
        for ema, buffer in zip(self.shadow.buffers(), live.buffers()):
            ema.copy_(buffer)
