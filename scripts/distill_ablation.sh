#!/usr/bin/env bash
# Stage-2 loss ablation on the working toy lab (issue 16, study 3): the shipped teacher
# (examples/weights/toyworld-teacher) distilled with dmd, dmd+gan and dmd+gan+forward-kl, each with the same
# recipe and budget (examples/distill_ablation.yaml) and every seed asked for, then the teacher evaluated the
# same way, then docs/results/distill_ablation.{json,md,_drift.png,_idm.png} (each arm: the mean over its seeds
# ± half the range, `biwm compare NAME=SEED0,SEED1`).
#
#   bash scripts/distill_ablation.sh [--parallel] [--seeds "0 1"] [--arms "..."] [--report-only] [--set KEY=VALUE ...]
#
# Study 4 (few steps: 4-, 2- and 1-step students against the 50-step teacher) is the same script:
#   ABLATION_OUT=docs/results/few_steps bash scripts/distill_ablation.sh --parallel --arms "dmd dmd_2step dmd_1step"
#
# --parallel   runs one seed's three students at once (they are small: one GPU holds them)
# --seeds      the training seeds (default "0 1"); seeds already run (their evaluate/metrics.json exists) are
#              kept, so the study can be split over several device calls, one seed each
# --arms       which arms (default "dmd dmd_gan dmd_gan_fkl"; also dmd_2step, dmd_1step: plain DMD, 2 or 1 student steps)
# --report-only  only the teacher's evaluation (if missing) and the comparison, over the seeds found
# --set        passed to the three distill runs, evaluate.* ones to the teacher's evaluation too
#              (a CPU smoke run: --seeds 0 --set distill.steps=2 --set evaluate.trajectories=2 ...)
#
# Needs a GPU for sensible run time (minutes per student on an H200); expects an installed biwm
# (scripts/setup.sh). RUNS (default runs/ablation) and ABLATION_OUT (default docs/results/distill_ablation)
# move the outputs; TEACHER_STEPS (default 50) sets the teacher's Euler steps.
set -euo pipefail
cd "$(dirname "$0")/.."
parallel=0; report_only=0; seeds="0 1"; extra=(); arms=(dmd dmd_gan dmd_gan_fkl)
while (( $# )); do
  case "$1" in
    --parallel) parallel=1; shift ;;
    --report-only) report_only=1; shift ;;
    --seeds) seeds=$2; shift 2 ;;
    --arms) read -ra arms <<< "$2"; shift 2 ;;
    --set) extra+=(--set "$2"); shift 2 ;;
    *) echo "distill_ablation.sh: unknown argument $1 (see the header for usage)" >&2; exit 2 ;;
  esac
done
BIWM=${BIWM:-biwm}
runs=${RUNS:-runs/ablation}
out=${ABLATION_OUT:-docs/results/distill_ablation}
mkdir -p "$runs"
runs=$(cd "$runs" && pwd)  # absolute: --set paths are read relative to the recipe's folder
declare -A losses=([dmd]="[dmd]" [dmd_gan]="[dmd, gan]" [dmd_gan_fkl]="[dmd, gan, forward-kl]" [dmd_2step]="[dmd]"
                   [dmd_1step]="[dmd]")
declare -A steps=([dmd]=4 [dmd_gan]=4 [dmd_gan_fkl]=4 [dmd_2step]=2 [dmd_1step]=1)
declare -A label=([dmd]="dmd" [dmd_gan]="dmd+gan" [dmd_gan_fkl]="dmd+gan+forward-kl" [dmd_2step]="dmd-2-steps"
                  [dmd_1step]="dmd-1-step")
for arm in "${arms[@]}"; do
  [[ -n ${losses[$arm]:-} ]] || { echo "distill_ablation.sh: unknown arm $arm; known: ${!losses[*]}" >&2; exit 2; }
done

if (( ! report_only )); then
  for seed in $seeds; do
    pids=()
    for arm in "${arms[@]}"; do
      dir=$runs/${arm}_s$seed
      [[ -f $dir/evaluate/metrics.json ]] && { echo "$arm seed $seed: done before ($dir)"; continue; }
      cmd=($BIWM run examples/distill_ablation.yaml --force --set "distill.losses=${losses[$arm]}"
           --set "distill.student_steps=${steps[$arm]}" --set "seed=$seed" --set "run_dir=$dir" "${extra[@]}")
      if (( parallel )); then
        "${cmd[@]}" > "$runs/${arm}_s$seed.log" 2>&1 & pids+=($!)
      else
        "${cmd[@]}"
      fi
    done
    for pid in "${pids[@]}"; do
      wait "$pid" || { echo "a distill run failed: see $runs/*_s$seed.log" >&2; exit 1; }
    done
  done
fi

# The teacher on the students' evaluation: the recipe's own evaluate settings (same trajectories, chunks and
# still-camera scenes), with the teacher's sampler as docs/results/toy_lab.json scores it: 50 Euler steps (TEACHER_STEPS),
# its card's CFG 1.5.
if [[ ! -f $runs/teacher/metrics.json ]]; then
  mapfile -t same < <(python - <<'PY'
import yaml
stage = next(s for s in yaml.safe_load(open("examples/distill_ablation.yaml"))["stages"] if s["stage"] == "evaluate")
for key, value in stage.items():
    if key != "stage":
        print(f"--set\nevaluate.{key}={value}")
PY
)
  same+=(--set "evaluate.steps=${TEACHER_STEPS:-50}")
  for ((i = 1; i < ${#extra[@]}; i += 2)); do  # the runs' evaluate.* overrides apply to the teacher too
    [[ ${extra[i]} == evaluate.* ]] && same+=(--set "${extra[i]}")
  done
  $BIWM eval examples/weights/toyworld-teacher "${same[@]}" --out "$runs/teacher"
fi

compare=(teacher="$runs/teacher")
for arm in "${arms[@]}"; do
  found=()
  for dir in "$runs/${arm}"_s*; do [[ -f $dir/evaluate/metrics.json ]] && found+=("$dir/evaluate"); done
  (( ${#found[@]} )) || { echo "no finished run of $arm in $runs" >&2; exit 1; }
  compare+=("${label[$arm]}=$(IFS=,; echo "${found[*]}")")
done
$BIWM compare "${compare[@]}" --out "$out" --title "Stage-2 loss ablation (toy lab, issue 16)"
