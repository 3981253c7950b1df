"""Rules for config fields, declared by the module that uses each field, checked in one way.

An owner module lists its fields as `CONFIG_RULES = {'train.momentum': UNIT_INTERVAL, ...}` (paths
from the config's root) and checks them with `check(config, CONFIG_RULES)`; `training.config_check`
runs every owner's rules before a run starts. A field the config lacks (an older or partial config)
is not checked. A broken rule raises ValueError `config.PATH=VALUE: what is allowed` (one line).
"""

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_collections

MISSING = object()

# Config fields that change neither what a run computes nor its state: paths, loaders, logging,
# checkpoint and evaluation cadence, profiling. Runs that differ only in these are the same run
# (`retrieval.study` groups them); a resume may change them (`training.resume_check`).
OPERATIONAL_FIELDS = frozenset(
  {
    'data.data_dir',
    'data.make_fixture',
    'data.num_workers',
    'data.prefetch_buffer_size',
    'data.read_threads',
    'data.worker_buffer_size',
    'eval.data_dir',
    'eval.output_dir',
    'eval.xla_cache_dir',
    'eval.batch_size',
    'eval.report_queries',
    'eval.search_chunk_size',
    'train.log_every_steps',
    'train.checkpoint_every_steps',
    'train.keep_checkpoints',
    'train.async_checkpointing',
    'train.preemption_sync_every_steps',
    'train.eval_every_steps',
    'train.eval_batches',
    'train.eval_retrieval',
    'train.init_on_one_device',
    'train.allow_recipe_change_on_resume',
    'train.profile_steps',
  }
)


class Rule(NamedTuple):
  allowed: str  # 'must be ...', the end of the error message
  ok: Callable[[Any], bool]


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


BOOL = Rule('must be True or False', lambda v: isinstance(v, bool))
STRING = Rule('must be a string', lambda v: isinstance(v, str))
POSITIVE_INT = Rule('must be an integer >= 1', lambda v: is_int(v) and v >= 1)
NON_NEGATIVE_INT = Rule('must be an integer >= 0', lambda v: is_int(v) and v >= 0)
POSITIVE = Rule('must be a number > 0', lambda v: is_number(v) and v > 0)
NON_NEGATIVE = Rule('must be a number >= 0', lambda v: is_number(v) and v >= 0)
UNIT_INTERVAL = Rule('must be a number in [0, 1)', lambda v: is_number(v) and 0 <= v < 1)
CLOSED_UNIT_INTERVAL = Rule('must be a number in [0, 1]', lambda v: is_number(v) and 0 <= v <= 1)


def one_of(choices: Sequence[Any]) -> Rule:
  return Rule(f'must be one of {", ".join(map(repr, choices))}', lambda v: v in choices)


def get(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value at `path` ('train.momentum'), or MISSING."""
  node = config
  for part in path.split('.'):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      return MISSING
    node = node[part]
  return node


def fail(path: str, value: Any, allowed: str) -> None:
  raise ValueError(f'config.{path}={value!r}: {allowed}')


def check(config: ml_collections.ConfigDict, rules: Mapping[str, Rule]) -> None:
  """Raises ValueError at the first field of `rules` that `config` has and breaks its rule."""
  for path, rule in rules.items():
    value = get(config, path)
    if value is not MISSING and not rule.ok(value):
      fail(path, value, rule.allowed)


def check_value(path: str, value: Any, rule: Rule) -> Any:
  """`value` (of the field at `path`) when it keeps `rule`; else the ValueError of `check`."""
  if not rule.ok(value):
    fail(path, value, rule.allowed)
  return value
