#!/usr/bin/env bash
# Cloud TPU pod slice: the same command on every worker; `jax.distributed.initialize()` detects the
# slice from the TPU metadata, so no coordinator flags are needed.
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   e.g. launch/tpu_pod.sh my-v5e us-central1-a configs/r101.py gs://bucket/workdir/r101 \
#          --config.data.data_dir=gs://bucket/tensorflow_datasets
#
# Arguments:
#   TPU_NAME, ZONE  the TPU VM (`gcloud compute tpus tpu-vm ssh TPU_NAME --zone=ZONE --worker=all`).
#   CONFIG          a config file relative to REPO_DIR on the workers, or a shipped config by name
#                   (dolg_jax:r101).
#   WORKDIR         on storage every worker can reach (GCS); rerunning resumes.
#   --config.x=y    further flags, passed to every worker.
#   -h, --help      this text.
# Environment: REPO_DIR (default ~/dolg_jax), where the repository is checked out on every worker.
#
# On maintenance events the workers get SIGTERM: the run saves a checkpoint and exits with code 75
# (preempted; rerun the same command to resume).
usage() { awk 'NR > 1 && /^#( |$)/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; }
for arg in "$@"; do [[ $arg == -h || $arg == --help ]] && usage; done
set -euo pipefail
TPU=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
REPO_DIR=${REPO_DIR:-~/dolg_jax}

gcloud compute tpus tpu-vm ssh "${TPU}" --zone="${ZONE}" --worker=all --command="
  cd ${REPO_DIR} && \
  python -m dolg_jax.main --config='${CONFIG}' --workdir='${WORKDIR}' --distributed=on $*"
