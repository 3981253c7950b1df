"""GPU determinism switch (`config.train.deterministic`).

On GPUs some XLA kernels (scatter-add, some reductions, autotuned convolution algorithms) may
differ bit-wise from run to run. `--xla_gpu_deterministic_ops=true` picks deterministic
implementations and disables non-deterministic autotuning choices. Cost: the backward pass of
convolutions and the reductions may be slower; expect roughly 5-30% lower train throughput for
ResNet-style models (not measured here: no GPU was available). Measure it with
`python -m dolg_jax.tools.bench_train --config=configs/r50.py --config.train.deterministic=True`
against the same command without the flag. CPU and TPU runs are deterministic already; the flag
changes nothing there.

XLA reads `XLA_FLAGS` when the backend starts: `main.py` (and `tools/bench_train.py`) apply the
switch at entry, before any JAX computation (`apply(..., at_entry=True)`). A later call (the
training loop used as a library) still adds the flag but warns that it takes effect only if the
backend has not started yet: JAX has no public API that tells whether it has.
"""

import os

from absl import logging

FLAG = '--xla_gpu_deterministic_ops=true'


def apply(deterministic: bool, *, at_entry: bool = False) -> bool:
  """Adds the deterministic-ops flag to XLA_FLAGS when asked; returns whether XLA_FLAGS has it.

  `at_entry`: the caller runs before any JAX computation (the commands' main). Otherwise adding
  the flag warns that a backend started earlier in this process does not see it.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if not deterministic or FLAG in flags:
    return FLAG in flags
  os.environ['XLA_FLAGS'] = (flags + ' ' + FLAG).strip()
  if not at_entry:
    logging.warning(
      'config.train.deterministic=True: added %s to XLA_FLAGS now; if the JAX '
      'backend has already started in this process it does not apply (set it '
      'before starting Python, as python -m dolg_jax.main does).',
      FLAG,
    )
  return True
