#!/usr/bin/env bash
# Builds .gpu_bundle/ (git-ignored) for `bash launch/gpu_demo.sh` on a GPU machine without internet:
#   .gpu_bundle/wheels/                 the packages `pip install -e ".[train]"` needs there and it lacks
#   .gpu_bundle/data/cifar10-jpeg.tar.gz  from ../shared/data (sha256 checked)
# Run it on a machine with internet and this project's [train] environment installed (the wheels are the
# versions installed here, for CPython 3.12 manylinux x86_64). Prints every file and the total size, which
# must stay under 64 MiB (exit 1 otherwise). Flags go to launch/gpu_bundle.py (--present-freeze, --train, --list).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 launch/gpu_bundle.py "$@"
