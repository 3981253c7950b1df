"""Learning-rate schedules: the paper's per-step one (default) and the official per-epoch one.

The peak is `base_learning_rate * global_batch_size / 128` (linear scaling rule).

`train.lr_schedule = 'per_step'` (default):
- warm-up: linear from `warmup_factor` x peak (default 0.1, pycls' WARMUP_FACTOR; 0 = from 0,
  exclusive) to the peak over `warmup_epochs` epochs, i.e. the first update uses
  peak * (f + (1 - f) / warmup_steps);
- then cosine from the peak to 0 over the remaining steps.

`train.lr_schedule = 'per_epoch'` (the official code: pycls `get_epoch_lr`, set once per epoch):
  e = step // steps_per_epoch, E = the number of epochs,
  lr = peak * 0.5 * (1 + cos(pi * e / E)) * w(e),
  w(e) = warmup_factor * (1 - e / W) + e / W for e < W = warmup_epochs, else 1;
so the learning rate is constant within an epoch, the warm-up starts at `warmup_factor` x the
cosine value (default and official 0.1; 0 would train the first epoch at learning rate 0, which
config_check refuses) and the cosine runs over ALL epochs (the warm-up epochs included).
With `num_train_steps = -1` a per-epoch run trains exactly num_epochs x steps_per_epoch steps
(whole epochs, as the official loop does).
"""

import math
from typing import Any, Callable

import numpy as np
import ml_collections

from dolg_jax.data import grain_pipeline

REFERENCE_BATCH = 128


def peak_learning_rate(train_cfg: ml_collections.ConfigDict) -> float:
  """Linear scaling rule: `base_learning_rate` is per 128 images of global batch."""
  return train_cfg.base_learning_rate * train_cfg.global_batch_size / REFERENCE_BATCH


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
  """Steps of one epoch of the training iterator (at least 1), whatever the process count."""
  return max(1, grain_pipeline.steps_per_epoch(num_train_examples, process_count=1,
                                               per_host_batch=global_batch_size))


SCHEDULES = ('per_step', 'per_epoch')


def schedule_kind(train_cfg: ml_collections.ConfigDict) -> str:
  kind = train_cfg.lr_schedule
  if kind not in SCHEDULES:
    raise ValueError(f'config.train.lr_schedule must be one of {SCHEDULES}, got {kind!r}')
  return kind


def num_train_steps(train_cfg: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """`train.num_train_steps`, or (-1) the number of steps of `train.num_epochs` epochs.

  Per-step schedule: ceil(num_epochs * N / batch). Per-epoch schedule: num_epochs whole epochs of
  N // batch steps (the official loop drops each epoch's last partial batch).
  """
  if train_cfg.num_train_steps > 0:
    return int(train_cfg.num_train_steps)
  if train_cfg.num_train_steps != -1:
    raise ValueError('config.train.num_train_steps must be > 0 or -1, got '
                     f'{train_cfg.num_train_steps}')
  if schedule_kind(train_cfg) == 'per_epoch':
    return int(math.ceil(train_cfg.num_epochs
                         * steps_per_epoch(num_train_examples, train_cfg.global_batch_size)))
  return int(math.ceil(train_cfg.num_epochs * num_train_examples / train_cfg.global_batch_size))


def create_learning_rate_fn(train_cfg: ml_collections.ConfigDict, steps_per_epoch_: int,
                            total_steps: int) -> Callable[[Any], np.ndarray]:
  """Returns lr(step) (numpy float32) where `step` counts optimizer updates from 0.

  Evaluated on the host each step and passed to the jitted step (see state.create_optimizer).
  """
  if schedule_kind(train_cfg) == 'per_epoch':
    return _per_epoch_fn(train_cfg, steps_per_epoch_, total_steps)
  peak = peak_learning_rate(train_cfg)
  warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch_))
  warmup = min(warmup, max(total_steps - 1, 0))
  decay = max(total_steps - warmup, 1)

  factor = _warmup_factor(train_cfg)

  def lr_fn(step):
    step = np.asarray(step, np.float64)
    warm = peak * (factor + (1.0 - factor) * (step + 1.0) / max(warmup, 1))
    t = np.clip((step - warmup) / decay, 0.0, 1.0)
    cos = 0.5 * peak * (1.0 + np.cos(np.pi * t))
    return np.where(step < warmup, warm, cos).astype(np.float32)

  return lr_fn


def _warmup_factor(train_cfg: ml_collections.ConfigDict) -> float:
  factor = float(train_cfg.warmup_factor)
  if not 0.0 <= factor <= 1.0:
    raise ValueError(f'config.train.warmup_factor must be in [0, 1], got {factor}')
  return factor


def _per_epoch_fn(train_cfg: ml_collections.ConfigDict, steps_per_epoch_: int,
                  total_steps: int) -> Callable[[Any], np.ndarray]:
  """The official per-epoch schedule (see the module docstring)."""
  peak = peak_learning_rate(train_cfg)
  factor = _warmup_factor(train_cfg)
  warmup = float(train_cfg.warmup_epochs)
  # E: num_epochs, or the epochs that num_train_steps covers when it is set.
  epochs = (float(train_cfg.num_epochs) if train_cfg.num_train_steps == -1
            else math.ceil(total_steps / max(steps_per_epoch_, 1)))
  epochs = max(epochs, 1.0)

  def lr_fn(step):
    epoch = np.floor_divide(np.asarray(step, np.int64), max(steps_per_epoch_, 1)).astype(np.float64)
    lr = peak * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs))
    alpha = epoch / warmup if warmup > 0 else np.ones_like(epoch)
    warm = factor * (1.0 - alpha) + alpha
    return np.where(epoch < warmup, lr * warm, lr).astype(np.float32)

  return lr_fn
