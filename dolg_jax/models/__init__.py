"""DOLG model family: ResNet trunk (resnet.py), DOLG head (dolg.py), margin heads (margins.py)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dolg_jax import config_rules as rules
from dolg_jax import defaults
from dolg_jax.models import dolg as dolg_lib
from dolg_jax.models import resnet
from dolg_jax.models import margins
from dolg_jax.models.dolg import DOLG
from dolg_jax.models.dolg import config_fields
from dolg_jax.models.resnet import ResNet

# The DOLG attributes set from c.model / c.eval (same names), from the module's fields.
MODEL_FIELDS = config_fields('model')
EVAL_FIELDS = config_fields('eval')
ARCHITECTURE_FIELDS = config_fields('model', architecture=True)

# The rules of the c.model fields (and the compute dtypes' choices).
CONFIG_RULES = {
  'model.depth': resnet.DEPTH_RULE,
  **{f'model.{name}': rule for name, rule in dolg_lib.CHOICE_RULES.items()},
  **{
    f'model.{f}': rules.POSITIVE_INT
    for f in ('width', 'atrous_dim', 'local_dim', 'global_dim', 'embedding_dim')
  },
  **{
    f'model.{f}': rules.BOOL
    for f in ('use_local_branch', 'use_multi_atrous', 'use_self_attention', 'gem_p_learnable')
  },
  'model.gem_p': rules.POSITIVE,
  'model.bn_epsilon': rules.POSITIVE,
  'model.fusion_eps': rules.NON_NEGATIVE,
  'model.bn_momentum': rules.UNIT_INTERVAL,
  # The evaluation-time overrides of DOLG attributes (EVAL_FIELDS; DOLG.check checks the model).
  'eval.regional_gem': rules.BOOL,
  'eval.gem_plus_p': rules.NON_NEGATIVE,
  'eval.relu_plus': rules.NON_NEGATIVE,
}

_DTYPES = {
  'float32': jnp.float32,
  'bfloat16': jnp.bfloat16,
  'float16': jnp.float16,
  'float64': jnp.float64,
}
COMPUTE_DTYPES = tuple(sorted(_DTYPES))  # the choices of config.compute_dtype / eval.compute_dtype


def resolve_dtype(dtype: Any) -> Any:
  """'bfloat16' | 'float32' | 'float16' | 'float64' | a jnp dtype -> the jnp dtype.

  'float64' (parity checks against float64 references) needs `jax_enable_x64`; the float32
  islands (pooling, descriptor, head, loss) then compute in float64 too (normalize.wide_dtype).
  ValueError for another name, or for 'float64' without `jax_enable_x64`.
  """
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f'compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}')
    if dtype == 'float64' and not jax.config.jax_enable_x64:
      raise ValueError(
        "compute dtype 'float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
        "jax.config.update('jax_enable_x64', True)) before anything runs"
      )
    return _DTYPES[dtype]
  return dtype


def build_model(model_cfg: ml_collections.ConfigDict | dict, dtype: Any = jnp.float32) -> DOLG:
  """Builds the DOLG module from the `c.model` config section.

  `dtype` is the compute dtype of the convolutions (e.g. jnp.bfloat16 or 'bfloat16'); params, BN
  statistics, the pooled head and the descriptor stay float32. Unknown fields and inconsistent
  values are a ValueError; missing fields take configs/default.py's values.
  """
  cfg = {**defaults.model_defaults(), **dict(model_cfg)}
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f'unknown model config field(s) {unknown}; known: {MODEL_FIELDS}')
  for key in ('stage_depths', 'atrous_rates'):
    cfg[key] = tuple(int(v) for v in cfg[key])
  model = DOLG(**cfg, dtype=resolve_dtype(dtype))
  model.check()
  return model


def architecture_record(model: DOLG) -> dict[str, Any]:
  """{field: value} of the module's MODEL_FIELDS and EVAL_FIELDS, sequences as lists (JSON-able,
  and equal to itself read back from JSON): export.json's 'model' and an index's architecture."""
  out = {}
  for f in MODEL_FIELDS + EVAL_FIELDS:
    v = getattr(model, f)
    out[f] = list(v) if isinstance(v, (tuple, list)) else v
  return out


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError `config.PATH=VALUE: allowed` for a model field or compute dtype it cannot use."""
  rules.check(config, CONFIG_RULES)
  rules.check(
    config, {p: rules.one_of(COMPUTE_DTYPES) for p in ('compute_dtype', 'eval.compute_dtype')}
  )
  for path in ('compute_dtype', 'eval.compute_dtype'):
    value = rules.get(config, path)
    if value is not rules.MISSING:
      try:
        resolve_dtype(value)  # float64 needs 64-bit JAX
      except ValueError as e:
        rules.fail(path, value, str(e))
  depths = rules.get(config, 'model.stage_depths')
  if (
    depths is not rules.MISSING
    and depths
    and (
      not isinstance(depths, (tuple, list))
      or len(depths) != 4
      or not all(rules.is_int(d) and d >= 1 for d in depths)
    )
  ):
    rules.fail('model.stage_depths', depths, 'must be () or four integers >= 1')
  rates = rules.get(config, 'model.atrous_rates')
  if rates is not rules.MISSING and (
    not isinstance(rates, (tuple, list)) or not all(rules.is_int(r) and r >= 1 for r in rates)
  ):
    rules.fail('model.atrous_rates', rates, 'must be integers >= 1')


__all__ = [
  'DOLG',
  'ResNet',
  'architecture_record',
  'build_model',
  'margins',
  'resolve_dtype',
  'MODEL_FIELDS',
  'EVAL_FIELDS',
  'ARCHITECTURE_FIELDS',
]
