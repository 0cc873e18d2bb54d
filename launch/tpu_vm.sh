#!/usr/bin/env bash
# Run one experiment on a Cloud TPU VM: a single host (v4-8, v5e-8, ...) or every worker of a pod slice.
# The same command runs on every worker; jax.distributed.initialize() finds the peers by itself
# (receding_jax.main calls it when TPU_WORKER_HOSTNAMES lists several workers).
#
# Variables:
#   TPU_NAME   the TPU VM's name (required)
#   ZONE       its zone (required)
#   CONFIG     config file, relative to the repo (default configs/cifar10_vgg16_rni.py)
#   WORKDIR    a gs:// bucket path or a path on a shared disk: every worker must see it (required for pods)
#   REPO_URL   where the workers clone this repository from (required)
#   DATA_DIR   tfds data_dir with prepared datasets, e.g. gs://bucket/tensorflow_datasets (optional)
#   EXTRA      more flags, e.g. "--config.optim.batch_size=1024"
#   EXTRAS     pip extras (default train,gcs for gs:// workdirs)
#
# Example: TPU_NAME=rj ZONE=us-central2-b REPO_URL=https://example.org/receding-jax.git \
#          WORKDIR=gs://my-bucket/runs/vgg-rni bash launch/tpu_vm.sh
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${WORKDIR:?set WORKDIR}" "${REPO_URL:?set REPO_URL}"
CONFIG=${CONFIG:-configs/cifar10_vgg16_rni.py}
EXTRAS=${EXTRAS:-train,gcs}
DATA_FLAG=${DATA_DIR:+--config.dataset.data_dir=$DATA_DIR}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d receding-jax ] || git clone -q $REPO_URL receding-jax
  cd receding-jax && git pull -q
  pip install -q -e '.[$EXTRAS]' 'jax[tpu]'
  python -m receding_jax.main --config=$CONFIG --workdir=$WORKDIR $DATA_FLAG ${EXTRA:-}
"
