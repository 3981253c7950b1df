#!/usr/bin/env bash
# N JAX processes on this machine (testing multi-host code paths without a cluster).
#
# Usage: launch/local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [--config.x=y ...]
#   e.g. launch/local_multiprocess.sh 2 configs/tiny.py /tmp/tiny_2proc
#
# Arguments:
#   NUM_PROCESSES  processes to start, each `python -m dolg_jax.main` with ONE device: on CPU that
#                  is the default; on a multi-GPU box each sees one GPU (CUDA_VISIBLE_DEVICES).
#   CONFIG         a config file (relative to the working directory or to the repository) or a
#                  shipped config by name (dolg_jax:tiny).
#   WORKDIR        the run's workdir (relative to the working directory); rerunning resumes.
#   --config.x=y   further flags, passed to every process.
#   -h, --help     this text.
# Environment: PYTHON (default python), PORT (the coordinator's, on 127.0.0.1; default random).
#
# Processes talk through a coordinator on 127.0.0.1 (CPU collectives via gloo). SIGTERM / SIGINT
# sent to this script are forwarded to every process, and the script waits until all of them have
# exited. Exit code: the first failing process's code (not 0 and not 75); else 75 when a process
# was preempted (checkpoint saved; rerun to resume); else 0.
usage() { awk 'NR > 1 && /^#( |$)/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; }
for arg in "$@"; do [[ $arg == -h || $arg == --help ]] && usage; done
set -uo pipefail
N=${1:?usage: launch/local_multiprocess.sh NUM_PROCESSES CONFIG WORKDIR [--config.x=y ...]}
CONFIG=${2:?config}
WORKDIR=${3:?workdir}
shift 3
# Paths the user gave are relative to the working directory, not to the repository.
if [[ -f ${CONFIG%%:*} ]]; then CONFIG=$(realpath "${CONFIG%%:*}")${CONFIG#"${CONFIG%%:*}"}; fi
WORKDIR=$(realpath -m "$WORKDIR")
PORT=${PORT:-$((20000 + RANDOM % 20000))}
PYTHON=${PYTHON:-python}
EXIT_PREEMPTED=75   # dolg_jax.training.failures.EXIT_PREEMPTED
cd "$(dirname "$0")/.."

NUM_GPUS=$(command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l || echo 0)
pids=()
forward() { for pid in "${pids[@]}"; do kill -"$1" "$pid" 2>/dev/null || true; done; }
trap 'forward TERM' TERM
trap 'forward INT' INT
for ((i = 0; i < N; i++)); do
  if [[ "$NUM_GPUS" -gt 0 ]]; then export CUDA_VISIBLE_DEVICES=$((i % NUM_GPUS)); fi
  "$PYTHON" -m dolg_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --coordinator_address="127.0.0.1:${PORT}" --num_processes="$N" --process_id="$i" "$@" \
    > >(sed "s/^/[p$i] /") 2>&1 &
  pids+=($!)
done

rc=0
preempted=0
for pid in "${pids[@]}"; do
  # A trapped signal interrupts `wait`; wait again until this process has really exited, then
  # read its status (bash keeps it for the reaped child).
  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done
  wait "$pid"
  status=$?
  if [[ $status -eq $EXIT_PREEMPTED ]]; then
    preempted=1
  elif [[ $status -ne 0 && $rc -eq 0 ]]; then
    rc=$status
  fi
done
wait   # the output filters
if [[ $rc -ne 0 ]]; then exit "$rc"; fi
if [[ $preempted -eq 1 ]]; then exit "$EXIT_PREEMPTED"; fi
exit 0
