#!/usr/bin/env bash
# Sets up .venv (if needed: CPU torch and every BiWM package, the biwm-toyworld lab the recipe trains on
# included) and runs the quickstart recipe: runs/quickstart/{metrics.json, generate/*.mp4}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
biwm run examples/quickstart.yaml "$@"
