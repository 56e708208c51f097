"""``forward-kl``: f-divergence weighting of the DMD gradient (METHODS.md §4), against DMD's
mode-seeking. The GAN discriminator's logit on a noised generated chunk estimates
log(p_data / p_gen); with r = exp(logit) (clamped), each sample's DMD push is scaled by h(r),
normalised by its batch mean: forward KL h = r (mass-covering), Jensen-Shannon h = r / (1 + r)
(bounded), reverse KL h = 1 (plain DMD). It needs the ``gan`` loss in the same stage."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from biwm.losses.gan import GAN


class ForwardKLOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    divergence: Literal["forward-kl", "js", "reverse-kl"] = "forward-kl"
    logit_clamp: float = Field(10.0, gt=0)
    ratio_min: float = Field(0.1, gt=0)
    ratio_max: float = Field(20.0, gt=0)


def density_weights(logits: Tensor, divergence: str, logit_clamp: float = 10.0, ratio_min: float = 0.1,
                    ratio_max: float = 20.0, part: tuple[int, int] | None = None) -> Tensor:
    """h(r) / mean h(r) per sample, r = exp(logit) clamped. ``part`` (rank, processes): ``logits`` are this
    rank's share of a global batch, and the mean is the global batch's (summed over the processes)."""
    r = logits.clamp(-logit_clamp, logit_clamp).exp().clamp(ratio_min, ratio_max)
    h = {"forward-kl": r, "js": r / (1 + r), "reverse-kl": torch.ones_like(r)}[divergence]
    if part is None or part[1] == 1:
        return h / h.mean()
    import torch.distributed as dist

    total = h.sum()
    dist.all_reduce(total)
    return h / (total / (h.shape[0] * part[1]))


class ForwardKL(nn.Module):
    requires = ("gan",)  # checked by the recipe: the weights come from the GAN discriminator

    def __init__(self, options: ForwardKLOptions, **_):
        super().__init__()
        self.options = options
        self._gan: tuple[GAN, ...] = ()  # a reference, not a submodule: its parameters belong to gan

    def bind(self, losses: list) -> None:
        found = [loss for loss in losses if isinstance(loss, GAN)]
        if not found:
            raise ValueError("forward-kl needs the gan loss in the same stage")
        self._gan = (found[0],)

    @torch.no_grad()
    def prepare(self, step) -> None:
        """Set the DMD weights of this generated chunk (before DMD's generator loss)."""
        if not self._gan:
            raise RuntimeError("forward-kl: bind() it to the stage's losses first")
        gan = self._gan[0]
        noisy = gan.noised(step.chunk.latents.detach(), step.chunk.window, step.sigma, step.generator, step.part)
        o = self.options
        step.dmd_weights = density_weights(gan.logits(step.critic, noisy), o.divergence, o.logit_clamp,
                                           o.ratio_min, o.ratio_max, step.part)

    def generator_loss(self, step) -> None:
        return None

    def critic_loss(self, step) -> None:
        return None
