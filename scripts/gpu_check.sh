#!/usr/bin/env bash
# One GPU check of attnres-compile: every stage, its tables, one log, one summary.
#
#   scripts/gpu_check.sh                      # on a CUDA machine: at most 8 minutes on one H100
#   scripts/gpu_check.sh --smoke              # CPU, tiny shapes: every stage's plumbing (CI)
#   scripts/gpu_check.sh --stages e2e --limit e2e=300   # rerun some stages with more time
#   scripts/gpu_check.sh --help               # every option
#
# Results go to $OUT/gpu_check when $OUT is set, else runs/gpu_check (or --out DIR).
# The interpreter: $PYTHON, else the checkout's .venv, else python3. Nothing is
# installed into it: scripts/gpu_check.py makes the checkout importable itself.
# Exit status 0 only if every stage that ran passed. See README.md, "GPU check".
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/python.sh  # sets $python
export PYTHONUNBUFFERED=1
exec "$python" scripts/gpu_check.py "$@"
