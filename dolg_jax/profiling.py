"""Profiler traces of a window of loop iterations, readable by TensorBoard's profile plugin (xprof).

`Window(log_dir, start, num, enabled)` traces (`jax.profiler.start_trace`) iterations
[start, start + num) of a loop that calls `before(i)` and `after(i, outputs)` around iteration `i`
(`after` blocks on the window's last outputs, so their device work is in the trace) into
`log_dir/plugins/profile/<timestamp>/<host>.xplane.pb` (+ `<host>.trace.json.gz`); only a window
with `enabled=True` (process 0 by convention) traces. `region(name)` / `step_region(name, step)`
name parts and steps in the trace (nearly free when none is captured).
"""

from __future__ import annotations

from typing import Any

import jax
from absl import logging


def region(name: str) -> jax.profiler.TraceAnnotation:
  """A named region of the trace (`with region('checkpoint'): ...`)."""
  return jax.profiler.TraceAnnotation(name)


def step_region(name: str, step: int) -> jax.profiler.StepTraceAnnotation:
  """One numbered step (xprof's step-time breakdown groups the trace by these)."""
  return jax.profiler.StepTraceAnnotation(name, step_num=int(step))


def _options() -> jax.profiler.ProfileOptions:
  """Host and device activity with our named regions; no Python-function tracer: it records every
  interpreter call, so a step that traces or compiles something (e.g. the first checkpoint's
  digest program) fills the profiler's 1M-event buffer and later steps vanish from the trace."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  return options


class Window:
  """Traces iterations [start, start + num) of a loop; `num == 0` turns it off (ValueError when
  start or num is negative)."""

  def __init__(self, log_dir: str, start: int, num: int, enabled: bool = True):
    if int(start) < 0 or int(num) < 0:
      raise ValueError(
        f'profile window (start={start}, num={num}): both must be >= 0; (0, 0) turns profiling off.'
      )
    self.log_dir = log_dir
    self.start, self.num = int(start), int(num)
    self.enabled = bool(enabled) and self.num > 0
    self.active = False
    self.done = False

  def before(self, i: int) -> None:
    """Starts the trace when iteration `i` is the window's first (or inside it, after a resume)."""
    if (
      self.enabled
      and not self.active
      and not self.done
      and (self.start <= i < self.start + self.num)
    ):
      try:
        jax.profiler.start_trace(self.log_dir, profiler_options=_options())
      except RuntimeError as e:  # Another window's trace is running (one trace at a time).
        logging.warning('No profiler trace for %s: %s (windows must not overlap).', self.log_dir, e)
        self.done = True
        return
      self.active = True
      logging.info('Profiler trace started at iteration %d -> %s', i, self.log_dir)

  def after(self, i: int, outputs: Any = None) -> None:
    """Stops the trace after the window's last iteration, once `outputs` are computed."""
    if self.active and i + 1 >= self.start + self.num:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      self.done = True
      logging.info('Profiler trace written under %s/plugins/profile', self.log_dir)
