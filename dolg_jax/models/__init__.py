"""DOLG model family: ResNet trunk (resnet.py), DOLG head (dolg.py), margin heads (margins.py)."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from dolg_jax.models import margins
from dolg_jax.models.dolg import DOLG
from dolg_jax.models.resnet import ResNet

# c.model fields -> DOLG attributes (same names). Every field of c.model must be listed here.
MODEL_FIELDS = (
    'depth', 'width', 'stage_depths', 'local_stage', 'use_local_branch', 'use_multi_atrous',
    'atrous_rates', 'atrous_dim', 'local_dim', 'use_self_attention', 'fusion', 'global_pool',
    'gem_p', 'gem_p_learnable', 'global_dim', 'embedding_dim', 'fusion_eps', 'bn_momentum',
    'bn_epsilon', 'bn_running_var', 'zero_init_final_gamma', 'dense_init')

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16,
           'float64': jnp.float64}
COMPUTE_DTYPES = tuple(sorted(_DTYPES))  # the choices of config.compute_dtype / eval.compute_dtype


def resolve_dtype(dtype: Any) -> Any:
  """'bfloat16' | 'float32' | 'float16' | 'float64' | a jnp dtype -> the jnp dtype.

  'float64' (parity checks against float64 references) needs `jax_enable_x64`; the float32
  islands (pooling, descriptor, head, loss) then compute in float64 too (normalize.wide_dtype).
  """
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f'compute dtype must be one of {COMPUTE_DTYPES}, got {dtype!r}')
    if dtype == 'float64' and not jax.config.jax_enable_x64:
      raise ValueError("compute dtype 'float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 (or "
                       "jax.config.update('jax_enable_x64', True)) before anything runs")
    return _DTYPES[dtype]
  return dtype


def build_model(model_cfg: ml_collections.ConfigDict | dict, dtype: Any = jnp.float32) -> DOLG:
  """Builds the DOLG module from the `c.model` config section.

  `dtype` is the compute dtype of the convolutions (e.g. jnp.bfloat16 or 'bfloat16'); params, BN
  statistics, the pooled head and the descriptor stay float32. Unknown fields are an error.
  """
  cfg = dict(model_cfg)
  unknown = sorted(set(cfg) - set(MODEL_FIELDS))
  if unknown:
    raise ValueError(f'unknown model config field(s) {unknown}; known: {MODEL_FIELDS}')
  for key in ('stage_depths', 'atrous_rates'):
    if key in cfg:
      cfg[key] = tuple(int(v) for v in cfg[key])
  model = DOLG(**cfg, dtype=resolve_dtype(dtype))
  model.check()
  return model


__all__ = ['DOLG', 'ResNet', 'build_model', 'margins', 'resolve_dtype', 'MODEL_FIELDS']
