#!/usr/bin/env bash
# Long rollouts with bounded cost: trains examples/long_rollout.yaml once per history compressor
# (none, framepack, packforcing; same data and budget), then benchmarks/long_rollout.py rolls each
# out for 60 chunks -> docs/results/long_rollout.{json,md,png}.
#
#   bash scripts/long_rollout.sh [--parallel] [extra --set overrides for the three training runs]
#
# --parallel trains the three models at once (they are small; one GPU holds all three).
# Needs a GPU for sensible run time; expects an installed biwm (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
parallel=0
if [[ "${1:-}" == "--parallel" ]]; then parallel=1; shift; fi
BIWM=${BIWM:-biwm}
PY=${PYTHON:-python}
out=${LONG_OUT:-docs/results/long_rollout}
mkdir -p runs/long
pids=()
for name in none framepack packforcing; do
  cmd=($BIWM run examples/long_rollout.yaml --set "run_dir=runs/long/$name" "$@")
  [[ $name != none ]] && cmd+=(--set "model.compressor={name: $name}")
  if (( parallel )); then
    "${cmd[@]}" > "runs/long/$name.log" 2>&1 & pids+=($!)
  else
    "${cmd[@]}"
  fi
done
for pid in "${pids[@]}"; do wait "$pid" || { echo "a training run failed: see runs/long/*.log" >&2; exit 1; }; done
$PY benchmarks/long_rollout.py "none (unbounded)=runs/long/none" \
  "none (last 8)=runs/long/none@model.compressor.options.max_frames=8" \
  framepack=runs/long/framepack packforcing=runs/long/packforcing \
  --chunks "${LONG_CHUNKS:-60}" --trajectories "${LONG_TRAJECTORIES:-8}" --out "$out" \
  ${LONG_NOTES:+--notes "$LONG_NOTES"}
