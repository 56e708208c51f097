#!/usr/bin/env bash
# The toy lab on one GPU, end to end (issue 13): the stage-1 teacher (examples/toy_lab.yaml, then
# examples/toy_lab_continue.yaml, then grown from 6 to 12 blocks and trained on with still-camera clips:
# examples/toy_lab_grow.yaml, then trained on with more clips: examples/toy_lab_phase4.yaml), a 4-step DMD student from it (examples/toy_lab_student.yaml), the teacher evaluated on 32 held-out
# trajectories x 20 chunks with the sampler the student is compared against (50 Euler steps, CFG 1.5:
# 100 NFE per chunk), a probe of the teacher, and docs/results/toy_lab.json from the two evaluations.
#
#   bash scripts/toy_lab.sh [RUNS_DIR]        # default runs/toy-lab-all
#
# Environment: TEACHER=FILE skips stage 1 and starts from that model (e.g. the shipped
# examples/weights/toyworld-teacher/model.safetensors); TEACHER_STEPS, STUDENT_STEPS override the
# recipes' step counts (quick trials); TEACHER_CFG the teacher's guidance (default 1.5).
# The shipped weights were made by these steps run one at a time, in separate GPU calls
# (docs/results/toy_lab.md); the script as a whole has not run in one go.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs/toy-lab-all}
mkdir -p "$runs"
runs=$(cd "$runs" && pwd)  # absolute: --set paths are read relative to the recipe's folder
if [ -z "${TEACHER:-}" ]; then
    biwm run examples/toy_lab.yaml --force --set run_dir="$runs/teacher" \
        ${TEACHER_STEPS:+--set stages[0].steps=$TEACHER_STEPS}
    biwm run examples/toy_lab_continue.yaml --force --set run_dir="$runs/teacher2" \
        --set stages[0].init="$runs/teacher/finetune/model.safetensors" \
        ${TEACHER_STEPS:+--set stages[0].steps=$TEACHER_STEPS}
    # the measured run grew the bf16 copy of phase 2 that was shipped before (git a722c36)
    python scripts/ship_model.py "$runs/teacher2/finetune/model.safetensors" "$runs/teacher2-bf16" --sampler 20:1.5:3
    python scripts/grow_model.py "$runs/teacher2-bf16/model.safetensors" "$runs/grown/model.safetensors" --layers 12
    biwm run examples/toy_lab_grow.yaml --force --set run_dir="$runs/teacher3" \
        --set stages[0].init="$runs/grown/model.safetensors" ${TEACHER_STEPS:+--set stages[0].steps=$TEACHER_STEPS}
    # the measured phase 4 started from the int8 copy of phase 3 that was shipped before (git 5d4b321)
    python scripts/ship_model.py "$runs/teacher3/finetune/model.safetensors" "$runs/teacher3-int8" --sampler 20:1.5:3 --int8
    biwm run examples/toy_lab_phase4.yaml --force --set run_dir="$runs/teacher4" \
        --set stages[0].init="$runs/teacher3-int8/model.safetensors" ${TEACHER_STEPS:+--set stages[0].steps=$TEACHER_STEPS}
    TEACHER="$runs/teacher4/finetune/model.safetensors"
fi
teacher=$(cd "$(dirname "$TEACHER")" && pwd)/$(basename "$TEACHER")
cfg=${TEACHER_CFG:-1.5}
biwm run examples/toy_lab_student.yaml --force --set run_dir="$runs/student" --set stages[0].init="$teacher" \
    --set stages[1].teacher_cfg="$cfg" ${STUDENT_STEPS:+--set stages[0].steps=$STUDENT_STEPS}
# dynamics on 16 still scenes: the default 4 do not resolve the target (docs/results/toy_lab.md; the
# toy_lab.json of 2026-12-02 was measured with 4)
biwm eval "$teacher" --out "$runs/teacher_eval" --set evaluate.trajectories=32 --set evaluate.chunks=20 \
    --set evaluate.steps=50 --set evaluate.cfg_scale="$cfg" --set evaluate.dynamics_scenes=16
python scripts/lab_probe.py "$teacher" --n 32 --chunks 10 --samplers 20:1:3,20:2:3,50:"$cfg":3 --out "$runs/teacher_probe"
python scripts/toy_lab_report.py "$runs/teacher_eval/metrics.json" "$runs/student/evaluate/metrics.json"
