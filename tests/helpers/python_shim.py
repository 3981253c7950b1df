"""A `python` for launch scripts under test: `python -m dolg_jax.main ARGS` runs dolg_jax.main
under the training tests' wrapper (train_testlib.WRAPPER: DOLG_TEST_SLOW_AFTER=k sleeps 0.5 s before
each batch after the k-th, a window for signals) with the tests' interpreter; any other command
runs that interpreter unchanged.

The launch scripts (launch/slurm_gpu.sbatch, launch/local_multiprocess.sh) run `python` from PATH
(or $PYTHON): `write(directory, wrapper)` puts the shim there; put `directory` first on the job's
PATH. The scripts themselves run unmodified.
"""

import os
import stat
import sys

_SHIM = '''#!/bin/sh
# Written by tests/helpers/python_shim.py.
if [ "$1" = "-m" ] && [ "$2" = "dolg_jax.main" ]; then
  shift 2
  exec {python} "$(dirname "$0")/wrapped_main.py" "$@"
fi
exec {python} "$@"
'''


def write(directory: str, wrapper: str) -> str:
  """Writes `directory`/python (the shim) and `directory`/wrapped_main.py (`wrapper`, Python source
  that runs dolg_jax.main); returns the shim's path."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'wrapped_main.py'), 'w') as f:
    f.write(wrapper)
  shim = os.path.join(directory, 'python')
  with open(shim, 'w') as f:
    f.write(_SHIM.format(python=sys.executable))
  os.chmod(shim, os.stat(shim).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return shim
