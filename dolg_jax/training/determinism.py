"""GPU determinism switch (`config.train.deterministic`).

`apply(deterministic, at_entry=)` adds `--xla_gpu_deterministic_ops=true` to XLA_FLAGS: on GPUs,
deterministic kernels and autotuning choices, at some cost in speed; CPU and TPU runs are
deterministic already. XLA reads XLA_FLAGS when its backend starts, so the commands apply it at
entry (`at_entry=True`: main.py, tools/bench_train.py); a later call still adds the flag but warns
that a backend already started does not see it. Design notes: docs/design_notes.md.
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
