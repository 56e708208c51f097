"""Self-distillation of a quantised model from its own full-precision forward: the term a
quantizer's ``self_distill`` option (a weight, 0 by default) adds to the training loss of the
``finetune`` and ``distill`` stages.

The term follows the reference release (LynnReal-AI/BiWM, ``pipelines/wan/dmd_core.py``,
``_quant_selfdistill_divergence``; its NVFP4 stage uses weight 0.03): the same network runs twice on
the same noisy window, once quantised (the student, with gradients) and once with its quantised
linears bypassed (the full-precision teacher, without gradients), and

    weight * (KL(v_teacher || v_student) + 0.25 * KL(x0_teacher || x0_student))

where each KL treats the latent channels at each position as logits (softmax over channels,
temperature 1), summed over channels and averaged over positions, on the velocity v and on the
clean latents it implies, x0 = x_t - sigma * v.

**The teacher is the model's own current weights, not a frozen copy.** As in the reference, the
term measures only what quantisation does to the weights being trained, so it never pulls them
back towards where training started (which would fight the stage's own loss), costs no second
copy of the transformer, and needs nothing but the quantizer's ``full_precision(module)``
context. In ``distill`` the stage's frozen teacher is not reused: it is another network (the
stage-1 model, sampled with CFG, while the generator may start from a distilled student and
moves away from it as it trains), and it is itself built with the recipe's quantizer.

Where the window comes from: ``finetune`` reuses its flow-matching window and the student's
velocity from the loss (one more forward, without gradients); ``distill`` re-noises each
generated chunk (detached) to the DMD loss's noise level with fresh noise, as the reference does,
and runs both forwards there, for the generator's update only.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from biwm.core.schedule import predict_x0

if TYPE_CHECKING:
    from biwm.core.window import Window

VELOCITY_WEIGHT = 1.0  # the reference release's flow_weight
X0_WEIGHT = 0.25  # its x0_weight ("directly constrains low-frequency/colour")


def channel_kl(student: Tensor, teacher: Tensor) -> Tensor:
    """KL(softmax(teacher) || softmax(student)) over dim 1 (the latent channels) of [B, C, ...]
    tensors, summed over the channels and averaged over every other position, in float32. Exactly
    0 for equal tensors; the gradient reaches ``student`` only."""
    s = student.float().movedim(1, -1).log_softmax(-1)
    t = teacher.detach().float().movedim(1, -1).log_softmax(-1)
    return (t.exp() * (t - s)).sum(-1).mean()


class SelfDistill:
    """The term, for one model: ``weight`` and the quantizer's ``full_precision(module)`` context.
    Each call returns the weighted term and keeps its value (detached) until :meth:`take`."""

    def __init__(self, weight: float, full_precision: Callable[[nn.Module], AbstractContextManager]):
        self.weight = float(weight)
        self.full_precision = full_precision
        self._values: list[Tensor] = []

    @classmethod
    def from_recipe(cls, recipe) -> SelfDistill | None:
        """The recipe quantizer's term, or None when it has none (no quantizer, or ``self_distill``
        0 or absent from its options)."""
        ref = recipe.model.quantize
        options = recipe.resolved.get("model.quantize") if ref is not None else None
        weight = float(getattr(options, "self_distill", 0.0) or 0.0)
        if weight <= 0:
            return None
        from biwm.core.plugins import get_plugin_manager

        quantizer = get_plugin_manager().get("quantizer", ref.name).create(options)
        full_precision = getattr(quantizer, "full_precision", None)
        if full_precision is None:
            raise ValueError(f"model.quantize.options.self_distill: quantizer {ref.name!r} has no full_precision() "
                             "to run the teacher's forward unquantised; set self_distill: 0")
        return cls(weight, full_precision)

    def __call__(self, world: nn.Module, window: Window, sigma: Tensor,
                 velocity: Tensor | None = None) -> Tensor | None:
        """The weighted term on ``window`` (its chunk noised to ``sigma``, [B]): the teacher's forward
        without gradients, then the student's (or its given ``velocity`` on that window). None
        with weight 0 (nothing runs)."""
        if self.weight == 0:
            return None
        with torch.no_grad(), self.full_precision(world):
            teacher = world(window)
        student = world(window) if velocity is None else velocity
        x_t = window.chunk
        term = self.weight * (VELOCITY_WEIGHT * channel_kl(student, teacher)
                              + X0_WEIGHT * channel_kl(predict_x0(x_t, student.to(x_t.dtype), sigma),
                                                       predict_x0(x_t, teacher.to(x_t.dtype), sigma)))
        self._values.append(term.detach())
        return term

    def take(self) -> Tensor | None:
        """The mean of the terms computed since the last call (on the device: no sync), or None."""
        if not self._values:
            return None
        values, self._values = self._values, []
        return torch.stack(values).mean()
