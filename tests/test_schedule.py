"""Learning-rate schedule: linear scaling, linear warm-up, per-step cosine; step counts."""

import math

import numpy as np
import pytest

from configs import default
from dolg_jax.training import config_check
from dolg_jax.training import schedule


def _cfg(**kw):
  """The default config's train section (its real defaults), with `kw` changed."""
  c = default.get_config().train
  c.update(
    dict(
      base_learning_rate=0.05,
      global_batch_size=128,
      warmup_epochs=5,
      num_epochs=100,
      num_train_steps=-1,
    )
  )
  c.update(kw)
  return c


def test_linear_scaling_rule():
  assert schedule.peak_learning_rate(_cfg()) == pytest.approx(0.05)
  assert schedule.peak_learning_rate(_cfg(global_batch_size=512)) == pytest.approx(0.2)
  assert schedule.peak_learning_rate(_cfg(global_batch_size=32)) == pytest.approx(0.0125)


def test_warmup_then_cosine_values():
  cfg = _cfg(global_batch_size=256, warmup_factor=0.0)  # peak 0.1, warm-up from 0
  spe, total = 10, 100  # 50 warm-up steps, 50 cosine steps
  lr = schedule.create_learning_rate_fn(cfg, spe, total)
  peak = 0.1
  np.testing.assert_allclose(
    [float(lr(s)) for s in range(50)], [peak * (s + 1) / 50 for s in range(50)], rtol=1e-6
  )
  assert float(lr(50)) == pytest.approx(peak)
  assert float(lr(75)) == pytest.approx(peak / 2, rel=1e-6)  # cosine midpoint
  assert float(lr(60)) == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * 10 / 50)), rel=1e-6)
  assert float(lr(99)) == pytest.approx(0.5 * peak * (1 + math.cos(math.pi * 49 / 50)), rel=1e-5)
  assert float(lr(100)) == pytest.approx(0.0, abs=1e-9)
  after = [float(lr(s)) for s in range(50, 101)]
  assert all(a >= b for a, b in zip(after, after[1:]))  # monotone decay
  assert lr(np.arange(3)).dtype == np.float32


def test_num_train_steps():
  assert schedule.num_train_steps(_cfg(num_train_steps=7), 10**6) == 7
  # GLDv2-clean, 100 epochs of batch 128.
  assert schedule.num_train_steps(_cfg(), 1_580_470) == math.ceil(100 * 1_580_470 / 128)
  with pytest.raises(ValueError, match='num_train_steps'):
    schedule.num_train_steps(_cfg(num_train_steps=0), 100)
  assert schedule.steps_per_epoch(1_580_470, 128) == 12347


def test_short_runs_keep_warmup_inside_the_run():
  lr = schedule.create_learning_rate_fn(
    _cfg(global_batch_size=8), steps_per_epoch_=5, total_steps=3
  )
  vals = [float(lr(s)) for s in range(3)]
  assert all(v > 0 for v in vals) and max(vals) <= 0.05 * 8 / 128 + 1e-9


@pytest.mark.parametrize('kind', schedule.SCHEDULES)
def test_default_fields_train_the_first_step_at_a_non_zero_learning_rate(kind):
  """Only lr_schedule changed: the warm-up starts at the default warmup_factor (0.1) x lr."""
  cfg = _cfg(lr_schedule=kind)
  lr0 = float(schedule.create_learning_rate_fn(cfg, steps_per_epoch_=100, total_steps=10_000)(0))
  assert lr0 >= 0.1 * schedule.peak_learning_rate(cfg) * 0.99
  config = default.get_config()
  config.train.lr_schedule = kind
  config_check.validate(config, device_count=1, process_count=1)


def test_per_epoch_warm_up_from_zero_is_refused_before_anything_runs():
  config = default.get_config()
  config.train.lr_schedule = 'per_epoch'
  config.train.warmup_factor = 0.0
  with pytest.raises(
    config_check.ConfigError, match='config.train.warmup_factor=0.*learning rate 0'
  ):
    config_check.validate(config, device_count=1, process_count=1)
