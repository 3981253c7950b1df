"""Is a resumed run still the run that wrote the checkpoint? Compares the two configs.

`check(saved, new, allow_recipe_change=, where=)` sorts the differing fields (`kind`) into 'state'
(the state's shapes or the batch stream: `model.*`, head type and class count, optimizer, seed,
dataset, image size, crop and flip augmentation, global batch size: always a ResumeConfigError),
'operational' (intervals, workers, data paths, mesh, eval settings, ...: ignored) and 'recipe'
(everything else, e.g. learning rate, schedule, steps, weight decay, margin, compute dtype: a
ResumeConfigError unless `train.allow_recipe_change_on_resume=True`; a field not listed counts as
recipe). Returns the allowed changes {field: [old, new]}, which the loop records in manifest.json
(`resumes[-1].config_changes`).
"""

from typing import Any, Mapping

from dolg_jax import config_rules as rules

STATE_OR_STREAM_PREFIXES = ('model.',)
STATE_OR_STREAM = frozenset(
  {
    'head.type',
    'head.num_classes',
    'train.optimizer',
    'seed',
    'data.dataset',
    'data.image_size',
    'data.crop_scale',
    'data.crop_ratio',
    'data.random_flip',
    'train.global_batch_size',
  }
)
OPERATIONAL_PREFIXES = ('eval.', 'mesh.', 'demo.')
OPERATIONAL = rules.OPERATIONAL_FIELDS | {
  'train.backbone_init',  # the start of a fresh run: a resume restores its checkpoint instead
  'train.init_checkpoint',
  'train.deterministic',  # XLA's determinism flags: the same numbers up to reduction order
}


class ResumeConfigError(ValueError):
  """The config differs from the checkpoint's in fields that may not change on resume."""


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} of nested dicts (lists and scalars are values)."""
  if not isinstance(tree, Mapping):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f'{prefix}{k}.'))
  return out


def kind(field: str) -> str:
  """'state' (state shapes or data stream), 'operational' or 'recipe'."""
  if field in STATE_OR_STREAM or field.startswith(STATE_OR_STREAM_PREFIXES):
    return 'state'
  if field in OPERATIONAL or field.startswith(OPERATIONAL_PREFIXES):
    return 'operational'
  return 'recipe'


_ABSENT = '<absent>'
# Fields added after checkpoints were written, with the value that reproduces those runs: a saved
# config without the field had this behaviour (so resuming it asks for this value, by name).
ADDED_FIELDS = {'model.bn_running_var': 'biased'}


def differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, new value)} of the fields that differ (JSON forms of the configs)."""
  a, b = flatten(saved), flatten(new)
  if a:
    a = {**{k: v for k, v in ADDED_FIELDS.items() if k in b}, **a}
  return {
    k: (a.get(k, _ABSENT), b.get(k, _ABSENT))
    for k in sorted(set(a) | set(b))
    if a.get(k, _ABSENT) != b.get(k, _ABSENT)
  }


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in changes.items())


def check(
  saved: Mapping[str, Any], new: Mapping[str, Any], *, allow_recipe_change: bool, where: str
) -> dict[str, list[Any]]:
  """Raises ResumeConfigError for forbidden changes; returns the allowed recipe changes
  {field: [old, new]} (empty when the run resumes unchanged). `where`: the checkpoint, for the
  message."""
  changes = differences(saved, new)
  state = {k: v for k, v in changes.items() if kind(k) == 'state'}
  recipe = {k: v for k, v in changes.items() if kind(k) == 'recipe'}
  if state:
    raise ResumeConfigError(
      f'{where} was written with a different model or data stream: {_describe(state)}. These '
      'cannot change on resume: rerun with the values it was written with, or train in a new '
      'workdir'
    )
  if recipe and not allow_recipe_change:
    raise ResumeConfigError(
      f'{where} was written with a different recipe: {_describe(recipe)}. Rerun with the '
      'values it was written with, or pass --config.train.allow_recipe_change_on_resume=True '
      'to continue with the new values (recorded in manifest.json under resumes)'
    )
  return {k: [old, new] for k, (old, new) in recipe.items()}
