"""BiWM's quantizers, through torchao (``pip install 'biwm-quant[torchao]'``).

- ``fp8`` (:mod:`biwm.quant.fp8`): FP8 e4m3 linears. Training (a recipe's ``model.quantize``) through
  torchao's float8 training (``Float8Linear``, rowwise or tensorwise scales); inference through
  torchao's ``Float8DynamicActivationFloat8WeightConfig``. FP8 GEMMs on compute capability >= 8.9
  (Ada, Hopper); elsewhere (the CPU included) the same numbers are emulated, with a warning.
- ``nvfp4`` (:mod:`biwm.quant.nvfp4`): NVFP4 linears. Quantisation-aware training (fake-quantised
  weights, ``w4a16``, or weights and inputs, ``w4a4``, straight-through gradients) on any device, the
  CPU included; weight-only inference (torchao ``NVFP4WeightOnlyConfig``: 4-bit storage, products in
  the layer's dtype) on any device; NVFP4 GEMMs only for ``w4a4`` on sm100+ (Blackwell), emulated
  elsewhere with a warning that says so. Quality on the toy lab: docs/results/quant.md; speed: not measured.
- Both take ``self_distill`` (a weight, default 0: off): the finetune and distill stages then add a
  BF16-teacher -> quantised-student KL term to the training loss (:mod:`biwm.core.selfdistill`), the
  teacher being the same weights with the quantised linears bypassed (each quantizer's
  ``full_precision(module)``).
- :func:`weight_bytes`: the bytes a model's weights take as stored (packed quantised tensors at their real size).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import MethodType

import torch
from torch import Tensor, nn


def _stored_bytes(t: Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass (e.g. torchao's packed ``NVFP4Tensor``) counts its inner tensors."""
    if type(t) not in (Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_stored_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and persistent buffers as they are stored (packed quantised weights,
    their scales included, at their real size), counting tensors shared by several modules once."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += _stored_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total


def where(device: torch.device) -> str:
    """``device`` as the quantizers' messages name it: with its compute capability when it is a CUDA GPU."""
    if device.type != "cuda":
        return str(device)
    return f"{device} (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})"


def plain_linear(linear: nn.Linear) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``linear``'s own weight and bias (the same parameters, not copies)."""
    plain = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
    plain.weight, plain.bias = linear.weight, linear.bias
    return plain


def replace(module: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` in ``module`` at the dotted ``name``."""
    parent, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, child, new)


@contextmanager
def plain_forward(module: nn.Module, kinds: tuple[type, ...]) -> Iterator[None]:
    """Within the block, every submodule of ``module`` of one of ``kinds`` (linear layers converted
    for training) multiplies as a plain ``nn.Linear``: ``x @ weight.T + bias`` in the input's dtype
    (under autocast, autocast's), with the same parameters. The modules stay in place (so FSDP2 and
    compiled graphs, which guard on the override, see the same objects)."""
    layers = [m for m in module.modules() if isinstance(m, kinds)] if kinds else []
    for m in layers:
        m.forward = MethodType(nn.Linear.forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
