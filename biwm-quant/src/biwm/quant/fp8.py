"""``fp8``: FP8 (e4m3) linear layers through torchao, for training and inference on Hopper and Ada GPUs.

The target linears are those whose name starts with ``modules`` (default ``blocks.``) and whose both
dimensions are multiples of 16. What runs where:

- **Training** (``convert(training=True)``; a recipe's ``model.quantize``): torchao's float8
  training (``convert_to_float8_training``) turns each target into a ``Float8Linear`` with the
  recipe ``granularity`` names: ``row`` is torchao's ``rowwise`` (a scale per row of each operand),
  ``tensor`` its ``tensorwise`` (one scale per tensor). Forward and backward GEMMs run in FP8 with
  dynamic scales; the parameters keep their names, their dtype and their full precision (the master
  copy the optimiser updates), so a checkpoint loads into a plain model. On a GPU of compute
  capability >= 8.9 the GEMMs are ``torch._scaled_mm``; elsewhere (the CPU, an A100) torchao's
  ``emulate=True`` config casts to e4m3 with the same scales and multiplies in higher precision,
  with a warning saying so (``emulate: auto``), or the conversion is refused (``emulate: never``);
  ``emulate: always`` emulates on any device. torchao's float8 training is made to be compiled:
  eager, its casts run as separate kernels.
- **Inference** (``convert(training=False)``, e.g. ``SpeedOptions(quantize={"name": "fp8"})``):
  torchao's ``Float8DynamicActivationFloat8WeightConfig`` stores each weight in e4m3 with a scale per
  output row (or one per tensor) and quantises activations on the fly, per token, so the products
  run on the FP8 tensor cores (``torch._scaled_mm``). Without ``torch.compile`` the quantisation of
  the activations runs as separate kernels, and on an H100 the Wan2.1-1.3B transformer is then
  slower than in bf16 (BENCHMARKS.md). Where no FP8 GEMM exists the same numbers are emulated:
  weights and, through a forward pre-hook, activations are rounded to e4m3 with the same scales and
  the product runs in the layer's own dtype, with a warning. That gives FP8's accuracy, not its speed.
- **Self-distillation** (``self_distill: 0.03``, say): the finetune and distill stages add a KL term
  that pulls the FP8 forward towards the same weights' full-precision forward
  (:mod:`biwm.core.selfdistill`; :meth:`FP8.full_precision` bypasses the ``Float8Linear`` casts).
"""

from __future__ import annotations

import dataclasses
import warnings
from contextlib import AbstractContextManager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from biwm.quant import plain_forward, plain_linear, replace, where

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


class FP8Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    granularity: Literal["row", "tensor"] = Field(
        "row", description="one scale per output row, or per tensor (training: torchao's rowwise or tensorwise "
                           "float8 recipe)")
    modules: str = Field("blocks.", description="convert only linear layers whose name starts with this "
                                               "('' for all)")
    emulate: Literal["auto", "always", "never"] = Field(
        "auto", description="emulate in the layer's dtype where no FP8 GEMM exists (auto), always, or never "
                            "(then such a device is an error)")
    self_distill: float = Field(
        0.0, ge=0, description="weight of the BF16-teacher -> FP8-student self-distillation KL added to the "
                               "training loss of finetune and distill (the reference release: 0.03; 0: off)")


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
    """The ``fp8`` quantizer: torchao float8 training, and FP8 inference."""

    def __init__(self, options: FP8Options | None = None, **_):
        self.options = options or FP8Options()

    def requirements(self) -> str:
        return ("torchao 0.18; an NVIDIA GPU of compute capability >= 8.9 (Ada, Hopper) for the FP8 GEMMs of "
                "training (torchao float8 training, rowwise or tensorwise) and inference, else emulation")

    def _targets(self, module: nn.Module) -> list[tuple[str, nn.Linear]]:
        prefix = self.options.modules
        return [(name, m) for name, m in module.named_modules()
                if isinstance(m, nn.Linear) and name.startswith(prefix)
                and m.in_features % 16 == 0 and m.out_features % 16 == 0]

    def _real_gemm(self, device: torch.device) -> bool:
        """Whether FP8 GEMMs run on ``device``; refuses (``emulate: never``) where there are none."""
        real = fp8_gemm_available(device)
        if self.options.emulate == "never" and not real:
            raise RuntimeError(f"quantizer fp8: {where(device)} has no FP8 GEMMs (they need CUDA compute capability "
                               ">= 8.9, Ada or Hopper); set emulate: auto to emulate the numerics")
        return real and self.options.emulate != "always"

    def convert(self, module: nn.Module, *, training: bool) -> nn.Module:
        targets = self._targets(module)
        if not targets:
            raise ValueError(f"quantizer fp8: no linear layer under {self.options.modules!r} has dimensions that are "
                             "multiples of 16")
        device = next(module.parameters()).device
        if training and device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # a run builds on the CPU, then moves there
        real = self._real_gemm(device)
        names = [name for name, _ in targets]
        for name, linear in targets:  # back to plain linears (a model converted for training before)
            if type(linear).__name__ == "Float8Linear":
                replace(module, name, plain_linear(linear))
        if training:
            self._float8_training(module, set(names), emulate=not real)
            if not real:
                warnings.warn(f"quantizer fp8: no FP8 GEMMs on {where(device)}; training with torchao's "
                              f"{self._recipe()} float8 linears in emulation (e4m3 casts with the same scales, "
                              "products in higher precision: FP8 accuracy, no speed-up)", stacklevel=2)
        elif real:
            self._torchao(module, set(names))
        else:
            warnings.warn(f"quantizer fp8: no FP8 GEMMs on {where(device)}; emulating FP8 numerics in "
                          f"{next(module.parameters()).dtype} (accuracy only, no speed-up)", stacklevel=2)
            per_row = self.options.granularity == "row"
            with torch.no_grad():
                for linear in map(module.get_submodule, names):
                    linear.weight.copy_(round_e4m3(linear.weight, dim=1 if per_row else None))
                    linear.fp8_per_row = per_row
                    linear.register_forward_pre_hook(_quantise_input)
        return module

    def _recipe(self) -> str:
        return "rowwise" if self.options.granularity == "row" else "tensorwise"

    def _float8_training(self, module: nn.Module, names: set[str], emulate: bool) -> None:
        try:
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        except ImportError as e:
            raise ImportError("quantizer fp8 needs torchao: pip install 'biwm-quant[torchao]'") from e
        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(self._recipe()), emulate=emulate)
        convert_to_float8_training(module, module_filter_fn=lambda m, fqn: fqn in names, config=config)

    def full_precision(self, module: nn.Module) -> AbstractContextManager[None]:
        """A context in which ``module``'s float8 training linears multiply their full-precision weights
        (no e4m3 casts): the self-distillation teacher."""
        from torchao.float8.float8_linear import Float8Linear

        return plain_forward(module, (Float8Linear,))

    def _torchao(self, module: nn.Module, names: set[str]) -> None:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
        except ImportError as e:
            raise ImportError("quantizer fp8 needs torchao: pip install 'biwm-quant[torchao]'") from e
        granularity = PerRow() if self.options.granularity == "row" else PerTensor()
        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=granularity),
                  filter_fn=lambda m, fqn: fqn in names)
