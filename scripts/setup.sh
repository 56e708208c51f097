#!/usr/bin/env bash
# Creates .venv with CPU torch 2.13 and every BiWM distribution (the toy-world lab and biwm play included; playwright for the browser test) installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"   # first, so nothing below pulls another torch build
python -m pip install -q -e "./biwm-core[lora,test]" -e "./biwm-backbones[wan,hunyuan]" -e ./biwm-compressors -e ./biwm-losses \
    -e ./biwm-quant -e ./biwm-toyworld -e ./biwm-data -e "./biwm-play[test]" pytest
