"""`random_variables(model_cfg, seed)`: DOLG variables for benchmarks and tests, no init compile.

He-normal kernels (std sqrt(2 / fan_in)), unit BatchNorm scales and running variances, a learnable
GeM p at `model_cfg.gem_p`, zeros elsewhere, built from the shapes alone (`jax.eval_shape`): a
real `model.init` compiles for tens of seconds on a 2-core machine. Descriptors from these weights
are well scaled through every stage, unlike all-zero ones.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dolg_jax.models import build_model


def random_variables(model_cfg: ml_collections.ConfigDict, seed: int = 0) -> dict:
  """The variables dict ({'params', 'batch_stats'}) of `build_model(model_cfg)`, numpy leaves."""
  model = build_model(model_cfg)
  shapes = jax.eval_shape(
    lambda r: model.init(r, jnp.zeros((1, 64, 64, 3)), train=False), jax.random.key(0)
  )
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if 'kernel' in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
    if 'scale' in name or 'var' in name:
      return np.ones(leaf.shape, leaf.dtype)
    if name == "['p']":
      return np.full(leaf.shape, float(model.gem_p), leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
