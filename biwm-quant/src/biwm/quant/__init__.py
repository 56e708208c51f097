"""BiWM's quantizers, through torchao (``pip install 'biwm-quant[torchao]'``).

- ``fp8`` (:mod:`biwm.quant.fp8`): FP8 e4m3 linears for inference; FP8 GEMMs on compute capability
  >= 8.9 (Ada, Hopper), emulated numerics elsewhere.
- ``nvfp4`` (:mod:`biwm.quant.nvfp4`): NVFP4 linears. Quantisation-aware training (fake-quantised
  weights, ``w4a16``, or weights and inputs, ``w4a4``, straight-through gradients) on any device, the
  CPU included; weight-only inference (torchao ``NVFP4WeightOnlyConfig``: 4-bit storage, products in
  the layer's dtype) on any device; NVFP4 GEMMs only for ``w4a4`` on sm100+ (Blackwell), emulated
  elsewhere with a warning that says so. Not measured for speed or quality yet.
"""
