"""Content digests of a train state, the same however it is sharded and over how many processes.

`tree_digests(tree, mesh)` -> {jax.tree_util.keystr(path): 16 hex digits} for every array leaf
(collective: computed on the global arrays inside one jit, nothing gathered); `numpy_digest(x)`
gives the same digest of a host array (checkpoints read without devices). A 64-bit check against
storage corruption, not a cryptographic hash; TypeError for a dtype it cannot digest.
Design notes: docs/design_notes.md.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

_GOLDEN = 0x9E3779B9
_MIX = 0x85EBCA6B


def _as_words(x):
  """Element bit patterns as uint32 (same shape as x; 64-bit dtypes get a trailing dim of 2)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size == 4:
    return lax.bitcast_convert_type(x, jnp.uint32)
  if size == 2:
    return lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  if size == 1:
    return lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
  if size == 8:
    return lax.bitcast_convert_type(x, jnp.uint32)
  raise TypeError(f'no digest for dtype {x.dtype}')


def _leaf_digest(x):
  u = _as_words(jnp.asarray(x))
  shape = u.shape
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):  # Row-major position, without reshaping the sharded array.
    index = index + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride % 2**32)
    stride *= shape[d]
  s1 = jnp.sum(u * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
  h = (u ^ (index * jnp.uint32(_GOLDEN))) * jnp.uint32(_MIX)
  h = h ^ (h >> jnp.uint32(13))
  s2 = jnp.sum(h, dtype=jnp.uint32)
  return jnp.stack([s1, s2])


def _hex(pair) -> str:
  a, b = (int(v) for v in np.asarray(pair))
  return f'{a:08x}{b:08x}'


def tree_digests(tree: Any, mesh: Mesh) -> dict[str, str]:
  """{jax.tree_util.keystr(path): digest} of every array leaf of `tree` (a global, possibly
  multi-process sharded pytree). Collective: every process must call it with the same tree."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(p) for p, _ in flat]
  leaves = [leaf for _, leaf in flat]
  out = _digests_fn(mesh)(leaves)
  return {p: _hex(d) for p, d in zip(paths, jax.device_get(out))}


@functools.lru_cache(maxsize=8)
def _digests_fn(mesh: Mesh):
  """The jitted digest of a list of arrays (one per mesh: compiled once per state structure)."""
  return jax.jit(lambda ls: [_leaf_digest(x) for x in ls], out_shardings=NamedSharding(mesh, P()))


def numpy_digest(x: np.ndarray) -> str:
  """The digest of a host array (same value as `tree_digests` gives for it on devices)."""
  x = np.asarray(x)
  if x.dtype == np.bool_:
    u = x.astype(np.uint32)
  else:
    size = x.dtype.itemsize
    kinds = {4: np.uint32, 2: np.uint16, 1: np.uint8, 8: np.uint32}
    if size not in kinds:
      raise TypeError(f'no digest for dtype {x.dtype}')
    u = np.ascontiguousarray(x).view(kinds[size]).astype(np.uint32)
    if size == 8:
      u = u.reshape(x.shape + (2,))
  u = u.reshape(-1)
  index = np.arange(u.size, dtype=np.uint64).astype(np.uint32)
  with np.errstate(over='ignore'):
    s1 = np.sum(u * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint32)
    h = (u ^ (index * np.uint32(_GOLDEN))) * np.uint32(_MIX)
    h = h ^ (h >> np.uint32(13))
    s2 = np.sum(h, dtype=np.uint32)
  return f'{int(s1):08x}{int(s2):08x}'
