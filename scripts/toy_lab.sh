#!/usr/bin/env bash
# The toy lab on one GPU, end to end (issue 13): the IDM for the lab's rendering, the stage-1 teacher
# (examples/toy_lab.yaml), a 4-step DMD student from it, both evaluated on 32 held-out trajectories x
# 20 chunks, and docs/results/toy_lab.json from the two evaluations.
#
#   bash scripts/toy_lab.sh [RUNS_DIR]        # default runs/toy-lab-all
#
# Environment: TEACHER_STEPS, STUDENT_STEPS override the recipes' step counts (quick trials).
# Not yet run end to end: its teacher step made examples/weights/toyworld-teacher (docs/results/toy_lab.md).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/toy-lab-all}
mkdir -p "$runs"
runs=$(cd "$runs" && pwd)  # absolute: --set paths are read relative to the recipe's folder
biwm idm train --recipe examples/toy_lab.yaml                     # cached where biwm eval finds it
biwm run examples/toy_lab.yaml --force --set run_dir="$runs/teacher" \
    ${TEACHER_STEPS:+--set stages[0].steps=$TEACHER_STEPS}
biwm run examples/toy_lab_student.yaml --force --set run_dir="$runs/student" \
    --set stages[0].init="$runs/teacher/finetune/model.safetensors" ${STUDENT_STEPS:+--set stages[0].steps=$STUDENT_STEPS}
python scripts/lab_probe.py "$runs/teacher" --n 32 --chunks 10 --samplers 20:1,50:1,50:2 --out "$runs/teacher_probe"
python scripts/toy_lab_report.py "$runs/teacher/evaluate/metrics.json" "$runs/student/evaluate/metrics.json"
