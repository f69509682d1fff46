#!/usr/bin/env bash
# Download the public AttnRes kernels that benchmarks/bench_read.py times into .gpu_wheels/
# (ignored by git), on a machine with network, before a GPU check:
#
#   scripts/fetch_anchor_wheels.sh
#
# The exact versions of shared/anchors.md, each a small pure-Python py3-none-any wheel
# (about 2 MB together), without their dependencies (torch, triton and einops are
# already on the GPU machine). attn-res (plain PyTorch einsum helpers) is left out:
# bench_read.py's reference row is that computation. Wheels for Python 3.12, the GPU
# machine's. scripts/gpu_check.py installs whatever is there with
# `pip install --no-deps --no-index` into a scratch folder; the folder must travel
# with the checkout (name .gpu_wheels in the device run's carry).
# Exit status 1 if any wheel could not be fetched (the others are kept).
set -euo pipefail
cd "$(dirname "$0")/.."

ANCHORS=(
    fla-core==0.6.0
    liger-kernel==0.8.5
    fast-attnres==2.1.0
    flash-attn-res==0.1.12
)

source scripts/python.sh  # sets $python

mkdir -p .gpu_wheels
status=0
for spec in "${ANCHORS[@]}"; do
    if ! "$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
            --python-version 3.12 --dest .gpu_wheels "$spec"; then
        echo "fetch_anchor_wheels.sh: could not download $spec" >&2
        status=1
    fi
done
ls -l .gpu_wheels
exit "$status"
