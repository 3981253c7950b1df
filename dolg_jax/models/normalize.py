"""`l2_normalize`: the one L2 normalisation of descriptors and class weights (JAX or numpy).

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
