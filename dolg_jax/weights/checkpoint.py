"""Model variables of our own orbax training checkpoints, for evaluation and export.

Layout (written by dolg_jax.training.checkpointing): `WORKDIR/checkpoints/<step>/state` (the
TrainState pytree) and `WORKDIR/checkpoints/<step>/data_iter/` (per-process iterator states).

`list_steps(directory)` is the one scan for saved steps; `load_variables(path)` gives
`{'params', 'batch_stats'}` of the DOLG model from any checkpoint written there, without needing the
config or the same device count.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = 'checkpoints'
STATE = 'state'
DATA_ITER = 'data_iter'


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """WORKDIR/checkpoints."""
  return epath.Path(workdir) / CHECKPOINT_DIR


def list_steps(directory: str | os.PathLike, *, item: str = '') -> list[int]:
  """Sorted steps saved in `directory` (a checkpoints dir); with `item`, only steps holding it."""
  root = epath.Path(directory)
  if not root.is_dir():
    return []
  return sorted(int(c.name) for c in root.iterdir()
                if c.name.isdigit() and (not item or (c / item).is_dir()))


def _resolve_state_dir(path: str) -> epath.Path:
  """Workdir, checkpoints dir, step dir or state dir -> the `state` item directory."""
  p = epath.Path(path)
  if (p / STATE).is_dir():
    return p / STATE
  if p.name == STATE and p.is_dir():
    return p
  for root in (p / CHECKPOINT_DIR, p):
    steps = list_steps(root, item=STATE)
    if steps:
      return root / str(steps[-1]) / STATE
  raise FileNotFoundError(f'No checkpoint found at {path} (expected a workdir with '
                          f'{CHECKPOINT_DIR}/<step>/{STATE}, or a step directory).')


def _get(tree: Any, key: str) -> Any:
  return tree[key] if isinstance(tree, dict) else getattr(tree, key)


def load_variables(path: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} of the DOLG model (numpy, host memory) from a checkpoint.

  `path`: a workdir (its latest step), `WORKDIR/checkpoints`, or one step directory.
  The margin head is not part of the result (evaluation does not use it).
  """
  state_dir = _resolve_state_dir(path)
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(state_dir)
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  restored = ocp.PyTreeCheckpointer().restore(
      state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return {'params': _get(_get(restored, 'params'), 'model'),
          'batch_stats': _get(restored, 'batch_stats')}
