"""Helpers shared by the stages: building the model from the previous stage, seeding, text."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from biwm.core.checkpoint import load_module_state
from biwm.core.window import WorldModel

if TYPE_CHECKING:
    from biwm.core.runner import RunContext


def load_world_model(ctx: "RunContext", init: Path | None = None, strict: bool = True,
                     report: bool = True) -> WorldModel:
    """The recipe's model, with weights from ``init`` or else the previous training stage.

    Not strict (an explicit ``init``, e.g. secondary fine-tuning with another control or
    compressor): matching weights load, the rest keep their fresh (zero-initialised) values, and
    missing, unexpected and mismatched names are printed."""
    world = ctx.build_world_model()
    source = init or ctx.previous_weights
    if source is not None:
        found = load_module_state(world.trainable_modules(), load_file(str(source)), strict=strict, source=str(source))
        for kind, names in found.items():
            if names and report:
                ctx.console.print(f"[yellow]init {source}: {len(names)} {kind}[/] ({', '.join(names[:4])}"
                                  f"{' ...' if len(names) > 4 else ''})")
    return world


def text_embeddings(world: WorldModel, prompt: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    text = world.backbone.encode_text([prompt]).to(device)
    null = world.backbone.encode_text([""]).to(device)
    return text.expand(batch, -1, -1), null


def weights_metadata(ctx: "RunContext", init: Path | None) -> dict[str, str]:
    """Metadata of the weights a stage would load (``init`` or the previous training stage's)."""
    from safetensors import safe_open

    source = init or ctx.previous_weights
    if source is None:
        return {}
    with safe_open(str(source), "pt") as f:
        return f.metadata() or {}


def sampler_for(ctx: "RunContext", init: Path | None, steps: int, shift: float, cfg_scale: float):
    """The stage's sampler, unless the weights are a distilled generator: then its own few steps,
    no CFG (recorded in the weights' metadata by the distill stage)."""
    from biwm.core.evaluation import Sampler

    meta = weights_metadata(ctx, init)
    if meta.get("stage") == "distill":
        sampler = Sampler(int(meta["student_steps"]), float(meta["student_shift"]), 1.0, student=True)
    else:
        sampler = Sampler(steps, shift, cfg_scale)
    ctx.console.print(f"sampling: {sampler.describe()}")
    return sampler
