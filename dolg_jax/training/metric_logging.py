"""Metric outputs: `WORKDIR/metrics.jsonl`, TensorBoard event files and a progress line.

`JsonlWriter`: one JSON object per logged step (non-finite floats as strings; `truncate_after` on
resume). `create_writer`: absl logging on every process and, on process 0, TensorBoard events
in WORKDIR/tensorboard (`TensorBoardXWriter`, tensorboardX), through `MultiWriter`, with clu's
MetricWriter method names (write_scalars, write_texts, write_hparams, flush, close). `Progress`:
throughput and ETA. Only process 0 writes files. Design notes: docs/design_notes.md.
"""

import json
import math
import os
import time
from typing import Any, Mapping

import numpy as np
from absl import logging
import tensorboardX

from dolg_jax import progress as progress_lib

METRICS_FILE = 'metrics.jsonl'


class TensorBoardXWriter:
  """Writes TensorBoard event files with tensorboardX (no TensorFlow)."""

  def __init__(self, logdir: str):
    self._writer = tensorboardX.SummaryWriter(logdir=logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      self._writer.add_text(key, value, global_step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._writer.add_text('hparams', json.dumps(dict(hparams), indent=1, default=str))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter:
  """Appends one JSON object per logged step to `WORKDIR/metrics.jsonl`."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops records of steps > `step` (written after the checkpoint we resume from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= step]
    with open(self.path, 'w') as f:
      f.writelines(lines)

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    try:
      with open(self.path, 'a') as f:
        f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + '\n')
    except OSError as e:  # Name the file (a bare ENOSPC names none).
      raise OSError(e.errno, f'writing {self.path} failed: {e.strerror or e}') from e


def _jsonable(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)):
    v = v.item() if np.ndim(v) == 0 else v.tolist()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class LoggingWriter:
  """Logs scalars with absl (every process)."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    logging.info('[%d] %s', step, ', '.join(f'{k}={float(v):.6g}' for k, v in scalars.items()))

  def write_texts(self, step: int, texts: Mapping[str, str]):
    for key, value in texts.items():
      logging.info('[%d] %s: %s', step, key, value)

  def write_hparams(self, hparams: Mapping[str, Any]):
    del hparams

  def flush(self):
    pass

  def close(self):
    pass


class MultiWriter:
  """Sends every call to each of `writers`."""

  def __init__(self, writers):
    self._writers = list(writers)

  def __getattr__(self, name):
    def call(*args, **kwargs):
      for w in self._writers:
        getattr(w, name)(*args, **kwargs)

    return call


def create_writer(workdir: str, is_primary: bool) -> MultiWriter:
  """Logging (every process) + TensorBoard (process 0 only) writer."""
  writers = [LoggingWriter()]
  if is_primary:
    writers.append(TensorBoardXWriter(os.path.join(workdir, 'tensorboard')))
  return MultiWriter(writers)


TRAIN_PROGRESS = (
  'step {n}/{total} ({percentage:.1f}%) loss {loss:.4f} acc {accuracy:.3f} '
  'lr {learning_rate:.5f} {images_per_sec:.1f} img/s ETA {eta}'
)


class Progress:
  """Throughput over the steps since the last report and the ETA (mean step time since the
  clock started), on `dolg_jax.progress.Progress`."""

  def __init__(self, total_steps: int, start_step: int, images_per_step: int):
    self.images_per_step = images_per_step
    self._steps = progress_lib.Progress(total_steps, TRAIN_PROGRESS, initial=start_step)
    self._t, self._step = time.perf_counter(), start_step

  def restart(self, step: int) -> None:
    """Restarts the clocks at `step` (call after the first, compiling, step)."""
    self._steps.restart(step)
    self._t, self._step = time.perf_counter(), step

  def exclude(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation, say) out of the throughput and the ETA."""
    self._t += seconds
    self._steps.exclude(seconds)

  def update(self, step: int) -> dict[str, float]:
    now = time.perf_counter()
    step_time = (now - self._t) / max(step - self._step, 1)
    self._t, self._step = now, step
    self._steps.at(step)
    return {
      'step_time_s': step_time,
      'images_per_sec': self.images_per_step / step_time,
      'eta_s': self._steps.eta_s(),
    }

  def line(self, metrics: Mapping[str, Any]) -> str:
    """The progress line at the step of the last `update`; at a validation step also its accuracy
    (`val_accuracy`)."""
    eta = int(metrics.get('eta_s', 0))
    line = self._steps.line(
      loss=metrics['loss'],
      accuracy=metrics['accuracy'],
      learning_rate=metrics['learning_rate'],
      images_per_sec=metrics['images_per_sec'],
      eta=f'{eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}',
    )
    if 'val_accuracy' in metrics:
      line += f' | val_accuracy {float(metrics["val_accuracy"]):.3f}'
    return line
