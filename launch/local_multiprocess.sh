#!/usr/bin/env bash
# N JAX processes on this machine (testing multi-host code paths without a cluster).
# Each process gets ONE device: on CPU that is the default; on a multi-GPU box each process sees
# one GPU through CUDA_VISIBLE_DEVICES. Processes talk through a coordinator on 127.0.0.1 (CPU
# collectives via gloo).
#
#   launch/local_multiprocess.sh 2 configs/tiny.py /tmp/tiny_2proc [--config.x=y ...]
set -euo pipefail
N=${1:?usage: launch/local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [--config.x=y ...]}
CONFIG=${2:?config}
WORKDIR=${3:?workdir}
shift 3
PORT=${PORT:-$((20000 + RANDOM % 20000))}
cd "$(dirname "$0")/.."

NUM_GPUS=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 0)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM
for ((i = 0; i < N; i++)); do
  if [[ "$NUM_GPUS" -gt 0 ]]; then export CUDA_VISIBLE_DEVICES=$((i % NUM_GPUS)); fi
  python -m dolg_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:${PORT}" --num_processes="$N" --process_id="$i" "$@" \
    > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
