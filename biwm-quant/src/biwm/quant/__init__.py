"""BiWM's quantizers, through torchao (``pip install 'biwm-quant[torchao]'``).

- ``fp8`` (:mod:`biwm.quant.fp8`): FP8 e4m3 linears for inference; FP8 GEMMs on compute capability
  >= 8.9 (Ada, Hopper), emulated numerics elsewhere.
- ``nvfp4`` (:mod:`biwm.quant.nvfp4`): NVFP4 linears. Quantisation-aware training (fake-quantised
  weights, ``w4a16``, or weights and inputs, ``w4a4``, straight-through gradients) on any device, the
  CPU included; weight-only inference (torchao ``NVFP4WeightOnlyConfig``: 4-bit storage, products in
  the layer's dtype) on any device; NVFP4 GEMMs only for ``w4a4`` on sm100+ (Blackwell), emulated
  elsewhere with a warning that says so. Quality on the toy lab: docs/results/quant.md; speed: not measured.
- :func:`weight_bytes`: the bytes a model's weights take as stored (packed quantised tensors at their real size).
"""

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
