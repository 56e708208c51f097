"""Entry point of biwm-quant: the ``fp8`` and ``nvfp4`` quantizers."""

from biwm.core import hookimpl


@hookimpl
def register_quantizers(register):
    from biwm.quant.fp8 import FP8, FP8Options
    from biwm.quant.nvfp4 import NVFP4, NVFP4Options

    register("fp8", FP8, options=FP8Options,
             description="FP8 e4m3 linears through torchao (Hopper/Ada GEMMs; emulated elsewhere): float8 training "
                         "(rowwise or tensorwise) and inference")
    register("nvfp4", NVFP4, options=NVFP4Options,
             description="NVFP4 linears through torchao: quantisation-aware training on any device, weight-only "
                         "inference; NVFP4 GEMMs (w4a4) on sm100+ only")
