"""Orbax checkpoints: train state + per-process input-iterator state, async, keep-N, resume.

Layout: `WORKDIR/checkpoints/<step>/state` (the TrainState pytree, sharded arrays) and
`WORKDIR/checkpoints/<step>/data_iter/process_<i>-of-<n>.json` (each process's grain iterator state,
captured when the save is requested, so it matches the model state of that step exactly).

Reading the model variables back for evaluation (and the layout's names) live one layer below, in
dolg_jax.weights.checkpoint.
"""

import dataclasses
import json
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from dolg_jax.weights import checkpoint as layout

CHECKPOINT_DIR = layout.CHECKPOINT_DIR
STATE = layout.STATE
DATA_ITER = layout.DATA_ITER
checkpoint_dir = layout.checkpoint_dir
list_steps = layout.list_steps


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
