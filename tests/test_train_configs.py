"""Every training config loads, has the loop's fields, and builds its model (abstractly)."""

import importlib

import jax
import jax.numpy as jnp
import pytest

from configs import ablation
from dolg_jax import models

CONFIGS = ['r50', 'r101', 'released_r101', 'official_r101', 'official_r101:paper_size', 'tiny'] + [
  f'ablation:{n}' for n in ablation.VARIANTS
]


def _load(spec):
  name, _, arg = spec.partition(':')
  module = importlib.import_module(f'configs.{name}')
  return module.get_config(arg) if arg else module.get_config()


@pytest.mark.parametrize('spec', CONFIGS)
def test_config_fields_and_model(spec):
  c = _load(spec)
  for key in (
    'num_train_steps',
    'log_every_steps',
    'checkpoint_every_steps',
    'global_batch_size',
    'base_learning_rate',
    'warmup_epochs',
    'bn_mode',
    'weight_decay_mask',
  ):
    assert key in c.train, (spec, key)
  assert c.mesh.data == -1 and c.mesh.model >= 1
  model = models.build_model(c.model, c.compute_dtype)
  size = 64
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), jnp.zeros((1, size, size, 3)))
  assert 'params' in shapes


def test_paper_and_released_settings():
  r50, r101, rel = _load('r50'), _load('r101'), _load('released_r101')
  assert (r50.model.depth, r101.model.depth) == (50, 101)
  assert r50.data.image_size == 512 and r50.train.num_epochs == 100
  assert (r50.head.type, r50.head.margin, r50.head.scale) == ('arcface', 0.15, 30.0)
  assert r50.train.base_learning_rate == 0.05 and r50.train.global_batch_size == 128
  assert r50.train.momentum == 0.9 and r50.train.weight_decay == 1e-4
  assert r50.train.warmup_epochs == 5
  assert r50.model.use_multi_atrous and not r50.model.gem_p_learnable
  assert not rel.model.use_multi_atrous and rel.model.gem_p_learnable
  assert rel.head.type == 'curricularface' and rel.model.depth == 101


def test_unknown_ablation_is_an_error():
  with pytest.raises(ValueError, match='no_local'):
    _load('ablation:no_locl')
