"""LoRA adapters through peft, for a critic that shares its frozen base with the teacher
(METHODS.md §3): the critic is the base with adapters on, the teacher the same base with them off,
so a large backbone is held in memory once."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def add_lora(module: nn.Module, rank: int, targets: list[str]) -> list[nn.Parameter]:
    """Inject LoRA adapters (B initialised to zero, so outputs are unchanged) into the linear layers
    named ``targets``; freezes everything else in ``module`` and returns the adapter parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("a LoRA critic needs peft: pip install 'biwm-core[lora]'") from exc
    module.requires_grad_(False)
    try:
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets), module)
    except ValueError as exc:
        raise ValueError(f"lora_targets: {targets} match no layer of the backbone ({exc})") from None
    params = [p for name, p in module.named_parameters() if "lora_" in name]
    for p in params:
        p.requires_grad_(True)
    return params


@contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model (the teacher), then switch its adapters back on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
