"""Model variables of our own orbax training checkpoints, for evaluation and export.

Layout (written by dolg_jax.training.checkpointing): `WORKDIR/checkpoints/<step>/state` (the
TrainState pytree), `<step>/data_iter/` (per-process iterator states) and `<step>/record/` (the run
record: array digests, config). `list_steps(directory)` is the one scan for saved steps;
`load_variables(path)` gives `{'params', 'batch_stats'}` of the DOLG model from any such step,
without the config or the same device count, verified against the record's digests;
`load_state(path)` adds the margin head and the config. A damaged or unverifiable step raises
`CheckpointCorruptError` naming it; a path without a checkpoint, FileNotFoundError.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from dolg_jax import checksums
from dolg_jax import errors

CHECKPOINT_DIR = 'checkpoints'
STATE = 'state'
DATA_ITER = 'data_iter'
RECORD = 'record'  # per-process run record: array digests, iterator-state sha256, config
RECORD_FORMAT = 1


class CheckpointCorruptError(RuntimeError):
  """A saved step does not match its record, or cannot be read."""

  def __init__(self, path: str, reason: str, detail: str):
    super().__init__(f'{path}: {detail}')
    self.path, self.reason, self.detail = path, reason, detail


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
  """WORKDIR/checkpoints."""
  return epath.Path(workdir) / CHECKPOINT_DIR


def list_steps(directory: str | os.PathLike, *, item: str = '') -> list[int]:
  """Sorted steps saved in `directory` (a checkpoints dir); with `item`, only steps holding it."""
  root = epath.Path(directory)
  if not root.is_dir():
    return []
  return sorted(
    int(c.name) for c in root.iterdir() if c.name.isdigit() and (not item or (c / item).is_dir())
  )


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
  raise FileNotFoundError(
    f'No checkpoint found at {path} (expected a workdir with '
    f'{CHECKPOINT_DIR}/<step>/{STATE}, or a step directory).'
  )


def _get(tree: Any, key: str) -> Any:
  return tree[key] if isinstance(tree, dict) else getattr(tree, key)


def load_variables(path: str) -> dict[str, Any]:
  """{'params', 'batch_stats'} of the DOLG model (numpy, host memory) from a checkpoint.

  `path`: a workdir (its latest step), `WORKDIR/checkpoints`, a step or its state directory.
  The margin head is not part of the result (evaluation does not use it).
  """
  return load_state(path)[0]


def load_state(path: str) -> tuple[dict[str, Any], dict[str, Any], dict]:
  """(model variables as `load_variables`, the margin head {'weight' (padded rows), 't'}, the run
  record's config) of a checkpoint; the model arrays are verified against the step's record."""
  state_dir = _resolve_state_dir(path)
  restored = _restore_host(state_dir)
  out = {
    'params': _get(_get(restored, 'params'), 'model'),
    'batch_stats': _get(restored, 'batch_stats'),
  }
  head = {
    'weight': _get(_get(_get(restored, 'params'), 'head'), 'weight'),
    't': np.asarray(_get(restored, 'head_t')),
  }
  config = _verify_host_variables(state_dir.parent, {**out, 'head': head})
  return out, head, config


def resolve_step_dir(path: str) -> epath.Path:
  """The step directory `path` (workdir, checkpoints dir, step or state dir) stands for."""
  return _resolve_state_dir(path).parent


def _restore_host(state_dir: epath.Path) -> Any:
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(state_dir)
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(
    state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args)
  )


def _verify_host_variables(step_dir: epath.Path, variables: dict[str, Any]) -> dict:
  """Checks the host arrays (params, batch stats, the head if given) against the step's record;
  returns the record's config."""
  files = sorted((step_dir / RECORD).glob('process_*.json')) if (step_dir / RECORD).is_dir() else []
  if not files:
    raise CheckpointCorruptError(
      os.fspath(step_dir),
      'no-record',
      f'{step_dir} has no {RECORD}/ (digests), so its contents cannot '
      'be verified; evaluate a step written by this version',
    )
  try:
    record = json.loads(files[0].read_text())
    saved = record['state_digests']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointCorruptError(
      os.fspath(files[0]),
      'unreadable-record',
      f'cannot read the run record: {errors.first_line(e)}',
    ) from e
  prefixes = {'params': ".params['model']", 'batch_stats': '.batch_stats'}
  bad = []
  for name, tree in variables.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      if name == 'head':  # {'weight', 't'}: the state's params['head']['weight'] and head_t
        key = ".params['head']['weight']" if path[0].key == 'weight' else '.head_t'
      else:
        key = prefixes[name] + jax.tree_util.keystr(path)
      if saved.get(key) != checksums.numpy_digest(np.asarray(leaf)):
        bad.append(key)
  if bad:
    raise CheckpointCorruptError(
      os.fspath(step_dir / STATE),
      'checksum',
      f'{len(bad)} model arrays differ from the digests written at save (first: '
      f'{", ".join(bad[:3])}); the checkpoint is damaged: evaluate another step '
      f'({step_dir.parent}/<step>)',
    )
  return record.get('config') or {}
