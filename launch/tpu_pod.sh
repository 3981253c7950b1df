#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; `jax.distributed.initialize()` detects the
# slice from the TPU metadata, so no coordinator flags are needed.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/r101.py gs://bucket/workdir/r101 \
#       --config.data.data_dir=gs://bucket/tensorflow_datasets
#
# The workdir must be on storage every worker can reach (GCS). Rerunning resumes. On maintenance
# events the workers get SIGTERM: the run saves a checkpoint and exits with code 75 (preempted;
# rerun the same command to resume).
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
REPO_DIR=${REPO_DIR:-~/dolg_jax}   # Where the repository is checked out on every worker.

gcloud compute tpus tpu-vm ssh "${TPU}" --zone="${ZONE}" --worker=all --command="
  cd ${REPO_DIR} && \
  python -m dolg_jax.main --config='${CONFIG}' --workdir='${WORKDIR}' --distributed=on $*"
