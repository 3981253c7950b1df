"""Orbax checkpoints: train state + per-process input-iterator state + run record, verified resume.

`make_manager(workdir, keep=, async_save=)`, `make_record` and `save` / `finish` (async, the newest
`keep` steps kept; CheckpointWriteError names the step whose write failed) write
WORKDIR/checkpoints/<step>/{state, data_iter, record}. `restore_verified` restores the newest step
that matches its record; a step that does not is renamed to `<step>.corrupt-<reason>` and the next
older one is tried (NoValidCheckpointError when none verifies; IncompatibleCheckpointError when a
readable state does not fit the configured model). Layout, the record, and why iterator states go
through `IteratorStateHandler` rather than grain's handler: docs/checkpointing.md. Reading model
variables back for evaluation: dolg_jax.weights.checkpoint.
"""

import dataclasses
import errno
import hashlib
import json
import os
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from dolg_jax import checksums
from dolg_jax import config_rules as rules
from dolg_jax import errors
from dolg_jax.training import failures

from dolg_jax.weights import checkpoint as layout

CHECKPOINT_DIR = layout.CHECKPOINT_DIR
STATE = layout.STATE
DATA_ITER = layout.DATA_ITER
RECORD = layout.RECORD
RECORD_FORMAT = layout.RECORD_FORMAT
checkpoint_dir = layout.checkpoint_dir
list_steps = layout.list_steps
CheckpointCorruptError = layout.CheckpointCorruptError


class NoValidCheckpointError(RuntimeError):
  """The workdir holds checkpoints, but none verifies."""


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint whose state does not fit the configured model (not corruption)."""


class CheckpointWriteError(OSError):
  """Writing a checkpoint failed (e.g. no space left on the device)."""


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
        f'({sorted(p.name for p in directory.iterdir())}); resume with the same process count.'
      )
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> Any:
    return None

  def structure(self, directory: epath.Path) -> Any:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


class RunRecordHandler(IteratorStateHandler):
  """The per-process run record (digests, iterator-state sha256, config) of a step."""


@ocp.args.register_with_handler(RunRecordHandler, for_save=True)
@dataclasses.dataclass
class RunRecordSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(RunRecordHandler, for_restore=True)
@dataclasses.dataclass
class RunRecordRestore(ocp.args.CheckpointArgs):
  pass


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


CONFIG_RULES = {
  'train.checkpoint_every_steps': rules.POSITIVE_INT,
  'train.keep_checkpoints': rules.POSITIVE_INT,
  'train.async_checkpointing': rules.BOOL,
}


@dataclasses.dataclass
class Manager:
  """The checkpoints of a workdir: orbax's CheckpointManager and the step of the async save
  requested last (`pending_step`, None before any), which a failure reported later is about."""

  orbax: ocp.CheckpointManager
  pending_step: Optional[int] = None

  @property
  def directory(self) -> epath.Path:
    return self.orbax.directory

  def close(self) -> None:
    self.orbax.close()


def make_manager(workdir: str, *, keep: int, async_save: bool = True) -> Manager:
  """The Manager of `workdir`'s checkpoints; every save is requested explicitly by the loop."""
  # keep < 1: orbax would delete every step, the newest included.
  rules.check_value('train.keep_checkpoints', keep, CONFIG_RULES['train.keep_checkpoints'])
  options = ocp.CheckpointManagerOptions(
    max_to_keep=keep,
    create=True,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
  )
  return Manager(
    ocp.CheckpointManager(
      checkpoint_dir(workdir).resolve(), options=options, item_names=(STATE, DATA_ITER, RECORD)
    )
  )


def _json_sha256(obj: Any) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def make_record(step: int, state: Any, iterator_state: Any, mesh, config_json: Any) -> dict:
  """This process's run record of `step` (collective: digests are computed on the global state)."""
  return {
    'format': RECORD_FORMAT,
    'step': int(step),
    'state_digests': checksums.tree_digests(state, mesh),
    'state_shapes': _shapes(state),
    'data_iter_sha256': _json_sha256(iterator_state),
    'config': config_json,
  }


def save(manager: Manager, step: int, state: Any, iterator_state: Any, record: dict) -> None:
  """Requests an (async) save of `state`, the already-captured `iterator_state` and `record`.

  Raises CheckpointWriteError naming the step whose write failed: a failure of the previous async
  save surfaces here (orbax reports it at the next request) and is attributed to that step.
  """
  finish(manager)
  try:
    manager.orbax.save(
      step,
      args=ocp.args.Composite(
        **{
          STATE: ocp.args.StandardSave(state),
          DATA_ITER: IteratorStateSave(iterator_state),
          RECORD: RunRecordSave(record),
        }
      ),
      force=True,
    )
  except Exception as e:  # re-raised with the step and path
    raise _write_error(manager, step, e) from e
  manager.pending_step = step


def finish(manager: Manager) -> None:
  """Waits for the pending async save; a failure is a CheckpointWriteError naming its step."""
  try:
    manager.orbax.wait_until_finished()
  except Exception as e:  # re-raised with the step and path
    raise _write_error(manager, manager.pending_step, e) from e


def _write_error(manager: Manager, step: Optional[int], e: BaseException) -> CheckpointWriteError:
  """The error for a failed save of `step`; the save's temporary directory is removed."""
  removed = remove_unfinished(manager.directory)
  detail = 'No space left on device' if failures.is_disk_full(e) else errors.first_line(e)
  peer = jax.process_count() > 1 and any(
    k in detail for k in ('Gloo', 'AllGather', 'collective', 'DEADLINE_EXCEEDED', 'barrier')
  )
  err = CheckpointWriteError(
    f'writing checkpoint step {step} to {manager.directory} failed: {detail}'
    + (' (its unfinished files were removed)' if removed else '')
    + (
      '; the save waits for every process, so another process of this run probably stopped: '
      'see its log'
      if peer
      else ''
    )
  )
  if failures.is_disk_full(e):
    err.errno = errno.ENOSPC
  return err


def remove_unfinished(directory) -> list[str]:
  """Deletes orbax's temporary directories of saves that never completed (process 0 only).
  `directory`: the checkpoints directory."""
  root = epath.Path(directory)
  removed = []
  if jax.process_index() == 0 and root.is_dir():
    for p in root.iterdir():
      if '.orbax-checkpoint-tmp' in p.name:
        p.rmtree(missing_ok=True)
        removed.append(os.fspath(p))
  return removed


def read_record(step_dir: epath.Path) -> dict:
  """This process's run record of a step directory (CheckpointCorruptError if unusable)."""
  path = step_dir / RECORD / f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  if not (step_dir / RECORD).is_dir():
    raise CheckpointCorruptError(
      os.fspath(step_dir),
      'no-record',
      f'no {RECORD}/ (digests) in the step: written before verified checkpoints existed, or '
      'removed',
    )
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise CheckpointCorruptError(
      os.fspath(path), 'unreadable-record', f'cannot read the run record: {errors.first_line(e)}'
    ) from e
  if (
    not isinstance(record, dict)
    or record.get('format') != RECORD_FORMAT
    or not all(isinstance(record.get(k), dict) for k in ('state_digests', 'state_shapes', 'config'))
  ):
    raise CheckpointCorruptError(
      os.fspath(path),
      'unreadable-record',
      f'the run record is not a dolg_jax record of format {RECORD_FORMAT}',
    )
  return record


def _shapes(tree: Any) -> dict[str, list[int]]:
  return {
    jax.tree_util.keystr(p): [int(d) for d in x.shape]
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _check_shapes(step_dir: epath.Path, record: dict, abstract_state: Any) -> None:
  """IncompatibleCheckpointError when the saved leaves' shapes (from the record) differ from the
  model's: a config change, not corruption."""
  saved = record.get('state_shapes')
  if not isinstance(saved, dict):
    raise CheckpointCorruptError(
      os.fspath(step_dir / RECORD), 'unreadable-record', 'the run record lacks the state shapes'
    )
  wanted = _shapes(abstract_state)
  diffs = [
    f'{k}: saved {tuple(saved[k])}, model {tuple(v)}'
    for k, v in wanted.items()
    if k in saved and list(saved[k]) != v
  ]
  diffs += [f'{k}: missing in the checkpoint' for k in wanted if k not in saved]
  diffs += [f'{k}: not in the model' for k in saved if k not in wanted]
  if diffs:
    raise IncompatibleCheckpointError(
      f'{step_dir} does not fit the configured model ({len(diffs)} arrays differ: '
      + '; '.join(diffs[:5])
      + '); resume with the config that wrote it or use a new workdir'
    )


def _restore_local(
  manager: Manager,
  step: int,
  abstract_state: Any,
  check_record: Optional[Callable[[dict], None]] = None,
) -> tuple[Any, Any, dict]:
  """(state, iterator_state, record) of `step`; checks everything but the array digests.

  Raises CheckpointCorruptError (path, reason), IncompatibleCheckpointError (the model differs) or
  what `check_record` raises.
  """
  step_dir = epath.Path(manager.directory) / str(step)
  record = read_record(step_dir)
  if check_record is not None:
    check_record(record)
  _check_shapes(step_dir, record, abstract_state)
  try:
    out = manager.orbax.restore(
      step,
      args=ocp.args.Composite(
        **{STATE: ocp.args.StandardRestore(abstract_state), DATA_ITER: IteratorStateRestore()}
      ),
    )
  except Exception as e:  # classified as corruption
    raise CheckpointCorruptError(
      os.fspath(step_dir), 'unreadable', f'restoring failed: {errors.first_line(e)}'
    ) from e
  state, iter_state = out[STATE], out[DATA_ITER]
  if _json_sha256(iter_state) != record.get('data_iter_sha256'):
    raise CheckpointCorruptError(
      os.fspath(step_dir / DATA_ITER),
      'checksum',
      'the input-pipeline state does not match its sha256',
    )
  return state, iter_state, record


def _verify_digests(step_dir: epath.Path, state: Any, record: dict, mesh) -> None:
  """CheckpointCorruptError when a restored array differs from its digest (collective)."""
  digests = checksums.tree_digests(state, mesh)
  saved = record['state_digests']
  bad = sorted(k for k in set(digests) | set(saved) if digests.get(k) != saved.get(k))
  if bad:
    raise CheckpointCorruptError(
      os.fspath(step_dir / STATE),
      'checksum',
      f'{len(bad)} of {len(saved)} arrays differ from the digests written at save '
      f'(first: {", ".join(bad[:3])})',
    )


def _agree(ok: bool) -> bool:
  """True when `ok` holds on every process."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.array(int(ok), np.int32))))


def move_aside(step_dir: epath.Path, reason: str) -> epath.Path:
  """Renames a bad step directory to `<step>.corrupt-<reason>[-k]` (process 0; all wait)."""
  target = step_dir.parent / f'{step_dir.name}.corrupt-{reason}'
  k = 1
  while target.exists():
    k += 1
    target = step_dir.parent / f'{step_dir.name}.corrupt-{reason}-{k}'
  if jax.process_index() == 0:
    step_dir.rename(target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'dolg_move_aside_{step_dir.name}')
  return target


def restore_verified(
  manager: Manager, abstract_state: Any, mesh, check_record: Optional[Callable[[dict], None]] = None
) -> Optional[tuple[int, Any, Any, dict]]:
  """(step, state, iterator_state, record) of the newest step that verifies; None without steps.

  `check_record(record)` (optional) runs before a step is restored, e.g. to refuse an incompatible
  config; its exceptions propagate. Bad steps are moved aside (`move_aside`); NoValidCheckpointError
  when none verifies, IncompatibleCheckpointError when a readable state does not fit the model.
  """
  steps = sorted(manager.orbax.all_steps(), reverse=True)
  if not steps:
    root = epath.Path(manager.directory)
    corrupt = (
      sorted(p.name for p in root.iterdir() if '.corrupt-' in p.name) if root.is_dir() else []
    )
    if corrupt:  # Never restart from scratch silently over damaged checkpoints.
      raise NoValidCheckpointError(
        f'{root} holds only checkpoints that failed verification ({", ".join(corrupt)}); '
        'move them out of that directory to start this workdir from scratch, or use a new '
        'workdir'
      )
    return None
  bad: list[str] = []
  for step in steps:
    step_dir = epath.Path(manager.directory) / str(step)
    # Two stages, each agreed on by every process before the next: local reads, then the
    # collective digest computation (a process must not enter it alone).
    problem: Optional[CheckpointCorruptError] = None
    result = None
    try:
      result = _restore_local(manager, step, abstract_state, check_record)
    except CheckpointCorruptError as e:
      problem = e
    if _agree(problem is None):
      try:
        _verify_digests(step_dir, result[0], result[2], mesh)
      except CheckpointCorruptError as e:
        problem = e
      if _agree(problem is None):
        if bad:
          print(
            f'Fell back to checkpoint step {step} (the newest that verifies; {len(bad)} '
            'newer step(s) failed verification and were moved aside).',
            flush=True,
          )
        state, iter_state, record = result
        return step, state, iter_state, record
    if problem is None:
      problem = CheckpointCorruptError(
        os.fspath(step_dir), 'other-process', 'failed verification on another process'
      )
    moved = move_aside(step_dir, problem.reason)
    line = f'step {step}: {problem} -> moved to {moved}'
    logging.error('Checkpoint %s', line)
    print(f'Checkpoint {line}', flush=True)
    bad.append(line)
    manager.orbax.reload()
  raise NoValidCheckpointError(
    f'no checkpoint in {manager.directory} verifies ({len(bad)} found, each moved aside: '
    + ' | '.join(bad)
    + '); restore a copy of the workdir or start again in a new workdir'
  )
