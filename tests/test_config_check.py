"""Config validation (dolg_jax.training.config_check) and resume compatibility
(dolg_jax.training.resume_check): in-process, no training."""

import pytest

from configs import default, demo, r101, released_r101, tiny
from dolg_jax.training import config_check
from dolg_jax.training import resume_check


def _validate(overrides, devices=1, processes=1, base=tiny):
  c = base.get_config()
  for path, value in overrides.items():
    node = c
    *head, last = path.split('.')
    for part in head:
      node = node[part]
    with node.ignore_type():
      node[last] = value
  config_check.validate(c, device_count=devices, process_count=processes)


@pytest.mark.parametrize('base', [default, tiny, demo, r101, released_r101])
def test_shipped_configs_pass(base):
  _validate({}, base=base)
  _validate({}, devices=8, base=base)


@pytest.mark.parametrize(
  'overrides, devices, processes, expected',
  [
    (
      {'train.global_batch_size': 0},
      1,
      1,
      'config.train.global_batch_size=0: must be an integer >= 1',
    ),
    (
      {'train.global_batch_size': -8},
      1,
      1,
      'config.train.global_batch_size=-8: must be an integer >= 1',
    ),
    (
      {'train.checkpoint_every_steps': 0},
      1,
      1,
      'config.train.checkpoint_every_steps=0: must be an integer >= 1',
    ),
    ({'train.log_every_steps': -1}, 1, 1, 'config.train.log_every_steps=-1'),
    (
      {'train.keep_checkpoints': 0},
      1,
      1,
      'config.train.keep_checkpoints=0: must be an integer >= 1',
    ),
    (
      {'train.num_train_steps': 0},
      1,
      1,
      'config.train.num_train_steps=0: must be an integer >= 1, or -1',
    ),
    ({'train.num_train_steps': -1, 'train.num_epochs': 0}, 1, 1, 'config.train.num_epochs=0'),
    (
      {'train.eval_every_steps': -5},
      1,
      1,
      'config.train.eval_every_steps=-5: must be an integer >= 0',
    ),
    ({'data.image_size': 0}, 1, 1, 'config.data.image_size=0'),
    (
      {'train.base_learning_rate': 0.0},
      1,
      1,
      'config.train.base_learning_rate=0.0: must be a number > 0',
    ),
    (
      {'train.base_learning_rate': '0.1'},
      1,
      1,
      "config.train.base_learning_rate='0.1': must be a number",
    ),
    (
      {'train.global_batch_size': 8.0},
      1,
      1,
      'config.train.global_batch_size=8.0: must be an integer',
    ),
    ({'train.nesterov': 1}, 1, 1, 'config.train.nesterov=1: must be True or False'),
    ({'train.momentum': 1.5}, 1, 1, 'config.train.momentum=1.5: must be a number in [0, 1)'),
    (
      {'train.optimizer': 'adam'},
      1,
      1,
      "config.train.optimizer='adam': must be one of 'sgd', 'adamw'",
    ),
    ({'model.fusion': 'sum'}, 1, 1, "config.model.fusion='sum': must be one of"),
    ({'head.type': 'cosface'}, 1, 1, "config.head.type='cosface'"),
    ({'compute_dtype': 'float8'}, 1, 1, "config.compute_dtype='float8': must be one of"),
    ({'compute_dtype': 'float64'}, 1, 1, "JAX_ENABLE_X64=1"),
    (
      {'train.lr_schedule': 'step'},
      1,
      1,
      "config.train.lr_schedule='step': must be one of 'per_step', 'per_epoch'",
    ),
    (
      {'train.warmup_factor': 1.5},
      1,
      1,
      'config.train.warmup_factor=1.5: must be a number in [0, 1]',
    ),
    ({'train.bn_group_size': -1}, 1, 1, 'config.train.bn_group_size=-1: must be an integer >= 0'),
    ({'train.bn_group_size': 3}, 1, 1, 'config.train.bn_group_size=3: must divide the 8 images'),
    (
      {'train.bn_mode': 'per_device', 'train.bn_group_size': 4},
      4,
      1,
      'config.train.bn_group_size=4: must divide the 2 images',
    ),
    (
      {'data.augmentation': 'randaug'},
      1,
      1,
      "config.data.augmentation='randaug': must be one of 'paper', 'official'",
    ),
    ({'data.decode': 'turbo'}, 1, 1, "config.data.decode='turbo': must be one of 'exact', 'fast'"),
    ({'model.bn_running_var': 'welford'}, 1, 1, "config.model.bn_running_var='welford'"),
    (
      {'data.crop_scale': (0.5, 0.2)},
      1,
      1,
      'config.data.crop_scale=(0.5, 0.2): must be (min, max)',
    ),
    ({'model.stage_depths': (1, 0, 1, 1)}, 1, 1, 'config.model.stage_depths'),
    (
      {'train.global_batch_size': 12},
      8,
      1,
      'config.train.global_batch_size=12: must be divisible by train.grad_accum_steps=1 x 8 devices',
    ),
    (
      {'train.global_batch_size': 9},
      3,
      2,
      'config.train.global_batch_size=9: must be divisible by the 2 processes',
    ),
    ({'train.grad_accum_steps': 3}, 1, 1, 'grad_accum_steps=3 x 1 devices'),
    (
      {'mesh.model': 3},
      8,
      1,
      'config.mesh.model=3: must be an integer >= 1 dividing the 8 devices',
    ),
    ({'mesh.data': 3}, 8, 1, 'config.mesh.data=3: times mesh.model=1 must equal the 8 devices'),
    ({'eval.rerank': 'sg'}, 1, 1, "config.eval.rerank='sg': must be one of '', 'superglobal'"),
    (
      {'eval.rerank': 'superglobal', 'eval.qe_k': 2},
      1,
      1,
      "config.eval.rerank='superglobal' and config.eval.qe_k=2 are both set",
    ),
  ],
)
def test_bad_values_name_field_value_and_allowed(overrides, devices, processes, expected):
  with pytest.raises(config_check.ConfigError) as e:
    _validate(overrides, devices, processes)
  assert expected in str(e.value) and '\n' not in str(e.value)


def test_every_choice_its_owner_supports_is_accepted():
  """config_check takes its lists from the owners: what they support passes (depth 152, float16)."""
  from dolg_jax import models
  from dolg_jax.models import resnet
  from dolg_jax.training import schedule

  for depth in resnet.STAGE_DEPTHS:
    _validate({'model.depth': depth, 'model.stage_depths': ()})
  for dtype in set(models.COMPUTE_DTYPES) - {'float64'}:
    _validate({'compute_dtype': dtype, 'eval.compute_dtype': dtype})
  for kind in schedule.SCHEDULES:
    _validate({'train.lr_schedule': kind})


def test_resuming_a_checkpoint_from_before_bn_running_var_names_the_value_it_had():
  saved = _json()
  del saved['model']['bn_running_var']
  with pytest.raises(
    resume_check.ResumeConfigError, match="model.bn_running_var 'biased' -> 'unbiased'"
  ):
    resume_check.check(saved, _json(), allow_recipe_change=False, where='ck')
  assert (
    resume_check.check(
      saved, _json(model__bn_running_var='biased'), allow_recipe_change=False, where='ck'
    )
    == {}
  )


def _json(**changes):
  c = tiny.get_config()
  for path, value in changes.items():
    section, field = path.split('__')
    c[section][field] = value
  import json

  return json.loads(c.to_json_best_effort())


def test_resume_unchanged_and_operational_changes_pass():
  assert resume_check.check(_json(), _json(), allow_recipe_change=False, where='ck') == {}
  changed = _json(
    train__log_every_steps=7,
    data__num_workers=3,
    train__keep_checkpoints=5,
    data__data_dir='/elsewhere',
    mesh__model=2,
  )
  assert resume_check.check(_json(), changed, allow_recipe_change=False, where='ck') == {}


@pytest.mark.parametrize(
  'field, value',
  [
    ('model__width', 16),
    ('model__use_multi_atrous', False),
    ('train__optimizer', 'adamw'),
    ('data__image_size', 96),
    ('train__global_batch_size', 16),
    ('head__type', 'curricularface'),
  ],
)
def test_state_or_stream_change_is_an_error_even_when_recipe_changes_are_allowed(field, value):
  with pytest.raises(resume_check.ResumeConfigError) as e:
    resume_check.check(_json(), _json(**{field: value}), allow_recipe_change=True, where='ck')
  assert 'different model or data stream' in str(e.value)
  assert field.replace('__', '.') in str(e.value)


def test_recipe_change_needs_the_flag_and_is_returned():
  new = _json(train__base_learning_rate=0.1, head__margin=0.3)
  with pytest.raises(resume_check.ResumeConfigError) as e:
    resume_check.check(_json(), new, allow_recipe_change=False, where='ck')
  msg = str(e.value)
  assert 'train.base_learning_rate 0.05 -> 0.1' in msg and 'head.margin 0.15 -> 0.3' in msg
  assert '--config.train.allow_recipe_change_on_resume=True' in msg
  assert resume_check.check(_json(), new, allow_recipe_change=True, where='ck') == {
    'train.base_learning_rate': [0.05, 0.1],
    'head.margin': [0.15, 0.3],
  }


def test_unknown_field_counts_as_recipe():
  assert resume_check.kind('train.some_new_field') == 'recipe'
  assert resume_check.kind('model.anything') == 'state'
  assert resume_check.kind('eval.scales') == 'operational'


def test_ablation_configs_pass():
  from configs import ablation

  for name in ablation.VARIANTS:
    config_check.validate(ablation.get_config(name), device_count=8, process_count=1)


@pytest.mark.parametrize(
  'base, overrides',
  [
    (demo, {'train.num_epochs': 20}),  # demo sets 1500 steps
    (default, {'train.num_train_steps': 100, 'train.num_epochs': 20}),  # both on the command line
  ],
)
def test_num_epochs_override_ignored_by_num_train_steps_is_an_error(base, overrides):
  c = base.get_config()
  c.update_from_flattened_dict(overrides)
  with pytest.raises(
    config_check.ConfigError,
    match=r'config.train.num_epochs=20: ignored: config.train.num_train_steps=',
  ):
    config_check.check_overrides(c, overrides)


@pytest.mark.parametrize(
  'base, overrides',
  [
    (default, {'train.num_epochs': 20}),  # steps from epochs
    (demo, {'train.num_train_steps': -1, 'train.num_epochs': 20}),  # asked for epochs
    (demo, {'train.num_train_steps': 100}),  # steps override steps
    (default, {'train.num_train_steps': 100}),  # and the epochs default
  ],
)
def test_overrides_the_run_honours_pass(base, overrides):
  c = base.get_config()
  c.update_from_flattened_dict(overrides)
  config_check.check_overrides(c, overrides)
