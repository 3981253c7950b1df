"""Checks a training config before anything is written or compiled.

`validate(config, device_count=..., process_count=...)` raises `ConfigError` with one line naming
the field, its value and what is allowed, for: wrong types, non-positive sizes and intervals, a
global batch that the processes / devices (the batch is split over every mesh axis) / accumulation
steps cannot split evenly, `train.keep_checkpoints < 1` (orbax would delete every checkpoint),
unknown choices (optimizer, fusion, head type, dtypes, ...), and inconsistent ranges (crop scale /
ratio).
Each field's rule is declared by the module that uses it (`CONFIG_RULES` / `check_config` of the
models, the data pipeline, the schedule, the optimizer, the step, checkpointing, extraction and
scoring; `init_checkpoint.validate`; `dolg_jax.config_rules`): `validate` runs them all, then the
checks that need the device and process counts. Fields a config does not have (older or partial
configs) are not checked.
`check_overrides(config, overrides)` raises `ConfigError` for a command-line override the run would
ignore: `train.num_epochs` while `train.num_train_steps` (not -1) sets the run's length.
"""

import contextlib
from typing import Any, Iterator, Mapping

import ml_collections

from dolg_jax import config_rules as rules
from dolg_jax import models
from dolg_jax.data import grain_pipeline
from dolg_jax.models import margins
from dolg_jax.retrieval import extract
from dolg_jax.retrieval import scoring
from dolg_jax.training import checkpointing
from dolg_jax.training import init_checkpoint
from dolg_jax.training import schedule
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib


class ConfigError(ValueError):
  """A config field holds a value the training code cannot use."""


# The fields the training loop itself reads (the other fields' rules are their owners').
_RUN_RULES = {
  'seed': rules.NON_NEGATIVE_INT,
  'data.dataset': rules.STRING,
  'data.data_dir': rules.STRING,
  'train.log_every_steps': rules.POSITIVE_INT,
  'train.eval_every_steps': rules.NON_NEGATIVE_INT,
  'train.eval_batches': rules.NON_NEGATIVE_INT,
  'train.eval_retrieval': rules.BOOL,
  'train.deterministic': rules.BOOL,
  'train.preemption_sync_every_steps': rules.POSITIVE_INT,
  **checkpointing.CONFIG_RULES,
  **state_lib.CONFIG_RULES,
  **step_lib.CONFIG_RULES,
  **margins.CONFIG_RULES,
}
# The owners' checks of a whole config, in the order a config's sections are read.
_OWNER_CHECKS = (
  models.check_config,
  grain_pipeline.check_config,
  schedule.check_config,
  extract.check_config,
  scoring.check_config,
)


@contextlib.contextmanager
def _as_config_error() -> Iterator[None]:
  """The owners' and the rules' one-line ValueErrors as a ConfigError."""
  try:
    yield
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _owners_check(config: ml_collections.ConfigDict) -> None:
  """Every owner's rules and checks."""
  rules.check(config, _RUN_RULES)
  for check in _OWNER_CHECKS:
    check(config)
  if 'train' in config and 'init_checkpoint' in config.train:
    init_checkpoint.validate(config)


def validate(config: ml_collections.ConfigDict, *, device_count: int, process_count: int) -> None:
  """Raises ConfigError at the first field the training run cannot use."""
  with _as_config_error():
    _owners_check(config)
    _split_checks(config, device_count, process_count)


def _split_checks(config: ml_collections.ConfigDict, device_count: int, process_count: int) -> None:
  """The mesh, the batch and the BatchNorm groups against the device and process counts."""
  t = config.train

  # Mesh and batch divisibility.
  mesh_model = rules.get(config, 'mesh.model')
  mesh_data = rules.get(config, 'mesh.data')
  if mesh_model is not rules.MISSING:
    if not rules.is_int(mesh_model) or mesh_model < 1 or device_count % mesh_model:
      rules.fail(
        'mesh.model', mesh_model, f'must be an integer >= 1 dividing the {device_count} devices'
      )
  model_axis = mesh_model if mesh_model is not rules.MISSING else 1
  if mesh_data is not rules.MISSING:
    if not rules.is_int(mesh_data) or (mesh_data != -1 and mesh_data < 1):
      rules.fail('mesh.data', mesh_data, 'must be -1 (all devices / mesh.model) or an integer >= 1')
    if mesh_data != -1 and mesh_data * model_axis != device_count:
      rules.fail(
        'mesh.data',
        mesh_data,
        f'times mesh.model={model_axis} must equal the {device_count} devices (or use -1)',
      )
  batch = t.global_batch_size
  if batch % process_count:
    rules.fail(
      'train.global_batch_size', batch, f'must be divisible by the {process_count} processes'
    )
  accum = rules.get(config, 'train.grad_accum_steps')
  accum = 1 if accum is rules.MISSING else accum
  step_lib.check_batch_split(batch, accum, device_count)  # data x model = all devices
  group = rules.get(config, 'train.bn_group_size')
  if group not in (rules.MISSING, 0):
    per_device = rules.get(config, 'train.bn_mode') == 'per_device'
    split = batch // accum // (device_count if per_device else 1)
    if split % group:
      rules.fail(
        'train.bn_group_size',
        group,
        f'must divide the {split} images each BatchNorm call sees (train.global_batch_size / '
        f'grad_accum_steps{" / devices (bn_mode=per_device)" if per_device else ""})',
      )


def check_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Raises ConfigError when a command-line override (`overrides`: field path -> value, as
  `config_flags.get_override_values` gives them) would have no effect on the run."""
  steps = rules.get(config, 'train.num_train_steps')
  if 'train.num_epochs' in overrides and steps not in (rules.MISSING, -1):
    epochs = overrides['train.num_epochs']
    where = (
      'also on the command line'
      if 'train.num_train_steps' in overrides
      else 'set by the config file'
    )
    with _as_config_error():
      rules.fail(
        'train.num_epochs',
        epochs,
        f'ignored: config.train.num_train_steps={steps} ({where}) '
        'sets the run\'s length, num_epochs counts only with num_train_steps=-1. Add '
        f'--config.train.num_train_steps=-1 to train {epochs} epochs, or drop '
        '--config.train.num_epochs',
      )
