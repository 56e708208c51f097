"""Entry point of biwm-quant: the ``fp8`` quantizer (NVFP4 lands with its issue)."""

from biwm.core import hookimpl


@hookimpl
def register_quantizers(register):
    from biwm.quant.fp8 import FP8, FP8Options

    register("fp8", FP8, options=FP8Options,
             description="FP8 e4m3 linears through torchao (Hopper/Ada GEMMs; emulated elsewhere), inference")
