"""Learning-rate schedules: the paper's per-step one (default) and the official per-epoch one.

`create_learning_rate_fn(train_cfg, steps_per_epoch, total_steps)` -> lr(step), with the peak
`base_learning_rate * global_batch_size / 128` (`peak_learning_rate`, linear scaling rule):
- `train.lr_schedule='per_step'`: linear warm-up from `warmup_factor` x peak to the peak over
  `warmup_epochs`, then cosine from the peak to 0 over the remaining steps;
- 'per_epoch' (pycls `get_epoch_lr`): constant within an epoch, a cosine over ALL the epochs
  (warm-up included) times a warm-up factor rising linearly from `warmup_factor`.
`num_train_steps` (-1: from `train.num_epochs`), `steps_per_epoch`, `check_config` (ValueError
`config.PATH=VALUE: allowed`). Formulas: docs/design_notes.md.
"""

import math
from typing import Any, Callable

import numpy as np
import ml_collections

from dolg_jax import config_rules as rules
from dolg_jax.data import grain_pipeline

REFERENCE_BATCH = 128


def peak_learning_rate(train_cfg: ml_collections.ConfigDict) -> float:
  """Linear scaling rule: `base_learning_rate` is per 128 images of global batch."""
  return train_cfg.base_learning_rate * train_cfg.global_batch_size / REFERENCE_BATCH


def steps_per_epoch(num_train_examples: int, global_batch_size: int) -> int:
  """Steps of one epoch of the training iterator (at least 1), whatever the process count."""
  return max(
    1,
    grain_pipeline.steps_per_epoch(
      num_train_examples, process_count=1, per_host_batch=global_batch_size
    ),
  )


SCHEDULES = ('per_step', 'per_epoch')
CONFIG_RULES = {
  'train.lr_schedule': rules.one_of(SCHEDULES),
  'train.base_learning_rate': rules.POSITIVE,
  'train.warmup_epochs': rules.NON_NEGATIVE,
  'train.warmup_factor': rules.CLOSED_UNIT_INTERVAL,
  'train.num_train_steps': rules.Rule(
    'must be an integer >= 1, or -1 (from num_epochs)',
    lambda v: rules.is_int(v) and (v >= 1 or v == -1),
  ),
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError `config.PATH=VALUE: allowed` for a schedule field (the run's length included)."""
  rules.check(config, CONFIG_RULES)
  epochs = rules.get(config, 'train.num_epochs')
  if (
    rules.get(config, 'train.num_train_steps') == -1
    and epochs is not rules.MISSING
    and (not rules.is_number(epochs) or not epochs > 0)
  ):
    rules.fail('train.num_epochs', epochs, 'must be a number > 0 when train.num_train_steps is -1')
  if (
    rules.get(config, 'train.lr_schedule') == 'per_epoch'
    and rules.get(config, 'train.warmup_factor') == 0
    and rules.get(config, 'train.warmup_epochs') not in (rules.MISSING, 0)
  ):
    rules.fail(
      'train.warmup_factor',
      0,
      "with train.lr_schedule='per_epoch' the first epoch "
      'would train at learning rate 0 (the per-epoch warm-up starts at warmup_factor x '
      "lr); use the official 0.1, or train.warmup_epochs=0",
    )


def schedule_kind(train_cfg: ml_collections.ConfigDict) -> str:
  return rules.check_value(
    'train.lr_schedule', train_cfg.lr_schedule, CONFIG_RULES['train.lr_schedule']
  )


def num_train_steps(train_cfg: ml_collections.ConfigDict, num_train_examples: int) -> int:
  """`train.num_train_steps`, or (-1) the number of steps of `train.num_epochs` epochs.

  Per-step schedule: ceil(num_epochs * N / batch). Per-epoch schedule: num_epochs whole epochs of
  N // batch steps (the official loop drops each epoch's last partial batch).
  """
  if train_cfg.num_train_steps > 0:
    return int(train_cfg.num_train_steps)
  rules.check_value(
    'train.num_train_steps', train_cfg.num_train_steps, CONFIG_RULES['train.num_train_steps']
  )
  if schedule_kind(train_cfg) == 'per_epoch':
    return int(
      math.ceil(
        train_cfg.num_epochs * steps_per_epoch(num_train_examples, train_cfg.global_batch_size)
      )
    )
  return int(math.ceil(train_cfg.num_epochs * num_train_examples / train_cfg.global_batch_size))


def create_learning_rate_fn(
  train_cfg: ml_collections.ConfigDict, steps_per_epoch_: int, total_steps: int
) -> Callable[[Any], np.ndarray]:
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
  return float(
    rules.check_value(
      'train.warmup_factor', train_cfg.warmup_factor, CONFIG_RULES['train.warmup_factor']
    )
  )


def _per_epoch_fn(
  train_cfg: ml_collections.ConfigDict, steps_per_epoch_: int, total_steps: int
) -> Callable[[Any], np.ndarray]:
  """The official per-epoch schedule (the formula: docs/design_notes.md)."""
  peak = peak_learning_rate(train_cfg)
  factor = _warmup_factor(train_cfg)
  warmup = float(train_cfg.warmup_epochs)
  # E: num_epochs, or the epochs that num_train_steps covers when it is set.
  epochs = (
    float(train_cfg.num_epochs)
    if train_cfg.num_train_steps == -1
    else math.ceil(total_steps / max(steps_per_epoch_, 1))
  )
  epochs = max(epochs, 1.0)

  def lr_fn(step):
    epoch = np.floor_divide(np.asarray(step, np.int64), max(steps_per_epoch_, 1)).astype(np.float64)
    lr = peak * 0.5 * (1.0 + np.cos(np.pi * epoch / epochs))
    alpha = epoch / warmup if warmup > 0 else np.ones_like(epoch)
    warm = factor * (1.0 - alpha) + alpha
    return np.where(epoch < warmup, lr * warm, lr).astype(np.float32)

  return lr_fn
