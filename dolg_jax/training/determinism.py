"""GPU determinism switch (`config.train.deterministic`).

On GPUs some XLA kernels (scatter-add, some reductions, autotuned convolution algorithms) may
differ bit-wise from run to run. `--xla_gpu_deterministic_ops=true` picks deterministic
implementations and disables non-deterministic autotuning choices. Cost: the backward pass of
convolutions and the reductions may be slower; expect roughly 5-30% lower train throughput for
ResNet-style models (not measured here: no GPU was available). Measure it with
`python -m dolg_jax.tools.bench_train --config=configs/r50.py --config.train.deterministic=True` against the
same command without the flag. CPU and TPU runs are deterministic already; the flag changes nothing there.

XLA reads `XLA_FLAGS` when the backend starts: `main.py` applies the switch before any JAX
computation; applying it later only warns.
"""

import os

from absl import logging
from jax._src import xla_bridge

FLAG = '--xla_gpu_deterministic_ops=true'


def apply(deterministic: bool) -> bool:
  """Adds the deterministic-ops flag to XLA_FLAGS when asked; returns whether it is in effect."""
  flags = os.environ.get('XLA_FLAGS', '')
  if not deterministic:
    return FLAG in flags
  if FLAG in flags:
    return True
  if _backend_started():
    logging.warning('config.train.deterministic=True but the JAX backend is already running; '
                    'set XLA_FLAGS=%s before starting Python (main.py does this).', FLAG)
    return False
  os.environ['XLA_FLAGS'] = (flags + ' ' + FLAG).strip()
  return True


def _backend_started() -> bool:
  return bool(getattr(xla_bridge, '_backends', None))
