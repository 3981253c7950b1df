"""Torch state dicts: reading `.pyth`/`.pth` files and mapping their keys/layouts onto Flax.

`read_torch_state_dict(path)` reads an official pycls container (`{"model_state": ...}`) or a raw
state dict (DataParallel's `module.` prefix stripped) as float32 numpy arrays; torch is imported
here only. `state_dict_to_variables(sd, expected)` maps torch names and layouts (conv OIHW -> HWIO,
Linear (out, in) -> (in, out), BN weight/bias/running_* -> scale/bias and mean/var; the stem's
input channels reversed for BGR-trained checkpoints) onto Flax variable paths, checked against the
expected path -> shape map. Every failure raises a `CheckpointError` (a ValueError) naming the file
and keys: `UnknownKeysError`, `MissingKeysError`, `ShapeMismatchError`, or an unreadable file
(`weights.torch_inspect` says whether it is damaged / not torch or holds Python objects, which
need `--allow_pickle`, for trusted files only).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from dolg_jax.weights import torch_inspect

# Keys present in torch checkpoints that carry no information for our variables.
_IGNORED_SUFFIXES = ('num_batches_tracked',)

StateDict = dict[str, np.ndarray]
Path = tuple[str, ...]


# ----------------------------------------------------------------------------------------- errors
class CheckpointError(ValueError):
  """A checkpoint could not be read or does not fit the model; names the file (and keys)."""

  def __init__(self, path: Any, message: str):
    self.path = str(path)
    super().__init__(f'{self.path}: {message}')


class UnknownKeysError(CheckpointError):
  """The checkpoint has keys that the (inferred) model does not have."""

  def __init__(self, path: Any, keys: list[str]):
    self.keys = sorted(keys)
    super().__init__(path, f'{len(self.keys)} unknown key(s): {format_keys(self.keys)}')


class MissingKeysError(CheckpointError):
  """The (inferred) model needs keys that the checkpoint lacks."""

  def __init__(self, path: Any, keys: list[str]):
    self.keys = sorted(keys)
    super().__init__(path, f'{len(self.keys)} missing key(s): {format_keys(self.keys)}')


class ShapeMismatchError(CheckpointError):
  """Tensors whose shapes differ from what the (inferred) model expects."""

  def __init__(self, path: Any, mismatches: list[tuple[str, tuple, tuple]]):
    self.mismatches = sorted(mismatches)
    lines = [f'{k}: expected {tuple(e)}, got {tuple(g)}' for k, e, g in self.mismatches]
    super().__init__(path, 'shape mismatch: ' + '; '.join(lines))


def format_keys(keys: list[str], limit: int = 20) -> str:
  shown = ', '.join(repr(k) for k in keys[:limit])
  return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


# ------------------------------------------------------------------------------ reading torch files
def read_torch_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> StateDict:
  """Reads a `.pyth` container or a raw state dict with torch; returns float32 numpy arrays.

  Strips a DataParallel `module.` prefix. Torch is imported here only. Files are unpickled with
  `weights_only=True` (tensors, dicts, numbers, strings); `allow_pickle=True` lifts that for files
  holding other Python objects -- only for files you trust, since unpickling can run code.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(path, 'no such file')
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(
      path,
      'reading .pth/.pyth files needs torch (pip install torch); '
      'converted directories (python -m dolg_jax.convert) do not',
    ) from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
    raise CheckpointError(path, _load_failure(path, e, allow_pickle)) from e
  if isinstance(obj, Mapping) and 'model_state' in obj:
    obj = obj['model_state']
  elif isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointError(
      path, f'not a state dict or a pycls container with "model_state" (got {type(obj).__name__})'
    )
  bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
  if bad:
    raise CheckpointError(
      path, f'not a state dict: entries that are not named tensors: {format_keys(bad)}'
    )
  keys = list(obj)
  if all(k.startswith('module.') for k in keys):
    keys = [k[len('module.') :] for k in keys]
  return {
    k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
    for k, v in zip(keys, obj.values())
  }


def _load_failure(path: str, error: Exception, allow_pickle: bool) -> str:
  """Why torch.load failed: a damaged / non-torch file, or a torch file holding Python objects."""
  found = torch_inspect.inspect_file(path)
  if found.damage is not None:
    return (
      f'not a torch checkpoint, or a truncated / damaged one ({found.size:,} bytes: '
      f'{found.damage}); copy or download it again and compare its size and checksum with '
      'the source'
    )
  if found.objects and not allow_pickle:
    return (
      f'a torch checkpoint holding Python objects besides tensors '
      f'({format_keys(list(found.objects), 3)}); unpickling them can run code, so they are '
      'not read. If you trust the file, convert it once with `python -m dolg_jax.convert '
      f'--input {path} --output DIR --allow_pickle` and load DIR'
    )
  return (
    f'torch cannot read it ({found.size:,} bytes; truncated?): {type(error).__name__}: '
    f'{str(error).splitlines()[0][:300] if str(error) else ""}'
  )


# ---------------------------------------------------------------------------- key/layout mapping
def _module_path(torch_module: str) -> list[str]:
  """Torch module path (dotted) -> Flax module names."""
  m = re.sub(r'(s\d+\.b\d+)\.f\.', r'\1.', torch_module)
  m = re.sub(r'(^|\.)aspp\.aspp\.(\d+)$', r'\1aspp.aspp_\2', m)
  m = re.sub(r'(^|\.)im_pool\.1$', r'\1im_pool', m)
  m = re.sub(r'(^|\.)conv_after\.0$', r'\1conv_after', m)
  return m.split('.')


def _torch_module(flax_modules: Path) -> str:
  """Inverse of `_module_path`."""
  m = '.'.join(flax_modules)
  m = re.sub(r'(s\d+\.b\d+)\.(a|b|c|a_bn|b_bn|c_bn)$', r'\1.f.\2', m)
  m = re.sub(r'aspp_(\d+)$', r'aspp.\1', m)
  m = re.sub(r'im_pool$', 'im_pool.1', m)
  m = re.sub(r'conv_after$', 'conv_after.0', m)
  return m


def torch_key_to_flax(key: str, ndim: int) -> Path | None:
  """('params'|'batch_stats', *modules, leaf) for a torch key; None when it is to be ignored."""
  parts = key.split('.')
  if parts[-1] in _IGNORED_SUFFIXES:
    return None
  if len(parts) < 2:
    return ('params', key)
  leaf = parts[-1]
  modules = _module_path('.'.join(parts[:-1]))
  if leaf == 'weight':
    return ('params', *modules, 'scale' if ndim == 1 else 'kernel')
  if leaf in ('running_mean', 'running_var'):
    return ('batch_stats', *modules, leaf[len('running_') :])
  return ('params', *modules, leaf)


def flax_path_to_torch(path: Path) -> str:
  """The official torch key of a Flax variable path (for messages)."""
  collection, *modules, leaf = path
  if collection == 'batch_stats':
    leaf = 'running_' + leaf
  else:
    leaf = {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)
  return f'{_torch_module(tuple(modules))}.{leaf}' if modules else leaf


def _torch_shape(path: Path, shape: tuple) -> tuple:
  """Flax shape -> torch layout (for messages in torch terms)."""
  if path[-1] == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == 'kernel' and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _to_flax_array(path: Path, value: np.ndarray, reverse_bgr: bool) -> np.ndarray:
  if path[-1] == 'kernel' and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if reverse_bgr and path[-3:-1] == ('stem', 'conv'):
      value = value[:, :, ::-1, :]  # BGR -> RGB input channels
  elif path[-1] == 'kernel' and value.ndim == 2:
    value = value.T  # (out, in) -> (in, out)
  return np.ascontiguousarray(value, dtype=np.float32)


def flatten_tree(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten_tree(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten_tree(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def state_dict_to_variables(
  sd: StateDict, expected: Mapping[Path, tuple], *, source: Any, reverse_bgr: bool = True
) -> dict:
  """Maps torch tensors onto Flax variables and checks them against `expected` path -> shape.

  Raises UnknownKeysError, MissingKeysError or ShapeMismatchError (in that order of checking).
  """
  flat, unknown, mismatches = {}, [], []
  for key, value in sd.items():
    path = torch_key_to_flax(key, value.ndim)
    if path is None:
      continue
    if path not in expected:
      unknown.append(key)
      continue
    arr = _to_flax_array(path, value, reverse_bgr)
    if tuple(arr.shape) != tuple(expected[path]):
      mismatches.append((key, _torch_shape(path, tuple(expected[path])), tuple(value.shape)))
      continue
    flat[path] = arr
  if unknown:
    raise UnknownKeysError(source, unknown)
  missing = [
    flax_path_to_torch(p)
    for p in expected
    if p not in flat and not any(m[0] == flax_path_to_torch(p) for m in mismatches)
  ]
  if missing:
    raise MissingKeysError(source, missing)
  if mismatches:
    raise ShapeMismatchError(source, mismatches)
  return unflatten_tree(flat)


def require_key(sd: Mapping[str, Any], key: str, source: Any) -> np.ndarray:
  if key not in sd:
    raise MissingKeysError(source, [key])
  return sd[key]
