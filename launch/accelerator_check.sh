#!/usr/bin/env bash
# One prepared accelerator run on a machine with one NVIDIA GPU; writes ONE JSON file.
#
# Usage: launch/accelerator_check.sh [--smoke] [OUT_DIR]
#
# Arguments:
#   OUT_DIR     where the results go (default ./accelerator_check, relative to the working
#               directory): OUT_DIR/accelerator_check.json and OUT_DIR/torch_reference.json.
#   --smoke     every part at tiny sizes on CPU, nothing installed (tests).
#   -h, --help  this text (nothing installed, nothing run).
# Environment: PYTHON (default python3), BUDGET_S (default 480: the measurements' seconds in all,
#   split between the two steps), TORCH_BUDGET_S (default 120); offline, PIP_FIND_LINKS (a
#   wheelhouse) and PIP_NO_INDEX=1 for step 1.
#
# 1. Installs the CUDA build of the pinned JAX (jax[cuda12]==<requirements.txt's jax>) unless
#    JAX already sees a GPU.
# 2. launch/torch_reference_bench.py (own process, first, so the frameworks' GPU allocators do not
#    compete): the official PyTorch model's forward + backward + SGD step at 512 px, AMP bf16,
#    channels_last -> OUT_DIR/torch_reference.json.
# 3. python -m dolg_jax.tools.accelerator_check: our train step (R50, R101, per-device batch 32
#    and 64, 81,313 classes, bf16, 512 px), extraction at 1024 px over 3 scales and the input
#    pipeline on this host's cores, with the PyTorch figures merged in and the JAX/PyTorch ratio
#    -> OUT_DIR/accelerator_check.json (rewritten after every measurement).
usage() { awk 'NR > 1 && /^#( |$)/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0; }
for arg in "$@"; do [[ $arg == -h || $arg == --help ]] && usage; done
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
OUT=$(realpath -m "${1:-accelerator_check}")   # relative to the working directory
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-480}
TORCH_BUDGET_S=${TORCH_BUDGET_S:-120}
mkdir -p "$OUT"

if (( SMOKE )); then
  export JAX_PLATFORMS=cpu
  TORCH_ARGS=(--smoke)
  JAX_ARGS=(--smoke --config=configs/tiny.py)
else
  nvidia-smi -L || echo "WARNING: nvidia-smi failed: is there an NVIDIA GPU and driver?" >&2
  JAX_VERSION=$(sed -n 's/^jax==//p' requirements.txt)
  if ! "$PY" -c "import jax, sys; sys.exit(0 if jax.__version__ == '$JAX_VERSION' and jax.devices()[0].platform == 'gpu' else 1)" 2>/dev/null; then
    echo "Installing jax[cuda12]==$JAX_VERSION ..."
    "$PY" -m pip install -q -r requirements.txt "jax[cuda12]==$JAX_VERSION" || {
      echo "ERROR: pip could not install jax[cuda12]==$JAX_VERSION (offline? set PIP_FIND_LINKS to a wheelhouse and PIP_NO_INDEX=1)" >&2
      exit 1
    }
  fi
  "$PY" -c "import jax; print('JAX', jax.__version__, jax.devices())"
  TORCH_ARGS=()
  JAX_ARGS=(--config=configs/default.py)
  # The PyTorch process has exited: JAX may take most of the GPU (default 75%).
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
  # Reruns reuse compiled programs.
  export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/dolg_jax/xla}
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

START=$(date +%s)
"$PY" launch/torch_reference_bench.py --output="$OUT/torch_reference.json" \
  --budget_s="$TORCH_BUDGET_S" "${TORCH_ARGS[@]}" \
  || echo "WARNING: the PyTorch part failed (see above); the JAX part runs without it." >&2
LEFT=$(( BUDGET_S - ($(date +%s) - START) ))
(( LEFT < 60 )) && LEFT=60
"$PY" -m dolg_jax.tools.accelerator_check --output="$OUT/accelerator_check.json" \
  --torch_result="$OUT/torch_reference.json" --budget_s="$LEFT" "${JAX_ARGS[@]}"
RC=$?
echo "accelerator check: $OUT/accelerator_check.json (rc=$RC, $(( $(date +%s) - START )) s)"
exit $RC
