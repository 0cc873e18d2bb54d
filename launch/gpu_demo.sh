#!/usr/bin/env bash
# The GPU demonstration in one command (docs/gpu_demo.md): offline install from .gpu_bundle/wheels, CIFAR-10
# from .gpu_bundle/data, the throughput benchmark, VGG-16 rni vs l1 vs ucs on the longest schedule that fits
# the time budget, and the comparison, all written to OUTPUT_DIR.
#   bash launch/gpu_demo.sh OUTPUT_DIR [--tiny] [--parts install,data,bench,demo,compare] [--epochs N] ...
# --tiny rehearses it on a CPU in a few minutes. PYTHON picks the interpreter (default: python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-$(command -v python || command -v python3)}" launch/gpu_demo.py "$@"
