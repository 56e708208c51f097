#!/usr/bin/env bash
# Issue 22's toy-lab comparison, on a CPU: the shipped 4-step student (examples/weights/toyworld-student) as it
# is ("bf16": unquantised), quantised to NVFP4 after training (weight-only PTQ, `--set model.quantize.name=nvfp4`),
# and trained quantisation-aware to NVFP4 (examples/toy_lab_nvfp4_qat.yaml: 60 more DMD iterations with every
# block linear fake-quantised), each evaluated the same way (32 held-out trajectories x 5 chunks, noise seeds 0 and 1); then
# docs/results/quant.{md,json} with the weight bytes of both forms.
#
#   bash scripts/quant_lab.sh [RUNS_DIR]        # default runs/quant-lab
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/quant-lab}
mkdir -p "$runs"
runs=$(cd "$runs" && pwd)  # absolute: --set paths are read relative to the recipe's folder
eval_settings=(--set evaluate.trajectories=32 --set evaluate.chunks=5 --set evaluate.shuffled_baseline=false
               --set evaluate.compare_teacher=false --set evaluate.dynamics_scenes=0)
biwm eval examples/weights/toyworld-student "${eval_settings[@]}" --out "$runs/bf16"
biwm eval examples/weights/toyworld-student "${eval_settings[@]}" --set model.quantize.name=nvfp4 --out "$runs/nvfp4_ptq"
biwm run examples/toy_lab_nvfp4_qat.yaml --force --set run_dir="$runs/nvfp4_qat"
# the three arms again with another noise seed (the same trajectories): the report's "evaluation_seed_1"
biwm eval examples/weights/toyworld-student "${eval_settings[@]}" --set evaluate.seed=1 --out "$runs/seed1/bf16"
biwm eval examples/weights/toyworld-student "${eval_settings[@]}" --set evaluate.seed=1 --set model.quantize.name=nvfp4 \
    --out "$runs/seed1/nvfp4_ptq"
biwm eval "$runs/nvfp4_qat/distill/model.safetensors" "${eval_settings[@]}" --set evaluate.seed=1 --out "$runs/seed1/nvfp4_qat"
python scripts/quant_report.py "$runs" docs/results/quant   # the JSON; docs/results/quant.md reads it
