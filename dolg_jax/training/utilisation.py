"""Where a training run's time goes: utilisation fields for metrics.jsonl / TensorBoard, profiles.

The loop makes one `Utilisation` and calls `before_step`, `step_region`, `region` / `begin` /
`end` (input_wait, checkpoint, evaluation), `after_step`, and at each log line
`record.update(util.fields(step, timing))`. `fields` adds images_per_sec_per_device,
tflops_per_sec(_per_device), fraction_of_peak, input_wait_s / _fraction, checkpoint_time_s /
_fraction and profiler_time_s over the interval since the previous log line.
`train.profile_steps = (start, num)` traces those steps on process 0 into WORKDIR/profile/
(TensorBoard's Profile tab). The call pattern and each field: docs/design_notes.md.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import jax
from absl import logging

from dolg_jax import profiling
from dolg_jax.training import peaks
from dolg_jax.training import step as step_lib

PROFILE_DIR = 'profile'


def train_step_flops(train_step: Callable, *args) -> float | None:
  """FLOPs of one train step, all devices, from XLA's cost analysis (None when unavailable).

  Call it after the step has run once with arguments of the same shapes and shardings: lowering
  and compiling then hit JAX's caches (no second compilation). The compiled program's FLOPs are
  per device (SPMD), so they are multiplied by the device count; where the backend gives none,
  the lowered (global, pre-optimisation) program's FLOPs are used.
  """
  t0 = time.perf_counter()
  try:
    lowered = train_step.lower(*args)
    per_device = step_lib.train_flops_per_step(lowered.compile())
  except Exception as e:  # noqa: BLE001  # Utilisation is reported without FLOPs.
    logging.warning('No XLA cost analysis of the train step (%s): no TFLOP/s in the logs.', e)
    return None
  flops = per_device * jax.device_count() if per_device else step_lib.train_flops_per_step(lowered)
  logging.info('Train step: %s FLOPs (XLA cost analysis, %.2f s).', flops, time.perf_counter() - t0)
  return flops


def device_peak_tflops(device, compute_dtype: str) -> float | None:
  """Dense peak TFLOP/s of `device` computing in `compute_dtype` (None on CPU or when unknown)."""
  return None if device.platform == 'cpu' else peaks.peak_tflops(device.device_kind, compute_dtype)


class Utilisation:
  """Timings of the parts of training steps and the profiler window (docs/design_notes.md)."""

  def __init__(
    self, workdir: str, profile_steps, images_per_step: int, is_primary: bool, compute_dtype: str
  ):
    if len(tuple(profile_steps)) != 2:
      raise ValueError(
        f'config.train.profile_steps={tuple(profile_steps)!r} must be (start_step, '
        'num_steps); (0, 0) turns profiling off.'
      )
    start, num = (int(v) for v in profile_steps)
    self.profile = profiling.Window(
      os.path.join(workdir, PROFILE_DIR), start, num, enabled=is_primary
    )
    self.images_per_step = images_per_step
    self.n_devices = jax.device_count()
    self.peak = device_peak_tflops(jax.devices()[0], compute_dtype)
    self.flops_per_step: float | None = None
    self._totals: dict[str, float] = {}
    self._open: dict[str, tuple[float, Any]] = {}
    self._last_step = 0

  # ------------------------------------------------------------------ profiler
  def before_step(self, step: int) -> None:
    self.profile.before(step)

  def after_step(self, step: int, outputs: Any) -> None:
    if self.profile.active:  # Writing the trace takes time: reported as profiler_time_s.
      t0 = time.perf_counter()
      self.profile.after(step - 1, outputs)
      self._add('profiler', time.perf_counter() - t0)

  def close(self) -> None:
    self.profile.stop()

  # ------------------------------------------------------------------ timed regions
  def step_region(self, step: int):
    return profiling.step_region('train', step)

  def region(self, name: str) -> '_Timed':
    return _Timed(self, name)

  def begin(self, name: str) -> None:
    annotation = profiling.region(name)
    annotation.__enter__()
    self._open[name] = (time.perf_counter(), annotation)

  def end(self, name: str) -> float:
    """Ends `begin(name)`; returns its seconds."""
    t0, annotation = self._open.pop(name)
    annotation.__exit__(None, None, None)
    return self._add(name, time.perf_counter() - t0)

  def _add(self, name: str, seconds: float) -> float:
    self._totals[name] = self._totals.get(name, 0.0) + seconds
    return seconds

  # ------------------------------------------------------------------ log fields
  def restart(self, step: int, flops_per_step: float | None) -> None:
    """Starts the intervals at `step` (with Progress.restart, after the compiling first step)."""
    self.flops_per_step = flops_per_step
    self._totals = {}
    self._last_step = step

  def fields(self, step: int, timing: dict[str, float]) -> dict[str, float]:
    """Utilisation over the steps since the previous call (`timing`: Progress.update's)."""
    steps = step - self._last_step
    self._last_step = step
    totals, self._totals = self._totals, {}
    if 'step_time_s' not in timing or steps <= 0:  # No step timed (the line of the restart step).
      return {}
    step_time = timing['step_time_s']
    wall = step_time * steps
    out = {
      'images_per_sec_per_device': self.images_per_step / step_time / self.n_devices,
      'input_wait_s': totals.get('input_wait', 0.0),
      'checkpoint_time_s': totals.get('checkpoint', 0.0),
    }
    out['input_wait_fraction'] = out['input_wait_s'] / wall if wall > 0 else 0.0
    out['checkpoint_fraction'] = out['checkpoint_time_s'] / wall if wall > 0 else 0.0
    if 'profiler' in totals:
      out['profiler_time_s'] = totals['profiler']
    if self.flops_per_step:
      out['tflops_per_sec'] = self.flops_per_step / step_time / 1e12
      out['tflops_per_sec_per_device'] = out['tflops_per_sec'] / self.n_devices
      if self.peak:
        out['fraction_of_peak'] = out['tflops_per_sec_per_device'] / self.peak
    return out


class _Timed:
  """`with util.region(name):` times the block into `name` and names it in the trace."""

  def __init__(self, util: Utilisation, name: str):
    self._util, self._name = util, name

  def __enter__(self):
    self._util.begin(self._name)
    return self

  def __exit__(self, *exc):
    self._util.end(self._name)
    return False
