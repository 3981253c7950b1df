"""SIGTERM (preemption) handling: the loop saves and exits at a step boundary, every process at the
same step (the checkpoint is collective).

`PreemptionHandler(sync_every)`, a context manager with `should_stop(step)` and `request()`: with
one process a Python SIGTERM handler sets a flag; with several, JAX's preemption sync manager
(started by `jax.distributed.initialize`) agrees on the step through the coordination service, or,
with `jax_enable_preemption_service=False`, a `process_allgather` of the flags every `sync_every`
steps (`train.preemption_sync_every_steps`). `catch_early_sigterm()` (dolg_jax.main, at entry)
remembers a SIGTERM that arrives while the run starts: the loop then stops after its first step
with a checkpoint. How the agreement works: docs/multihost.md. Design notes: docs/design_notes.md.
"""

import os
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


def coordination_service_agreement() -> bool:
  """True when several processes agree on the stopping step through JAX's preemption service."""
  return (
    jax.process_count() > 1
    and jax.distributed.is_initialized()
    and bool(jax.config.jax_enable_preemption_service)
  )


class PreemptionHandler:
  """Context manager for the training loop's SIGTERM handling (see the module docstring);
  Ctrl-C / SIGINT keeps its usual meaning."""

  def __init__(self, sync_every: int = 10):
    self.sync_every = max(1, int(sync_every))
    self._event = threading.Event()
    self._previous = None
    self._service = False

  def __enter__(self) -> 'PreemptionHandler':
    self._service = coordination_service_agreement()
    if self._service:
      if _EARLY.is_set():  # Received before the notifier existed: hand it to the notifier.
        _EARLY.clear()
        os.kill(os.getpid(), signal.SIGTERM)
      return self
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    if _EARLY.is_set():  # Received while the run was starting.
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
    """Marks this process as preempted (what SIGTERM does)."""
    if self._service:
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      self._event.set()

  def should_stop(self, step: int) -> bool:
    """True (on every process, at the same step) when any process received SIGTERM. With several
    processes call it at every step, from the same first step on every process."""
    if self._service:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    if step % self.sync_every:
      return False
    flags = multihost_utils.process_allgather(np.array(local, np.int32))
    return bool(np.max(flags))
