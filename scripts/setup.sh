#!/usr/bin/env bash
# Creates .venv with CPU torch 2.13, torchao 0.18 (for biwm-quant, without its dependencies: it declares none) and every BiWM distribution (the toy-world lab and biwm play included; playwright for the browser test) installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"   # first, so nothing below pulls another torch build
# torchao declares no dependencies (not even torch): --no-deps keeps it so; pinned, as the nvfp4 quantizer uses its
# prototype NVFP4 API (torchao.prototype.mx_formats), tested with 0.18.0
python -m pip install -q --no-deps "torchao==0.18.0"
python -m pip install -q -e "./biwm-core[lora,test]" -e "./biwm-backbones[wan,hunyuan,ltx]" -e ./biwm-compressors -e ./biwm-losses \
    -e "./biwm-quant[torchao]" -e ./biwm-toyworld -e ./biwm-data -e "./biwm-play[test]" pytest
