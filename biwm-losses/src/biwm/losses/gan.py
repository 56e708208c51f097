"""``gan``: a discriminator head on the critic (METHODS.md §4).

A few learnable register tokens cross-attend to the critic's hidden states after a few blocks
spread over its depth; their outputs, concatenated, go through an MLP to one logit. Real chunks
(with their true history) and generated chunks (with the history they were generated from) are
noised at the same t. Critic side: softplus(f) + softplus(-r) (+ optional R1 by finite
differences); generator side: softplus(-f). The head's parameters train with the critic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from biwm.core.protocols import BlockAccess
from biwm.core.sampling import randn
from biwm.core.schedule import add_noise
from biwm.core.window import Window


class GANOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    blocks: list[int] | None = Field(None, description="critic blocks whose outputs the head reads (default: three "
                                     "spread over depth, e.g. 13, 20, 29 of 30)")
    registers: int = Field(4, ge=1, description="learnable register tokens per tapped block")
    heads: int = Field(4, ge=1, description="attention heads of the register cross-attention")
    hidden: int = Field(256, ge=1, description="width of the logit MLP")
    generator_weight: float = Field(1e-2, ge=0)
    critic_weight: float = Field(1e-2, ge=0)
    r1_weight: float = Field(0.0, ge=0, description="R1 penalty on real chunks, by finite differences (0: off)")
    r1_eps: float = Field(0.01, gt=0, description="size of the finite-difference perturbation")


def default_blocks(depth: int) -> list[int]:
    return sorted({max(0, round(depth * f) - 1) for f in (0.45, 0.7, 1.0)})


class GAN(nn.Module):
    def __init__(self, options: GANOptions, backbone=None, **_):
        super().__init__()
        if backbone is None:
            raise ValueError("the gan loss needs the critic's backbone")
        if not isinstance(backbone, BlockAccess):
            raise ValueError(f"the gan loss reads the critic's hidden states after chosen transformer blocks, through "
                             f"the backbone's block_modules(); the {type(backbone).__name__} backbone has none")
        depth = len(backbone.block_modules())
        self.timestep = backbone.timestep  # the critic's timestep convention, for the windows it judges
        chosen = options.blocks if options.blocks is not None else default_blocks(depth)
        bad = [b for b in chosen if not -depth <= b < depth]
        if bad:
            raise ValueError(f"gan blocks {bad} outside the critic's {depth} blocks")
        self.blocks = [b % depth for b in chosen]
        self.options = options
        dim = backbone.hidden_dim
        heads = options.heads if dim % options.heads == 0 else 1
        self.registers = nn.Parameter(torch.randn(len(self.blocks), options.registers, dim) * 0.02)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in self.blocks)
        self.attend = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in self.blocks)
        self.head = nn.Sequential(nn.Linear(len(self.blocks) * options.registers * dim, options.hidden), nn.SiLU(),
                                  nn.Linear(options.hidden, 1))

    def logits(self, critic, window: Window) -> Tensor:
        """One logit per sample: the critic runs on ``window`` and the head reads its blocks."""
        modules = critic.backbone.block_modules()
        captured: dict[int, Tensor] = {}
        # a dual-stream block (HunyuanVideo-1.5) returns (video, text) hidden states: the head reads the video's
        hooks = [modules[b].register_forward_hook(
            lambda _m, _i, out, b=b: captured.__setitem__(b, out[0] if isinstance(out, tuple) else out))
                 for b in self.blocks]
        try:
            out = critic(window)
        finally:
            for hook in hooks:
                hook.remove()
        # the critic's output joins the logits' graph with weight 0 (same values and gradients): under FSDP2 a
        # sharded unit re-gathers its parameters for backward when the gradient reaches what its forward
        # returned, and the critic's root (embeddings, modulation) would otherwise be asked for them through the
        # tapped blocks only, after an earlier chunk's backward had freed them
        return self([captured[b] for b in self.blocks]) + 0.0 * out.float().sum()

    def forward(self, states: list[Tensor]) -> Tensor:
        """The head: one logit per sample from the critic's hidden states [B, L, D] after each tapped block.
        Its own forward, so that under FSDP2 the head is a unit gathered around it (the distill stage makes
        it part of the critic)."""
        batch = states[0].shape[0]
        feats = []
        for i, hidden in enumerate(states):
            normed = self.norms[i](hidden.to(self.registers.dtype))  # float32; bf16 under FSDP2's bf16 policy
            query = self.registers[i].expand(batch, -1, -1)
            feats.append(self.attend[i](query, normed, normed, need_weights=False)[0])
        return self.head(torch.cat(feats, dim=1).flatten(1)).squeeze(-1)

    def noised(self, latents: Tensor, window: Window, sigma: Tensor, generator: torch.Generator,
               part: tuple[int, int] | None = None) -> Window:
        """``latents`` noised to ``sigma`` in ``window``; ``part``: the noise of a global batch's draw, this
        rank's rows (so N processes noise as one does)."""
        noise = randn(latents.shape, generator, latents.device, part)
        return window.with_chunk(add_noise(latents, noise, sigma), self.timestep(sigma))

    def generator_loss(self, step) -> Tensor | None:
        if self.options.generator_weight == 0:
            return None
        fake = self.logits(step.critic, self.noised(step.chunk.latents, step.chunk.window, step.sigma, step.generator,
                                                    step.part))
        return self.options.generator_weight * F.softplus(-fake).mean()

    def critic_loss(self, step) -> Tensor | None:
        if step.real is None:
            raise ValueError("the gan loss needs real chunks (the distill stage provides them)")
        fake = self.logits(step.critic, self.noised(step.chunk.latents.detach(), step.chunk.window, step.sigma,
                                                     step.generator, step.part))
        real_window = self.noised(step.real.latents, step.real.window, step.sigma, step.generator, step.part)
        real = self.logits(step.critic, real_window)
        loss = F.softplus(fake).mean() + F.softplus(-real).mean()
        if self.options.r1_weight > 0:
            eps = self.options.r1_eps
            bumped = real_window.with_chunk(real_window.chunk + eps * randn(
                real_window.chunk.shape, step.generator, real_window.chunk.device, step.part), real_window.timestep)
            loss = loss + self.options.r1_weight * ((self.logits(step.critic, bumped) - real) / eps).square().mean()
        return self.options.critic_weight * loss
