"""`l2_normalize` (the one L2 normalisation of descriptors and class weights, JAX or numpy) and
`wide_dtype` / `widen` (the dtype of the float32 islands of a model computing in `dtype`).

x / max(|x|, eps) along `axis`, in the array library of `x` (a jax.Array stays on device inside jit;
a numpy array stays numpy on the host), so extraction, search, margins and the model agree on eps.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x: Any, axis: int = -1, eps: float = 1e-12) -> Any:
  """`x` divided by its L2 norm along `axis` (norms below `eps` are treated as `eps`)."""
  xp = np if isinstance(x, np.ndarray) and not isinstance(x, jax.Array) else jnp
  return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), eps)


def wide_dtype(dtype: Any) -> Any:
  """The dtype of the model's float32 islands (pooling, fusion, descriptor, margin head, loss):
  float32 for bfloat16/float16/float32 computation, float64 when the model computes in float64
  (a parity check against a float64 reference; needs jax_enable_x64)."""
  return jnp.promote_types(dtype, jnp.float32)


def widen(x: jax.Array) -> jax.Array:
  """`x` in `wide_dtype(x.dtype)` (bfloat16 -> float32; float32 and float64 unchanged)."""
  return x.astype(wide_dtype(x.dtype))
