"""SIGTERM (preemption) handling: remember the signal; the loop saves and exits at a step boundary.

All processes must stop at the same step (the checkpoint is collective), so with several processes
the flag is OR-reduced across processes every `sync_every` steps.

`catch_early_sigterm()` (called by dolg_jax.main before anything slow) remembers a SIGTERM that
arrives while the run is still starting (imports, restore, compilation): the loop then stops after
its first step with a checkpoint and the preempted exit code, instead of dying unsaved with 143.
"""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


_EARLY = threading.Event()


def _on_early_signal(signum, frame) -> None:
  del signum, frame
  _EARLY.set()


def catch_early_sigterm() -> None:
  """Remembers a SIGTERM received before the training loop installs its handler."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, _on_early_signal)


class PreemptionHandler:
  """Context manager installing a SIGTERM handler (Ctrl-C / SIGINT keeps its usual meaning)."""

  def __init__(self, sync_every: int = 10):
    self.sync_every = max(1, int(sync_every))
    self._event = threading.Event()
    self._previous = None

  def __enter__(self) -> 'PreemptionHandler':
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    if _EARLY.is_set():   # Received while the run was starting.
      self._event.set()
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum, frame) -> None:
    del signum, frame
    self._event.set()

  def request(self) -> None:
    """Marks this process as preempted (what the signal handler does)."""
    self._event.set()

  def should_stop(self, step: int) -> bool:
    """True (on every process, at the same step) when any process received SIGTERM."""
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.array(local, np.int32))
    return bool(np.max(flags))
