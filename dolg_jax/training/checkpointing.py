"""Orbax checkpoints: train state + per-process input-iterator state, async, keep-N, resume.

Layout: `WORKDIR/checkpoints/<step>/state` (the TrainState pytree, sharded arrays) and
`WORKDIR/checkpoints/<step>/data_iter/process_<i>-of-<n>.json` (each process's grain iterator state,
captured when the save is requested, so it matches the model state of that step exactly).

`load_variables(path)` gives `{'params', 'batch_stats'}` of the DOLG model for evaluation; it reads
any checkpoint written here without needing the config or the same device count.
"""

import dataclasses
import json
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = 'checkpoints'
STATE = 'state'
DATA_ITER = 'data_iter'


class IteratorStateHandler(ocp.CheckpointHandler):
  """Saves one JSON-serialisable iterator state per process (synchronously, at request time)."""

  def save(self, directory: epath.Path, args: 'IteratorStateSave'):
    name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    (directory / name).write_text(json.dumps(args.state, indent=1, sort_keys=True))

  def restore(self, directory: epath.Path, args: Optional['IteratorStateRestore'] = None) -> Any:
    path = directory / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
    if not path.exists():
      raise FileNotFoundError(
          f'{path} is missing: the checkpoint was written by a different number of processes '
          f'({sorted(p.name for p in directory.iterdir())}); resume with the same process count.')
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> Any:
    return None

  def structure(self, directory: epath.Path) -> Any:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / CHECKPOINT_DIR


def make_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """A CheckpointManager for `workdir`; every save is requested explicitly by the loop."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir).resolve(), options=options,
                               item_names=(STATE, DATA_ITER))


def save(manager: ocp.CheckpointManager, step: int, state: Any, iterator_state: Any) -> None:
  """Requests an (async) save of `state` and the already-captured `iterator_state` at `step`."""
  manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA_ITER: IteratorStateSave(iterator_state)}), force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> tuple[Any, Any]:
  """Restores (state, iterator_state) of `step` into the shardings of `abstract_state`."""
  out = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(abstract_state),
      DATA_ITER: IteratorStateRestore()}))
  return out[STATE], out[DATA_ITER]


def _resolve_state_dir(path: str) -> epath.Path:
  """Workdir, checkpoints dir, step dir or state dir -> the `state` item directory."""
  p = epath.Path(path)
  if (p / STATE).is_dir():
    return p / STATE
  if p.name == STATE and p.is_dir():
    return p
  for root in (p / CHECKPOINT_DIR, p):
    if root.is_dir():
      steps = sorted(int(c.name) for c in root.iterdir()
                     if c.name.isdigit() and (c / STATE).is_dir())
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
