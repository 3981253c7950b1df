"""Load released DOLG weights and ImageNet backbones into our Flax variables.

Formats read by `load(path) -> (model, variables)`:
  * the official pycls container `.pyth` (a dict with "model_state", and possibly "epoch",
    "optimizer_state", "cfg", ...), read with torch;
  * a raw torch state dict `.pth` (keys may carry DataParallel's `module.` prefix), read with torch;
  * a directory written by `python -m dolg_jax.convert` (config.json + variables.msgpack
    [+ head.msgpack]), read WITHOUT torch.

The architecture is inferred from the keys and shapes: depth (50/101 from the number of `s3` blocks),
stem width, multi-atrous present (`localmodel.aspp.*`), learnable GeM p (`pool_g.p`) and the widths of
f_g, f_l and the descriptor. Layouts: conv OIHW -> HWIO, Linear (out, in) -> (in, out), BN
weight/bias/running_mean/running_var -> scale/bias (params) and mean/var (batch_stats). The official
model reads BGR images, ours RGB: the stem conv's input channels are reversed on import, and our
in-model normalisation (RGB /255, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)) is the
official BGR normalisation with its channels reordered, so `model.apply(variables, rgb_images)` gives
the official `global_feature` of the same images.

The margin head (`desc_cls.weight` (classes, 512) and CurricularFace's EMA `desc_cls.t`) is not part
of the model's variables (the margin is a pure function, see dolg_jax.models.margins); `load_head`
returns it for fine-tuning.

ImageNet initialisation: `load_backbone(path)` reads a pycls `R-50-1x64d` / `R-101-1x64d` checkpoint
(keys `stem.*`, `s{i}.b{j}.*`, classifier `head.fc.*` ignored), a torchvision ResNet-50/101 state
dict (`conv1`, `bn1`, `layer{i}.{j-1}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1}`, `fc.*` ignored), the
backbone of a DOLG checkpoint, or a converted directory. pycls trained on BGR images normalised with
the BGR mean/std, so its stem channels are reversed like DOLG's. torchvision trained on RGB /255
normalised with the RGB mean/std, which is exactly our in-model normalisation: its weights are used
as they are (no reversal) and give torchvision's features. `merge_backbone(variables, backbone)` puts
the result into freshly initialised model variables.

Every failure raises a `CheckpointError` (a ValueError) naming the file and, where it applies, the
keys: unreadable/truncated file, not a state dict, unknown keys, missing keys, shape mismatches.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization

CONFIG_FILE = 'config.json'
VARIABLES_FILE = 'variables.msgpack'
HEAD_FILE = 'head.msgpack'
FORMAT_NAME = 'dolg_jax.converted'
FORMAT_VERSION = 1

DEPTH_FROM_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}
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
    super().__init__(path, f'{len(self.keys)} unknown key(s): {_list(self.keys)}')


class MissingKeysError(CheckpointError):
  """The (inferred) model needs keys that the checkpoint lacks."""

  def __init__(self, path: Any, keys: list[str]):
    self.keys = sorted(keys)
    super().__init__(path, f'{len(self.keys)} missing key(s): {_list(self.keys)}')


class ShapeMismatchError(CheckpointError):
  """Tensors whose shapes differ from what the (inferred) model expects."""

  def __init__(self, path: Any, mismatches: list[tuple[str, tuple, tuple]]):
    self.mismatches = sorted(mismatches)
    lines = [f'{k}: expected {tuple(e)}, got {tuple(g)}' for k, e, g in self.mismatches]
    super().__init__(path, 'shape mismatch: ' + '; '.join(lines))


def _list(keys: list[str], limit: int = 20) -> str:
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
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(path, 'reading .pth/.pyth files needs torch (pip install '
                          'torch); converted directories (python -m dolg_jax.convert) do not') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=not allow_pickle)
  except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
    if 'weights only load failed' in str(e).lower() and not allow_pickle:
      raise CheckpointError(path, 'it holds Python objects besides tensors and cannot be read '
                            'safely; if you trust the file, pass allow_pickle=True '
                            f'(convert: --allow-pickle). torch said: {str(e)[:500]}') from e
    raise CheckpointError(path, f'cannot read it as a torch checkpoint (truncated or not a '
                          f'torch file?): {type(e).__name__}: {str(e)[:500]}') from e
  if isinstance(obj, Mapping) and 'model_state' in obj:
    obj = obj['model_state']
  elif isinstance(obj, Mapping) and 'state_dict' in obj and isinstance(obj['state_dict'], Mapping):
    obj = obj['state_dict']
  if not isinstance(obj, Mapping) or not obj:
    raise CheckpointError(path, f'not a state dict or a pycls container with "model_state" '
                          f'(got {type(obj).__name__})')
  bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
  if bad:
    raise CheckpointError(path, f'not a state dict: entries that are not named tensors: '
                          f'{_list(bad)}')
  keys = list(obj)
  if all(k.startswith('module.') for k in keys):
    keys = [k[len('module.'):] for k in keys]
  return {k: v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy()
          for k, v in zip(keys, obj.values())}


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
    return ('batch_stats', *modules, leaf[len('running_'):])
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


def _flatten(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _unflatten(flat: Mapping[Path, Any]) -> dict:
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def state_dict_to_variables(sd: StateDict, expected: Mapping[Path, tuple], *, source: Any,
                            reverse_bgr: bool = True) -> dict:
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
  missing = [flax_path_to_torch(p) for p in expected if p not in flat and
             not any(m[0] == flax_path_to_torch(p) for m in mismatches)]
  if missing:
    raise MissingKeysError(source, missing)
  if mismatches:
    raise ShapeMismatchError(source, mismatches)
  return _unflatten(flat)


# --------------------------------------------------------------------------- architecture inference
def _block_counts(sd: Mapping[str, Any], prefix: str) -> tuple[int, ...]:
  counts = []
  for i in range(1, 5):
    blocks = {int(m.group(1)) for k in sd for m in [re.match(rf'{re.escape(prefix)}s{i}\.b(\d+)\.', k)]
              if m}
    counts.append(max(blocks) if blocks else 0)
  return tuple(counts)


def _require(sd: Mapping[str, Any], key: str, source: Any) -> np.ndarray:
  if key not in sd:
    raise MissingKeysError(source, [key])
  return sd[key]


def infer_backbone(sd: Mapping[str, np.ndarray], source: Any, prefix: str = ''
                   ) -> tuple[int, int, tuple[int, ...]]:
  """(depth, width, stage_depths) of a pycls-keyed ResNet under `prefix`.

  stage_depths is () for the standard depths (50, 101, 152) and the block counts otherwise (then
  depth is 50 and ignored by the model).
  """
  width = int(_require(sd, f'{prefix}stem.conv.weight', source).shape[0])
  counts = _block_counts(sd, prefix)
  if counts in DEPTH_FROM_BLOCKS:
    return DEPTH_FROM_BLOCKS[counts], width, ()
  if min(counts) < 1:
    raise CheckpointError(source, f'cannot infer the ResNet: blocks per stage {counts} (keys '
                          f'{prefix}s1..s4.bK); every stage needs at least one block')
  return 50, width, counts


def default_model_config() -> ml_collections.ConfigDict:
  """The released-checkpoint architecture (R50, no multi-atrous, learnable p) with paper widths:
  the DOLG module's defaults (the paper's), which configs/default.py repeats, with those two changes."""
  from dolg_jax import models  # pylint: disable=g-import-not-at-top
  fields = {f: getattr(models.DOLG, f) for f in models.MODEL_FIELDS}
  m = ml_collections.ConfigDict(fields)
  m.use_multi_atrous = False
  m.gem_p_learnable = True
  return m


def infer_model_config(sd: Mapping[str, np.ndarray], source: Any = '<state dict>'
                       ) -> ml_collections.ConfigDict:
  """The model config of an official DOLG state dict (keys without `module.`)."""
  if not any(k.startswith('globalmodel.') for k in sd):
    hint = (' (it looks like an ImageNet backbone: use pretrained.load_backbone)'
            if any(k.startswith(('stem.', 'conv1.', 'layer1.')) for k in sd) else '')
    raise CheckpointError(source, f'not a DOLG state dict: no "globalmodel.*" keys{hint}; '
                          f'first keys: {_list(list(sd), 5)}')
  m = default_model_config()
  m.depth, m.width, m.stage_depths = infer_backbone(sd, source, 'globalmodel.')
  m.global_dim = int(_require(sd, 'fc_t.weight', source).shape[0])
  m.embedding_dim = int(_require(sd, 'fc.weight', source).shape[0])
  m.gem_p_learnable = 'pool_g.p' in sd
  if m.gem_p_learnable:
    m.gem_p = float(np.asarray(sd['pool_g.p']).reshape(-1)[0])
  m.use_local_branch = any(k.startswith('localmodel.') for k in sd)
  m.use_multi_atrous = any(k.startswith('localmodel.aspp.') for k in sd)
  if m.use_local_branch:
    m.local_dim = int(_require(sd, 'localmodel.conv1.weight', source).shape[0])
  if m.use_multi_atrous:
    m.atrous_dim = int(_require(sd, 'localmodel.aspp.aspp.0.weight', source).shape[0])
    n_atrous = len({k.split('.')[3] for k in sd if k.startswith('localmodel.aspp.aspp.')}) - 1
    if n_atrous != len(m.atrous_rates):
      raise CheckpointError(source, f'{n_atrous} dilated multi-atrous convolutions '
                            f'(localmodel.aspp.aspp.1..); only the official 3 (rates 6, 12, 18) '
                            f'can be imported')
  return m


# ------------------------------------------------------------------------------------ model side
def _build(cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32):
  from dolg_jax import models  # pylint: disable=g-import-not-at-top
  return models.build_model(cfg, dtype)


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(cfg_json: str) -> tuple[tuple[Path, tuple], ...]:
  cfg = _config_from_json(json.loads(cfg_json))
  model = _build(cfg)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return tuple((p, tuple(v.shape)) for p, v in _flatten(shapes).items())


def expected_shapes(cfg: ml_collections.ConfigDict) -> dict[Path, tuple]:
  """Flax variable path -> shape of the model built from `cfg` (no computation)."""
  return dict(_expected_shapes_cached(json.dumps(_config_to_json(cfg), sort_keys=True)))


def _config_to_json(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json())


def _config_from_json(d: Mapping) -> ml_collections.ConfigDict:
  m = default_model_config()
  m.update({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
  return m


def _to_jax(tree):
  return jax.tree.map(jnp.asarray, tree)


# -------------------------------------------------------------------------------- converted dirs
def is_converted_dir(path: str | os.PathLike) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_converted(out_dir: str | os.PathLike, cfg: ml_collections.ConfigDict, variables: Mapping,
                   head: Mapping | None = None, *, source: str = '') -> None:
  """Writes config.json, variables.msgpack and (if given) head.msgpack into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  np_vars = jax.tree.map(np.asarray, dict(variables))
  with open(os.path.join(out_dir, VARIABLES_FILE), 'wb') as f:
    f.write(serialization.msgpack_serialize(np_vars))
  head_path = os.path.join(out_dir, HEAD_FILE)
  if head is not None:
    with open(head_path, 'wb') as f:
      f.write(serialization.msgpack_serialize(jax.tree.map(np.asarray, dict(head))))
  elif os.path.exists(head_path):
    os.remove(head_path)  # a stale head from an earlier conversion
  meta = {'format': FORMAT_NAME, 'version': FORMAT_VERSION, 'source': str(source),
          'has_head': head is not None, 'model': _config_to_json(cfg)}
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
    json.dump(meta, f, indent=2, sort_keys=True)


def _read_converted_meta(path: str) -> dict:
  cfg_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(cfg_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(cfg_path, f'unreadable: {e}') from e
  if meta.get('format') != FORMAT_NAME or 'model' not in meta:
    raise CheckpointError(cfg_path, f'not a {FORMAT_NAME} config (format={meta.get("format")!r})')
  if meta.get('version') != FORMAT_VERSION:
    raise CheckpointError(cfg_path, f'unsupported version {meta.get("version")!r}')
  return meta


def _read_msgpack(path: str) -> dict:
  try:
    with open(path, 'rb') as f:
      tree = serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises several types on truncated data
    raise CheckpointError(path, f'unreadable or truncated msgpack: {type(e).__name__}: {e}') from e
  if not isinstance(tree, Mapping):
    raise CheckpointError(path, f'expected a dict of arrays, got {type(tree).__name__}')
  return tree


def _load_converted(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  meta = _read_converted_meta(path)
  cfg = _config_from_json(meta['model'])
  var_path = os.path.join(path, VARIABLES_FILE)
  flat = _flatten(_read_msgpack(var_path))
  expected = expected_shapes(cfg)
  unknown = ['/'.join(p) for p in flat if p not in expected]
  if unknown:
    raise UnknownKeysError(var_path, unknown)
  missing = ['/'.join(p) for p in expected if p not in flat]
  if missing:
    raise MissingKeysError(var_path, missing)
  bad = [('/'.join(p), expected[p], tuple(np.shape(v))) for p, v in flat.items()
         if tuple(np.shape(v)) != tuple(expected[p])]
  if bad:
    raise ShapeMismatchError(var_path, bad)
  return cfg, _unflatten(flat)


# ----------------------------------------------------------------------------------- public API
def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> StateDict:
  """The torch state dict (numpy values, no `module.` prefix) of a `.pth`/`.pyth` file."""
  return read_torch_state_dict(path, allow_pickle=allow_pickle)


def convert_state_dict(sd: StateDict, source: Any = '<state dict>'
                       ) -> tuple[ml_collections.ConfigDict, dict, dict | None]:
  """(model config, variables {'params','batch_stats'} as numpy, head or None) of a DOLG state dict."""
  cfg = infer_model_config(sd, source)
  head_sd = {k: v for k, v in sd.items() if k.startswith('desc_cls.')}
  body = {k: v for k, v in sd.items() if not k.startswith('desc_cls.')}
  variables = state_dict_to_variables(body, expected_shapes(cfg), source=source)
  variables.setdefault('batch_stats', {})
  head = None
  if head_sd:
    unknown = sorted(set(head_sd) - {'desc_cls.weight', 'desc_cls.t'})
    if unknown:
      raise UnknownKeysError(source, unknown)
    weight = _require(head_sd, 'desc_cls.weight', source)
    if weight.ndim != 2 or weight.shape[1] != cfg.embedding_dim:
      raise ShapeMismatchError(source, [('desc_cls.weight', ('num_classes', cfg.embedding_dim),
                                         tuple(weight.shape))])
    head = {'weight': np.asarray(weight, np.float32)}
    if 'desc_cls.t' in head_sd:
      head['t'] = np.asarray(head_sd['desc_cls.t'], np.float32).reshape(())
  return cfg, variables, head


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32, allow_pickle: bool = False):
  """(model, variables) of a released DOLG checkpoint (.pyth/.pth) or a converted directory.

  `model.apply(variables, images)` with float32 RGB images in [0, 255] (N, H, W, 3) returns the
  official (N, 512) `global_feature` (before L2 normalisation). `dtype` is the model's compute
  dtype (e.g. 'bfloat16'); variables stay float32. `allow_pickle`: see `read_torch_state_dict`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if not is_converted_dir(path):
      raise CheckpointError(path, f'a directory without {CONFIG_FILE}: not written by '
                            f'python -m dolg_jax.convert')
    cfg, variables = _load_converted(path)
  else:
    cfg, variables, _ = convert_state_dict(
        read_torch_state_dict(path, allow_pickle=allow_pickle), path)
  return _build(cfg, dtype), _to_jax(variables)


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The inferred model config of a checkpoint (file or converted directory)."""
  path = os.fspath(path)
  if is_converted_dir(path):
    return _config_from_json(_read_converted_meta(path)['model'])
  return infer_model_config(read_torch_state_dict(path), path)


def load_head(path: str | os.PathLike) -> dict | None:
  """The margin head {'weight': (num_classes, dim), 't': ()} of a checkpoint, or None if absent.

  `weight` is in the layout of dolg_jax.models.margins (class dimension first, like torch);
  `t` is CurricularFace's EMA statistic (absent in checkpoints without it).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    meta = _read_converted_meta(path)
    if not meta.get('has_head'):
      return None
    head = _read_msgpack(os.path.join(path, HEAD_FILE))
    return {k: jnp.asarray(v) for k, v in head.items()}
  _, _, head = convert_state_dict(read_torch_state_dict(path), path)
  return None if head is None else {k: jnp.asarray(v) for k, v in head.items()}


# --------------------------------------------------------------------------------- ImageNet init
_TV_BLOCK = {'conv1': 'f.a', 'conv2': 'f.b', 'conv3': 'f.c', 'bn1': 'f.a_bn', 'bn2': 'f.b_bn',
             'bn3': 'f.c_bn', 'downsample.0': 'proj', 'downsample.1': 'bn'}


def torchvision_to_pycls_key(key: str) -> str | None:
  """torchvision ResNet key -> pycls key; None for the classifier (`fc.*`)."""
  if key.startswith('fc.'):
    return None
  if key.startswith('conv1.'):
    return 'stem.conv.' + key[len('conv1.'):]
  if key.startswith('bn1.'):
    return 'stem.bn.' + key[len('bn1.'):]
  m = re.match(r'layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.(.+)$', key)
  if not m or m.group(3) not in _TV_BLOCK:
    return key  # reported as unknown later
  return f's{m.group(1)}.b{int(m.group(2)) + 1}.{_TV_BLOCK[m.group(3)]}.{m.group(4)}'


def pycls_to_torchvision_key(key: str) -> str:
  """Inverse of `torchvision_to_pycls_key` (for messages)."""
  m = re.match(r'stem\.(conv|bn)\.(.+)$', key)
  if m:
    return f'{"conv1" if m.group(1) == "conv" else "bn1"}.{m.group(2)}'
  inverse = {v: k for k, v in _TV_BLOCK.items()}
  m = re.match(r's(\d+)\.b(\d+)\.(f\.\w+|proj|bn)\.(.+)$', key)
  if not m or m.group(3) not in inverse:
    return key
  return f'layer{m.group(1)}.{int(m.group(2)) - 1}.{inverse[m.group(3)]}.{m.group(4)}'


def _backbone_expected(depth: int, width: int, stage_depths: tuple[int, ...]
                       ) -> dict[Path, tuple]:
  cfg = default_model_config()
  cfg.depth, cfg.width, cfg.stage_depths = depth, width, tuple(stage_depths)
  cfg.local_dim = cfg.global_dim = 16 * width
  return {p: s for p, s in expected_shapes(cfg).items() if p[1] == 'globalmodel'}


def load_backbone(path: str | os.PathLike) -> dict:
  """ImageNet (or DOLG) backbone weights as {'params': {'globalmodel': ...}, 'batch_stats': ...}.

  Reads pycls (`stem.*`, `s{i}.b{j}.*`; `head.*` ignored; BGR -> stem channels reversed),
  torchvision (`conv1`, `layer{i}.*`; `fc.*` ignored; RGB, used as is), a DOLG checkpoint
  (`globalmodel.*`; everything else ignored) or a converted directory. Use `merge_backbone` to put
  the result into initialised model variables. Depth and width come from the keys.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    _, variables = _load_converted(path) if is_converted_dir(path) else (None, None)
    if variables is None:
      raise CheckpointError(path, f'a directory without {CONFIG_FILE}')
    return _to_jax({c: {'globalmodel': t['globalmodel']} for c, t in variables.items()})
  sd = read_torch_state_dict(path)
  if any(k.startswith('globalmodel.') for k in sd):
    kind, reverse = 'dolg', True
    sd = {k[len('globalmodel.'):]: v for k, v in sd.items() if k.startswith('globalmodel.')}
  elif 'conv1.weight' in sd or any(k.startswith('layer1.') for k in sd):
    kind, reverse = 'torchvision', False
    renamed = {}
    for k, v in sd.items():
      new = torchvision_to_pycls_key(k)
      if new is not None:
        renamed[new] = v
    sd = renamed
  elif 'stem.conv.weight' in sd:
    kind, reverse = 'pycls', True
    sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
  else:
    raise CheckpointError(path, f'not a ResNet backbone state dict (pycls `stem.*`, torchvision '
                          f'`conv1.*` or DOLG `globalmodel.*`); first keys: {_list(list(sd), 5)}')
  depth, width, stage_depths = infer_backbone(sd, path)
  sd = {'globalmodel.' + k: v for k, v in sd.items()}
  try:
    variables = state_dict_to_variables(sd, _backbone_expected(depth, width, stage_depths),
                                        source=path, reverse_bgr=reverse)
  except (UnknownKeysError, MissingKeysError, ShapeMismatchError) as e:
    # Name the keys as the file does (the mapping above prefixed/renamed them).
    def name(k: str) -> str:
      k = k[len('globalmodel.'):]
      return {'dolg': 'globalmodel.' + k, 'pycls': k}.get(kind) or pycls_to_torchvision_key(k)
    if isinstance(e, ShapeMismatchError):
      raise ShapeMismatchError(path, [(name(k), a, b) for k, a, b in e.mismatches]) from e
    raise type(e)(path, [name(k) for k in e.keys]) from e
  return _to_jax(variables)


def merge_backbone(variables: Mapping, backbone: Mapping) -> dict:
  """A copy of `variables` with every leaf present in `backbone` replaced (shapes must agree)."""
  flat = _flatten(variables)
  bad_path, bad_shape = [], []
  for p, v in _flatten(backbone).items():
    if p not in flat:
      bad_path.append('/'.join(p))
    elif tuple(np.shape(flat[p])) != tuple(np.shape(v)):
      bad_shape.append(('/'.join(p), tuple(np.shape(flat[p])), tuple(np.shape(v))))
    else:
      flat[p] = jnp.asarray(v, dtype=jnp.result_type(flat[p]))
  if bad_path:
    raise UnknownKeysError('<backbone>', bad_path)
  if bad_shape:
    raise ShapeMismatchError('<backbone>', bad_shape)
  return _unflatten(flat)
