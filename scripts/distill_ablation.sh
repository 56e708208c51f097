#!/usr/bin/env bash
# Stage-2 loss ablation: teacher vs dmd vs dmd+gan vs dmd+gan+forward-kl, same teacher, same budget,
# same held-out trajectories -> docs/results/distill_ablation.{json,md,_drift.png,_idm.png}.
#
#   bash scripts/distill_ablation.sh [--parallel] [extra --set overrides for the three distill runs]
#
# --parallel runs the three students at once (they are small; one GPU holds all three).
# Needs a GPU for sensible run time; expects an installed biwm (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
parallel=0
if [[ "${1:-}" == "--parallel" ]]; then parallel=1; shift; fi
BIWM=${BIWM:-biwm}
PY=${PYTHON:-python}
out=${ABLATION_OUT:-docs/results/distill_ablation}
teacher=runs/bidirectional
if [[ ! -f $teacher/finetune/model.safetensors ]]; then
  $BIWM run examples/bidir_vs_causal.yaml
fi
declare -A losses=([dmd]="[dmd]" [dmd_gan]="[dmd, gan]" [dmd_gan_fkl]="[dmd, gan, forward-kl]")
pids=()
for name in dmd dmd_gan dmd_gan_fkl; do
  cmd=($BIWM run examples/distill_ablation.yaml --set "distill.losses=${losses[$name]}"
       --set "run_dir=runs/ablation/$name" "$@")
  if (( parallel )); then
    mkdir -p runs/ablation
    "${cmd[@]}" > "runs/ablation/$name.log" 2>&1 & pids+=($!)
  else
    "${cmd[@]}"
  fi
done
# The teacher on the students' evaluation: the recipe's own evaluate settings (same trajectories,
# chunks and still-camera scenes), with the teacher's sampler (50 Euler steps, CFG 3).
mapfile -t same < <($PY - <<'PY'
import yaml
stage = next(s for s in yaml.safe_load(open("examples/distill_ablation.yaml"))["stages"] if s["stage"] == "evaluate")
for key, value in stage.items():
    if key not in ("stage", "compare_teacher"):
        print(f"--set\nevaluate.{key}={value}")
PY
)
$BIWM eval $teacher --out runs/ablation/teacher "${same[@]}" --set evaluate.steps=50 --set evaluate.cfg_scale=3
for pid in "${pids[@]}"; do wait "$pid" || { echo "a distill run failed: see runs/ablation/*.log" >&2; exit 1; }; done
$BIWM compare teacher=runs/ablation/teacher dmd=runs/ablation/dmd/evaluate \
  dmd+gan=runs/ablation/dmd_gan/evaluate dmd+gan+forward-kl=runs/ablation/dmd_gan_fkl/evaluate \
  --out "$out" --title "Stage-2 loss ablation (toy world)" \
  ${ABLATION_NOTES:+--notes "$ABLATION_NOTES"} ${ABLATION_SETUP:+--setup "$ABLATION_SETUP"}
