"""``fp8``: FP8 (e4m3) linear layers for inference through torchao, for Hopper and Ada GPUs.

torchao's ``Float8DynamicActivationFloat8WeightConfig`` stores each weight in e4m3 with a scale per
output row (or one per tensor) and quantises activations on the fly, per token, so the products run
on the FP8 tensor cores (``torch._scaled_mm``). Without ``torch.compile`` the quantisation of the
activations runs as separate kernels, and on an H100 the Wan2.1-1.3B transformer is then slower
than in bf16 (BENCHMARKS.md).

Where no FP8 GEMM exists (CPU, GPUs before compute capability 8.9) the same numbers are emulated:
weights and, through a forward pre-hook, activations are rounded to e4m3 with the same scales and
the product runs in the layer's own dtype, with a warning. That gives FP8's accuracy, not its speed.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


class FP8Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    granularity: Literal["row", "tensor"] = Field("row", description="one scale per output row, or per tensor")
    modules: str = Field("blocks.", description="convert only linear layers whose name starts with this "
                                               "('' for all)")
    emulate: Literal["auto", "always", "never"] = Field(
        "auto", description="emulate in the layer's dtype where no FP8 GEMM exists (auto), always, or never "
                            "(then such a device is an error)")


def fp8_gemm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def round_e4m3(x: Tensor, dim: int | None) -> Tensor:
    """``x`` rounded to e4m3 with an absmax scale over ``dim`` (None: the whole tensor), back in its dtype."""
    amax = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    scale = amax.float().clamp(min=1e-12) / E4M3_MAX
    return ((x.float() / scale).to(torch.float8_e4m3fn).float() * scale).to(x.dtype)


def _quantise_input(module: nn.Module, args: tuple) -> tuple:
    return (round_e4m3(args[0], dim=-1 if module.fp8_per_row else None), *args[1:])


class FP8:
    """The ``fp8`` quantizer (inference only)."""

    def __init__(self, options: FP8Options | None = None, **_):
        self.options = options or FP8Options()

    def requirements(self) -> str:
        return "torchao; an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper) for FP8 GEMMs, else emulation"

    def _targets(self, module: nn.Module) -> list[tuple[str, nn.Linear]]:
        prefix = self.options.modules
        return [(name, m) for name, m in module.named_modules()
                if isinstance(m, nn.Linear) and name.startswith(prefix)
                and m.in_features % 16 == 0 and m.out_features % 16 == 0]

    def convert(self, module: nn.Module, *, training: bool) -> nn.Module:
        if training:
            raise ValueError("quantizer fp8: converts for inference only (training: false); "
                             "FP8 training is not supported yet")
        targets = self._targets(module)
        if not targets:
            raise ValueError(f"quantizer fp8: no linear layer under {self.options.modules!r} has dimensions that are "
                             "multiples of 16")
        device = next(module.parameters()).device
        real = fp8_gemm_available(device)
        if self.options.emulate == "never" and not real:
            raise RuntimeError(f"quantizer fp8: {device} has no FP8 GEMMs (needs CUDA compute capability >= 8.9); "
                               "set emulate: auto to emulate the numerics")
        if real and self.options.emulate != "always":
            self._torchao(module, {name for name, _ in targets})
        else:
            warnings.warn(f"quantizer fp8: no FP8 GEMMs on {device}; emulating FP8 numerics in "
                          f"{next(module.parameters()).dtype} (accuracy only, no speed-up)", stacklevel=2)
            per_row = self.options.granularity == "row"
            with torch.no_grad():
                for _, linear in targets:
                    linear.weight.copy_(round_e4m3(linear.weight, dim=1 if per_row else None))
                    linear.fp8_per_row = per_row
                    linear.register_forward_pre_hook(_quantise_input)
        return module

    def _torchao(self, module: nn.Module, names: set[str]) -> None:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
        except ImportError as e:
            raise ImportError("quantizer fp8 needs torchao: pip install 'biwm-quant[torchao]'") from e
        granularity = PerRow() if self.options.granularity == "row" else PerTensor()
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=granularity),
                  filter_fn=lambda m, fqn: fqn in names)
