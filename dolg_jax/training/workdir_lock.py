"""One run per workdir: a POSIX record lock (fcntl) on `WORKDIR/run.lock`, held by process 0.

`acquire(workdir)` (the training loop, right after the config check) takes an exclusive
non-blocking `fcntl.lockf` lock and writes the holder (JSON: host, pid, start_time, argv) into the
file. A run that finds it taken raises `WorkdirBusyError` naming the holder on every process (the
outcome is broadcast), having written nothing. The kernel drops the lock when the holder ends in
any way (`kill -9` included), so no lock is stale; `release(workdir)` ends it earlier; `holder`
reads the record. A filesystem that refuses locks (ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL) gives a
warning and no lock. NFS and Lustre: docs/multihost.md. Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys

from absl import logging
import jax
import numpy as np
from jax.experimental import multihost_utils

LOCK_FILE = 'run.lock'
_MESSAGE_BYTES = 1024
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_held: dict[str, int] = {}  # realpath of the workdir -> fd of its lock file (kept open)


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir (the message names it)."""


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def holder(workdir: str) -> dict | None:
  """The holder recorded in the lock file (the last one, if the lock is free); None if none."""
  try:
    with open(lock_path(workdir)) as f:
      return json.loads(f.read() or 'null')
  except (OSError, ValueError):
    return None


def _describe(workdir: str, info: dict | None) -> str:
  who = (
    'a run that has not recorded itself yet'
    if not info
    else f"host {info.get('host')} pid {info.get('pid')} (started {info.get('start_time')})"
  )
  return (
    f'workdir {workdir} is in use by {who}: one run per workdir (lock {lock_path(workdir)}). '
    'Wait for that run to end or stop it, or choose another --workdir; nothing was written.'
  )


def _try_lock(workdir: str) -> str | None:
  """Takes the lock in this process; returns None on success, else the refusal line."""
  key = os.path.realpath(workdir)
  if key in _held:
    return None
  path = lock_path(workdir)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    os.close(fd)
    if e.errno in (errno.EAGAIN, errno.EACCES):
      return _describe(workdir, holder(workdir))
    if e.errno in _UNSUPPORTED:
      logging.warning(
        'The filesystem of %s refuses file locks (%s): running without the '
        'one-run-per-workdir lock; make sure no other run uses this workdir.',
        workdir,
        os.strerror(e.errno),
      )
      return None
    raise
  info = {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'start_time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    'argv': sys.argv,
  }
  data = json.dumps(info).encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)
  _held[key] = fd  # Never closed here: closing any descriptor of the file drops a POSIX lock.
  return None


def acquire(workdir: str) -> None:
  """Process 0 locks `workdir` (created beforehand); every process raises WorkdirBusyError with
  the holder's line when the workdir is in use."""
  refusal = _try_lock(workdir) if jax.process_index() == 0 else None
  if jax.process_count() > 1:
    buf = np.zeros(_MESSAGE_BYTES, np.uint8)
    if refusal:
      raw = refusal.encode()[:_MESSAGE_BYTES]
      buf[: len(raw)] = np.frombuffer(raw, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    refusal = bytes(buf).rstrip(b'\0').decode(errors='replace') or None
  if refusal:
    raise WorkdirBusyError(refusal)


def release(workdir: str) -> None:
  """Drops this process's lock on `workdir` (a no-op if it holds none)."""
  fd = _held.pop(os.path.realpath(workdir), None)
  if fd is not None:
    os.close(fd)
