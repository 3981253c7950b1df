"""One run per workdir: a POSIX record lock (fcntl) on `WORKDIR/run.lock`, held by process 0.

`acquire(workdir)` (the training loop calls it right after the config check, before anything else
is written) takes an exclusive non-blocking `fcntl.lockf` lock on `WORKDIR/run.lock` and writes
who holds it (host, pid, start time, command line). A second run on the same workdir finds the
lock taken and raises `WorkdirBusyError` naming the holder, having written nothing (the lock file
already exists). The kernel (or the NFS / Lustre lock manager) drops the lock when the holding
process ends in any way, `kill -9` included, so a killed or requeued run never leaves a stale lock:
the file stays, with the last holder's name, but is free. The lock lasts until the process exits
(`release(workdir)` ends it earlier, for library use).

Multi-host: only process 0 takes the lock; its outcome (and the refusal line) is broadcast to
every process at start-up, so all processes of a refused run stop with the same line.

Why POSIX (fcntl) locks and not flock: they are not inherited by forked children (data-loader
workers cannot keep a dead run's lock alive), and they are what NFS implements natively.
Filesystems:
- local disks: exact.
- NFS (v3 with the NLM lock daemon, v4 built in): the lock is seen by every client. When the
  holder's node is lost (not just its process), the server frees the lock only when the client's
  lease expires (NFSv4: the server's lease time, commonly 90 s) or the client reboots; a run
  restarted on another node before that is refused, naming the lost holder: wait and rerun. An
  NFS mount with `nolock` (or `local_lock=all`) keeps locks node-local: two runs on different
  nodes are then not detected.
- Lustre: cluster-wide only with the client mount option `flock`; `localflock` gives node-local
  locks (two runs on different nodes are not detected) and `noflock` makes the call fail. When
  the filesystem refuses locks (ENOLCK, EOPNOTSUPP, ENOSYS) the run goes on without one and logs a
  warning saying so.
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
