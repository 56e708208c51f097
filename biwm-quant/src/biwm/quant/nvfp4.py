"""``nvfp4``: NVFP4 (4-bit) linear layers through torchao, trained quantisation-aware on any device.

NVFP4 stores a tensor as e2m1 values with one e4m3 scale per 16 consecutive inputs and one fp32
scale per tensor (torchao's ``NVFP4Tensor``); a linear layer's both dimensions must be multiples of
16. The numbers always come from torchao's ``NVFP4Tensor.to_nvfp4(...).dequantize()``, the same
code its inference configs quantise with, never from block scaling written here. What runs where:

- **Training** (``convert(training=True)``; a recipe's ``model.quantize``): each target linear
  becomes a :class:`NVFP4FakeQuantLinear`. Every forward rounds its weight (``w4a16``, the default)
  and, with ``w4a4``, its input to NVFP4 and back, and multiplies in the layer's own dtype; the
  gradient passes the rounding unchanged (straight-through estimator). This runs on any device, the
  CPU included; the parameters keep their names and their full precision (the master copy the
  optimiser updates), so a checkpoint loads into a quantised or a plain model alike.
- **Inference** (``convert(training=False)``, e.g. ``SpeedOptions(quantize={"name": "nvfp4"})``):
  torchao's ``NVFP4WeightOnlyConfig`` packs the weights to 4 bits (memory: about 3.6× fewer bytes
  than bf16) and dequantises them for each product, on any device (CUDA GPUs and the CPU); with
  ``w4a4`` a forward pre-hook also rounds the input. Both forms give the same outputs.
- **Real NVFP4 GEMMs** need compute capability 10.0 or newer (Blackwell, sm100+) and only ``w4a4``
  has them: there, training uses torchao's ``NVFP4FakeQuantizedLinear`` (NVFP4 GEMMs forward, fake
  quantisation backward) and inference ``NVFP4DynamicActivationNVFP4WeightConfig``. Anywhere else
  (an H100/H200 is 9.0) ``w4a4`` is emulated as above with a warning saying so (``emulate: auto``),
  or refused (``emulate: never``). ``w4a16`` has no NVFP4 GEMM on any GPU: it saves memory, not time.
- **Self-distillation** (``self_distill: 0.03``, say): the finetune and distill stages add a KL term
  that pulls the fake-quantised forward towards the same weights' full-precision forward
  (:mod:`biwm.core.selfdistill`; :meth:`NVFP4.full_precision` bypasses the fake quantisation).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from biwm.quant import plain_forward, plain_linear, replace, where

NVFP4_GEMM_CAPABILITY = (10, 0)


class NVFP4Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scheme: Literal["w4a16", "w4a4"] = Field(
        "w4a16", description="w4a16: NVFP4 weights, inputs in the layer's dtype; w4a4: inputs rounded to NVFP4 too")
    modules: str | list[str] | None = Field(
        None, description="convert the linear layers whose name starts with this ('' for all), or with any of "
                          "these prefixes; default: those inside the transformer's repeated blocks (diffusers' "
                          "_repeated_blocks)")
    emulate: Literal["auto", "always", "never"] = Field(
        "auto", description="w4a4 only: emulate where no NVFP4 GEMM exists (auto, with a warning), always, or "
                            "never (then a GPU before sm100 is an error)")
    self_distill: float = Field(
        0.0, ge=0, description="weight of the BF16-teacher -> NVFP4-student self-distillation KL added to the "
                               "training loss of finetune and distill (the reference release: 0.03; 0: off)")

    @model_validator(mode="after")
    def _emulate_needs_w4a4(self) -> "NVFP4Options":
        if self.emulate == "never" and self.scheme == "w4a16":
            raise ValueError("emulate: never asks for NVFP4 GEMMs, which only scheme w4a4 has (w4a16 multiplies "
                             "dequantised weights in the layer's dtype on every device)")
        return self


def nvfp4_gemm_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= NVFP4_GEMM_CAPABILITY


def _torchao():
    try:
        import torchao.prototype.mx_formats as mx_formats
        from torchao.prototype.mx_formats import nvfp4_tensor
    except ImportError as e:
        raise ImportError("quantizer nvfp4 needs torchao (0.18): pip install 'biwm-quant[torchao]'") from e
    return mx_formats, nvfp4_tensor


def nvfp4_round(x: Tensor) -> Tensor:
    """``x`` quantised to NVFP4 by torchao and dequantised, in its own dtype and shape: blocks of 16
    along the last dimension, the per-tensor scale from its absolute maximum (as torchao's
    ``NVFP4WeightOnlyConfig`` scales a weight). An all-zero ``x`` stays zero (torchao's scale would
    divide by zero)."""
    _, nv = _torchao()
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    if flat.dtype not in (torch.float32, torch.bfloat16):  # the dtypes torchao quantises from
        flat = flat.float()
    amax = flat.abs().amax()
    rounded = nv.NVFP4Tensor.to_nvfp4(flat, per_tensor_scale=nv.per_tensor_amax_to_scale(amax)).dequantize(x.dtype)
    return torch.where(amax > 0, rounded, flat.to(x.dtype)).view(x.shape)


class _StraightThrough(torch.autograd.Function):
    """NVFP4 rounding forward; the gradient passes it unchanged (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return nvfp4_round(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def fake_nvfp4(x: Tensor) -> Tensor:
    """:func:`nvfp4_round` with a straight-through gradient."""
    return _StraightThrough.apply(x)


class NVFP4FakeQuantLinear(nn.Linear):
    """A linear layer trained for NVFP4: weight (and with ``activations`` the input) fake-quantised
    in each forward, the product in the layer's dtype. Same parameters, same names as the linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activations: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.activations = activations

    @classmethod
    def from_linear(cls, linear: nn.Linear, activations: bool) -> "NVFP4FakeQuantLinear":
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, activations, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def to_linear(self) -> nn.Linear:
        return plain_linear(self)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(fake_nvfp4(x) if self.activations else x, fake_nvfp4(self.weight), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nvfp4={'w4a4' if self.activations else 'w4a16'}"


def _round_input(module: nn.Module, args: tuple) -> tuple:
    return (nvfp4_round(args[0]), *args[1:])


class NVFP4:
    """The ``nvfp4`` quantizer: quantisation-aware training (any device) and inference (torchao)."""

    def __init__(self, options: NVFP4Options | None = None, **_):
        self.options = options or NVFP4Options()

    def requirements(self) -> str:
        return ("torchao 0.18; any device for training (fake quantisation) and weight-only inference; an NVIDIA "
                "GPU of compute capability >= 10.0 (Blackwell) for the NVFP4 GEMMs of w4a4, else emulation")

    def _targets(self, module: nn.Module) -> list[tuple[str, nn.Linear]]:
        if self.options.modules is not None:
            modules = self.options.modules
            prefixes = [modules] if isinstance(modules, str) else list(modules)
        else:
            # the repeated blocks of every diffusers model inside (the transformer, or a world model that holds it)
            blocks = {b for m in module.modules() for b in (getattr(m, "_repeated_blocks", None) or ())}
            prefixes = [f"{name}." for name, m in module.named_modules() if type(m).__name__ in blocks]
            if not prefixes:
                raise ValueError(f"quantizer nvfp4: {type(module).__name__} has no repeated transformer blocks "
                                 "(diffusers' _repeated_blocks) to convert; name the layers with options.modules "
                                 "('' for every linear)")
        return [(name, m) for name, m in module.named_modules()
                if isinstance(m, nn.Linear) and name.startswith(tuple(prefixes))
                and m.in_features % 16 == 0 and m.out_features % 16 == 0]

    def _real_gemm(self, device: torch.device) -> bool:
        """Whether ``w4a4`` runs NVFP4 GEMMs on ``device``; refuses or warns as ``emulate`` says otherwise."""
        if self.options.scheme != "w4a4" or self.options.emulate == "always":
            return False
        if nvfp4_gemm_available(device):
            return True
        if self.options.emulate == "never":
            raise RuntimeError(f"quantizer nvfp4: {where(device)} has no NVFP4 GEMMs (they need CUDA compute "
                               "capability >= 10.0, Blackwell); set emulate: auto to emulate w4a4, or use scheme: w4a16")
        warnings.warn(f"quantizer nvfp4: no NVFP4 GEMMs on {where(device)} (they need compute capability >= 10.0, "
                      "Blackwell); emulating w4a4: weights and inputs rounded to NVFP4 by torchao, products in the "
                      "layer's dtype (NVFP4 accuracy, no speed-up)", stacklevel=3)
        return False

    def convert(self, module: nn.Module, *, training: bool) -> nn.Module:
        targets = self._targets(module)
        if not targets:
            where = "the transformer's blocks" if self.options.modules is None else repr(self.options.modules)
            raise ValueError(f"quantizer nvfp4: no linear layer under {where} has dimensions that are multiples "
                             "of 16")
        mx_formats, _ = _torchao()
        device = next(module.parameters()).device
        if training and device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())  # a run builds on the CPU, then moves there
        real = self._real_gemm(device)
        for name, linear in targets:  # back to plain linears (a model converted for training before)
            if hasattr(linear, "to_linear"):
                replace(module, name, linear.to_linear())
        if training:
            self._fake_quantise(module, [name for name, _ in targets], real)
            return module
        # an all-zero weight stays a plain linear: torchao's per-tensor scale would divide by zero
        names = {name for name, linear in targets if linear.weight.any()}
        from torchao.quantization import quantize_

        if real:  # the fused activation kernel needs MSLK, which torchao does not bring
            config = mx_formats.NVFP4DynamicActivationNVFP4WeightConfig(use_triton_kernel=False)
        else:
            config = mx_formats.NVFP4WeightOnlyConfig()
        quantize_(module, config, filter_fn=lambda m, fqn: fqn in names)
        if self.options.scheme == "w4a4" and not real:
            for name in names:
                module.get_submodule(name).register_forward_pre_hook(_round_input)
        return module

    def _fake_quantise(self, module: nn.Module, names: list[str], real: bool) -> None:
        w4a4 = self.options.scheme == "w4a4"
        for name in names:
            linear = module.get_submodule(name)
            if real:
                from torchao.prototype.qat.nvfp4 import NVFP4FakeQuantizeConfig, NVFP4FakeQuantizedLinear

                config = NVFP4FakeQuantizeConfig(use_per_tensor_scale=True)
                new = NVFP4FakeQuantizedLinear.from_linear(linear, activation_config=config, weight_config=config)
            else:
                new = NVFP4FakeQuantLinear.from_linear(linear, activations=w4a4)
            replace(module, name, new)

    def full_precision(self, module: nn.Module) -> AbstractContextManager[None]:
        """A context in which ``module``'s linears converted for training (fake-quantised, or torchao's
        NVFP4 QAT linears) multiply their full-precision weights: the self-distillation teacher."""
        kinds: tuple[type, ...] = (NVFP4FakeQuantLinear,)
        try:
            from torchao.prototype.qat.nvfp4 import NVFP4FakeQuantizedLinear

            kinds += (NVFP4FakeQuantizedLinear,)
        except ImportError:
            pass
        return plain_forward(module, kinds)
