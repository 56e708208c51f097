#!/usr/bin/env bash
# Sets up .venv (if needed) and runs the test suite on CPU; GPU tests skip without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q tests "$@"
