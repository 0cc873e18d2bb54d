#!/usr/bin/env bash
# Run one experiment on a single machine with one or more GPUs: one process drives every local GPU;
# the batch is sharded over them and norm statistics are those of the global batch.
#
# Variables:
#   CONFIG    config file (default configs/cifar10_vgg16_rni.py)
#   WORKDIR   output directory (default runs/<config name>)
#   GPUS      which GPUs to use, as CUDA_VISIBLE_DEVICES (default: all)
#   EXTRA     more flags, e.g. "--config.optim.batch_size=256"
# Install once with: pip install -e '.[train]' 'jax[cuda13]'
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-configs/cifar10_vgg16_rni.py}
WORKDIR=${WORKDIR:-runs/$(basename "$CONFIG" .py)}
[ -n "${GPUS:-}" ] && export CUDA_VISIBLE_DEVICES=$GPUS
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
exec python -m receding_jax.main --config="$CONFIG" --workdir="$WORKDIR" ${EXTRA:-}
