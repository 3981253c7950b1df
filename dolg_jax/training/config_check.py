"""Checks a training config before anything is written or compiled.

`validate(config, device_count=..., process_count=...)` raises `ConfigError` with one line naming the
field, its value and what is allowed, for: wrong types, non-positive sizes and intervals, a global
batch that the processes / devices (the batch is split over every mesh axis) / accumulation steps
cannot split evenly,
`train.keep_checkpoints < 1` (orbax would delete every checkpoint), unknown choices (optimizer,
fusion, head type, dtypes, ...), and inconsistent ranges (crop scale / ratio).
Fields a config does not have (older or partial configs) are not checked.
`check_overrides(config, overrides)` raises `ConfigError` for a command-line override the run would
ignore: `train.num_epochs` while `train.num_train_steps` (not -1) sets the run's length.
"""

from typing import Any, Iterable, Mapping

import ml_collections

from dolg_jax import models
from dolg_jax.data import grain_pipeline
from dolg_jax.models import dolg as dolg_lib
from dolg_jax.models import margins
from dolg_jax.models import resnet
from dolg_jax.retrieval import extract
from dolg_jax.retrieval import scoring
from dolg_jax.training import schedule
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib


class ConfigError(ValueError):
  """A config field holds a value the training code cannot use."""


# Every list of choices comes from the module that owns the field.
_CHOICES = {
    'model.depth': tuple(sorted(resnet.STAGE_DEPTHS)),
    'model.local_stage': dolg_lib.LOCAL_STAGES,
    'model.fusion': dolg_lib.FUSIONS,
    'model.global_pool': dolg_lib.GLOBAL_POOLS,
    'model.dense_init': dolg_lib.DENSE_INITS,
    'model.bn_running_var': resnet.BN_RUNNING_VARS,
    'head.type': margins.HEAD_TYPES,
    'compute_dtype': models.COMPUTE_DTYPES,
    'eval.compute_dtype': models.COMPUTE_DTYPES,
    'eval.crop_rounding': extract.CROP_ROUNDINGS,
    'eval.rerank': scoring.RERANKERS,
    'data.augmentation': grain_pipeline.AUGMENTATIONS,
    'data.decode': grain_pipeline.DECODE_ROUTES,
    'train.optimizer': state_lib.OPTIMIZERS,
    'train.weight_decay_mask': state_lib.WEIGHT_DECAY_MASKS,
    'train.bn_mode': step_lib.BN_MODES,
    'train.lr_schedule': schedule.SCHEDULES,
}
_POSITIVE_INTS = ('model.width', 'model.atrous_dim', 'model.local_dim', 'model.global_dim',
                  'model.embedding_dim', 'data.image_size',
                  'train.global_batch_size', 'train.grad_accum_steps', 'train.log_every_steps',
                  'train.checkpoint_every_steps', 'train.keep_checkpoints',
                  'train.preemption_sync_every_steps', 'eval.batch_size',
                  'eval.search_chunk_size', 'eval.rerank_m')
_NON_NEGATIVE_INTS = ('data.num_workers', 'data.prefetch_buffer_size', 'data.read_threads',
                      'data.worker_buffer_size', 'train.eval_every_steps', 'train.eval_batches',
                      'eval.max_side', 'eval.bucket', 'eval.qe_k', 'eval.dba_k',
                      'eval.report_queries', 'eval.rerank_k', 'seed', 'head.num_classes',
                      'train.bn_group_size')
_POSITIVE_FLOATS = ('train.base_learning_rate', 'head.scale', 'model.gem_p', 'model.bn_epsilon')
_NON_NEGATIVE_FLOATS = ('train.warmup_epochs', 'train.weight_decay', 'train.momentum',
                        'head.margin', 'model.fusion_eps', 'eval.rerank_beta', 'eval.gem_plus_p',
                        'eval.relu_plus')
_CLOSED_UNIT_INTERVAL = ('train.warmup_factor',)
_UNIT_INTERVAL = ('train.momentum', 'train.adam_b1', 'train.adam_b2', 'model.bn_momentum',
                  'head.t_momentum')
_BOOLS = ('model.use_local_branch', 'model.use_multi_atrous', 'model.use_self_attention',
          'model.gem_p_learnable', 'data.random_flip', 'train.nesterov',
          'train.async_checkpointing', 'train.eval_retrieval', 'train.deterministic',
          'train.init_on_one_device', 'eval.use_distractors', 'eval.pad', 'eval.regional_gem')
_STRINGS = ('data.dataset', 'data.data_dir', 'train.backbone_init', 'eval.data_dir',
            'eval.output_dir')

_MISSING = object()


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
  node = config
  for part in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return _MISSING
    node = node[part]
  return node


def _fail(path: str, value: Any, allowed: str) -> None:
  raise ConfigError(f'config.{path}={value!r}: {allowed}')


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _each(config, paths: Iterable[str]):
  for path in paths:
    value = _get(config, path)
    if value is not _MISSING:
      yield path, value


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int) -> None:
  """Raises ConfigError at the first field the training run cannot use."""
  for path, v in _each(config, _BOOLS):
    if not isinstance(v, bool):
      _fail(path, v, 'must be True or False')
  for path, v in _each(config, _STRINGS):
    if not isinstance(v, str):
      _fail(path, v, 'must be a string')
  for path, v in _each(config, _POSITIVE_INTS):
    if not _is_int(v) or v < 1:
      _fail(path, v, 'must be an integer >= 1')
  for path, v in _each(config, _NON_NEGATIVE_INTS):
    if not _is_int(v) or v < 0:
      _fail(path, v, 'must be an integer >= 0')
  for path, v in _each(config, _POSITIVE_FLOATS):
    if not _is_number(v) or not v > 0:
      _fail(path, v, 'must be a number > 0')
  for path, v in _each(config, _NON_NEGATIVE_FLOATS):
    if not _is_number(v) or not v >= 0:
      _fail(path, v, 'must be a number >= 0')
  for path, v in _each(config, _UNIT_INTERVAL):
    if not _is_number(v) or not 0 <= v < 1:
      _fail(path, v, 'must be a number in [0, 1)')
  for path, v in _each(config, _CLOSED_UNIT_INTERVAL):
    if not _is_number(v) or not 0 <= v <= 1:
      _fail(path, v, 'must be a number in [0, 1]')
  for path, v in _each(config, _CHOICES):
    if v not in _CHOICES[path]:
      _fail(path, v, f'must be one of {", ".join(map(repr, _CHOICES[path]))}')
  for path, v in _each(config, ('compute_dtype', 'eval.compute_dtype')):
    try:
      models.resolve_dtype(v)   # float64 needs 64-bit JAX
    except ValueError as e:
      _fail(path, v, str(e))

  t = config.train
  steps = _get(config, 'train.num_train_steps')
  if steps is not _MISSING and (not _is_int(steps) or (steps < 1 and steps != -1)):
    _fail('train.num_train_steps', steps, 'must be an integer >= 1, or -1 (from num_epochs)')
  epochs = _get(config, 'train.num_epochs')
  if steps == -1 and epochs is not _MISSING and (not _is_number(epochs) or not epochs > 0):
    _fail('train.num_epochs', epochs, 'must be a number > 0 when train.num_train_steps is -1')

  if (_get(config, 'train.lr_schedule') == 'per_epoch' and _get(config, 'train.warmup_factor') == 0
      and _get(config, 'train.warmup_epochs') not in (_MISSING, 0)):
    _fail('train.warmup_factor', 0, "with train.lr_schedule='per_epoch' the first epoch would train "
          'at learning rate 0 (the per-epoch warm-up starts at warmup_factor x lr); use the official '
          '0.1, or train.warmup_epochs=0')

  depths = _get(config, 'model.stage_depths')
  if depths is not _MISSING and depths and (
      not isinstance(depths, (tuple, list)) or len(depths) != 4
      or not all(_is_int(d) and d >= 1 for d in depths)):
    _fail('model.stage_depths', depths, 'must be () or four integers >= 1')
  rates = _get(config, 'model.atrous_rates')
  if rates is not _MISSING and (not isinstance(rates, (tuple, list))
                                or not all(_is_int(r) and r >= 1 for r in rates)):
    _fail('model.atrous_rates', rates, 'must be integers >= 1')
  for path, low in (('data.crop_scale', 0.0), ('data.crop_ratio', 0.0)):
    v = _get(config, path)
    if v is _MISSING:
      continue
    if (not isinstance(v, (tuple, list)) or len(v) != 2 or not all(map(_is_number, v))
        or not low < v[0] <= v[1] or (path == 'data.crop_scale' and v[1] > 1)):
      allowed = ('must be (min, max) with 0 < min <= max <= 1' if path == 'data.crop_scale'
                 else 'must be (min, max) with 0 < min <= max')
      _fail(path, v, allowed)
  scales = _get(config, 'eval.scales')
  if scales is not _MISSING and (not isinstance(scales, (tuple, list)) or not scales
                                 or not all(_is_number(s) and s > 0 for s in scales)):
    _fail('eval.scales', scales, 'must be one or more numbers > 0')
  # The search settings the evaluation cannot honour (re-ranking with alpha-QE, ...): its own rules,
  # so a training run fails now rather than at its first evaluation.
  if all(_get(config, f'eval.{k}') is not _MISSING for k in scoring.SEARCH_FIELDS + ('datasets',)):
    try:
      scoring.check_search(config.eval)
    except ValueError as e:
      raise ConfigError(str(e)) from None

  # Mesh and batch divisibility.
  mesh_model = _get(config, 'mesh.model')
  mesh_data = _get(config, 'mesh.data')
  if mesh_model is not _MISSING:
    if not _is_int(mesh_model) or mesh_model < 1 or device_count % mesh_model:
      _fail('mesh.model', mesh_model, f'must be an integer >= 1 dividing the {device_count} '
            'devices')
  model_axis = mesh_model if mesh_model is not _MISSING else 1
  if mesh_data is not _MISSING:
    if not _is_int(mesh_data) or (mesh_data != -1 and mesh_data < 1):
      _fail('mesh.data', mesh_data, 'must be -1 (all devices / mesh.model) or an integer >= 1')
    if mesh_data != -1 and mesh_data * model_axis != device_count:
      _fail('mesh.data', mesh_data, f'times mesh.model={model_axis} must equal the '
            f'{device_count} devices (or use -1)')
  batch = t.global_batch_size
  if batch % process_count:
    _fail('train.global_batch_size', batch, f'must be divisible by the {process_count} processes')
  accum = _get(config, 'train.grad_accum_steps')
  accum = 1 if accum is _MISSING else accum
  if batch % (accum * device_count):   # the batch is split over data x model = all devices
    _fail('train.global_batch_size', batch, f'must be divisible by train.grad_accum_steps={accum} '
          f'x {device_count} devices (the batch is split over every mesh axis)')
  group = _get(config, 'train.bn_group_size')
  if group not in (_MISSING, 0):
    per_device = _get(config, 'train.bn_mode') == 'per_device'
    split = batch // accum // (device_count if per_device else 1)
    if split % group:
      _fail('train.bn_group_size', group,
            f'must divide the {split} images each BatchNorm call sees (train.global_batch_size / '
            f'grad_accum_steps{" / devices (bn_mode=per_device)" if per_device else ""})')


def check_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Raises ConfigError when a command-line override (`overrides`: field path -> value, as
  `config_flags.get_override_values` gives them) would have no effect on the run."""
  steps = _get(config, 'train.num_train_steps')
  if 'train.num_epochs' in overrides and steps not in (_MISSING, -1):
    epochs = overrides['train.num_epochs']
    where = ('also on the command line' if 'train.num_train_steps' in overrides
             else 'set by the config file')
    _fail('train.num_epochs', epochs, f'ignored: config.train.num_train_steps={steps} ({where}) '
          'sets the run\'s length, num_epochs counts only with num_train_steps=-1. Add '
          f'--config.train.num_train_steps=-1 to train {epochs} epochs, or drop '
          '--config.train.num_epochs')
