"""Learning-rate schedule of the paper: linear warm-up, then cosine decay, evaluated per step.

lr(step) for the peak `base_learning_rate * global_batch_size / 128`:
- warm-up: linear from 0 (exclusive) to the peak over `warmup_epochs` epochs, i.e. the first update
  uses peak * 1 / warmup_steps;
- then cosine from the peak to 0 over the remaining steps.
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


def num_train_steps(train_cfg: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """`train.num_train_steps`, or (-1) the number of steps of `train.num_epochs` epochs."""
  if train_cfg.num_train_steps > 0:
    return int(train_cfg.num_train_steps)
  if train_cfg.num_train_steps != -1:
    raise ValueError('config.train.num_train_steps must be > 0 or -1, got '
                     f'{train_cfg.num_train_steps}')
  return int(math.ceil(train_cfg.num_epochs * num_train_examples / train_cfg.global_batch_size))


def create_learning_rate_fn(train_cfg: ml_collections.ConfigDict, steps_per_epoch_: int,
                            total_steps: int) -> Callable[[Any], np.ndarray]:
  """Returns lr(step) (numpy float32) where `step` counts optimizer updates from 0.

  Evaluated on the host each step and passed to the jitted step (see state.create_optimizer).
  """
  peak = peak_learning_rate(train_cfg)
  warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch_))
  warmup = min(warmup, max(total_steps - 1, 0))
  decay = max(total_steps - warmup, 1)

  def lr_fn(step):
    step = np.asarray(step, np.float64)
    warm = peak * (step + 1.0) / max(warmup, 1)
    t = np.clip((step - warmup) / decay, 0.0, 1.0)
    cos = 0.5 * peak * (1.0 + np.cos(np.pi * t))
    return np.where(step < warmup, warm, cos).astype(np.float32)

  return lr_fn
