"""Export the single-scale descriptor function for serving: ONNX (jax2onnx) and `jax.export`.

  summary = run(config, workdir=... | checkpoint=..., out_dir=EXPORT_DIR)

Writes EXPORT_DIR/model.onnx (opset 23, input `images`, output `descriptor`), model.jax_export
(`jax.export` bytes for cpu and cuda) and, last, export.json (what was exported and the check
figures; `verified: true` only when both artifacts match the JAX model, else `ExportMismatchError`
above `TOLERANCE`). Both take float32 RGB (N, H, W, 3) in [0, 255], N, H, W dynamic (H, W >= 64;
other shapes fail with `Input shapes do not match the`) and return the (N, embedding_dim) float32
L2-normalised descriptor at ONE scale, as evaluation's extraction. Files are written atomically.
Full contract and how the ONNX graph is made: docs/design_notes.md.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jax_core
import jax2onnx
from jax2onnx.plugins import plugin_system
import ml_collections
import numpy as np
import onnx
import onnxruntime

from dolg_jax import atomic
from dolg_jax import models
from dolg_jax import versions
from dolg_jax.models.normalize import l2_normalize
from dolg_jax.retrieval import evaluate

ONNX_FILE = 'model.onnx'
JAX_EXPORT_FILE = 'model.jax_export'
SUMMARY_FILE = 'export.json'
PLATFORMS = ('cpu', 'cuda')
MIN_SIDE = 64
INPUT_NAME = 'images'
OUTPUT_NAME = 'descriptor'
ONNX_OPSET = 23
TOLERANCE = 1e-4
# (N, H, W) of the verification batches: the smallest allowed size, batch 2 at odd sizes, a
# non-square one.
VERIFY_SHAPES = ((1, 64, 64), (2, 97, 131), (1, 160, 224))


class ExportMismatchError(ValueError):
  """An exported model disagrees with the JAX model beyond the tolerance."""


# --------------------------------------------------------------------------------- the function
def export_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the evaluation compute dtype set to float32 (the exported precision)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval.compute_dtype = 'float32'
  return config


def descriptor_fn(apply_fn: Callable, variables: Any) -> Callable[[jax.Array], jax.Array]:
  """images (N, H, W, 3) float32 in [0, 255] -> (N, D) float32 L2-normalised (as extraction)."""

  def fn(images):
    return l2_normalize(apply_fn(variables, images).astype(jnp.float32))

  return fn


SHAPE_CONSTRAINTS = ('N >= 1', f'H >= {MIN_SIDE}', f'W >= {MIN_SIDE}')
GUARD_NAME = 'Input shapes do not match the symbolic shape constraints ' + ', '.join(
  SHAPE_CONSTRAINTS
)


def input_spec() -> jax.ShapeDtypeStruct:
  """The symbolic input: float32 (N, H, W, 3), N >= 1, H and W >= MIN_SIDE."""
  shape = jax.export.symbolic_shape('N, H, W, 3', constraints=SHAPE_CONSTRAINTS)
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def jax_input_spec() -> jax.ShapeDtypeStruct:
  """input_spec for jax.export: the same bounds as dimension variables of at least 1, which
  `Exported.call` checks first (a constraint is checked only after shape refinement, which a
  side under 64 breaks inside the model with 'Error refining shapes')."""
  shape = jax.export.symbolic_shape(
    f'N, H_minus_{MIN_SIDE - 1} + {MIN_SIDE - 1}, W_minus_{MIN_SIDE - 1} + {MIN_SIDE - 1}, 3'
  )
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def export_jax(fn: Callable) -> bytes:
  """`jax.export` of `fn` for PLATFORMS with the symbolic input (`jax_input_spec`), serialized."""
  exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(jax_input_spec())
  return bytes(exported.serialize())


# ------------------------------------------------------------------------------------- ONNX
def _max_pool_nchw(
  x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation
):
  """The 4-D NHWC max reduce-window (unit window on N and C) as a 3-D one over (N*C, H, W)."""
  n, h, w, c = x.shape
  y = jnp.transpose(x, (0, 3, 1, 2)).reshape(n * c, h, w)
  y = lax.reduce_window(
    y,
    -jnp.inf,
    lax.max,
    (1,) + tuple(window_dimensions[1:3]),
    (1,) + tuple(window_strides[1:3]),
    ((0, 0),) + tuple(padding[1:3]),
    base_dilation=(1,) + tuple(base_dilation[1:3]),
    window_dilation=(1,) + tuple(window_dilation[1:3]),
  )
  return jnp.transpose(y.reshape(n, c, y.shape[1], y.shape[2]), (0, 2, 3, 1))


def _is_nhwc_pool(eqn) -> bool:
  p = eqn.params
  return (
    eqn.primitive is lax.reduce_window_max_p
    and len(p['window_dimensions']) == 4
    and p['window_dimensions'][0] == p['window_dimensions'][3] == 1
    and p['window_strides'][0] == p['window_strides'][3] == 1
    and tuple(p['padding'][0]) == tuple(p['padding'][3]) == (0, 0)
    and p['base_dilation'][0] == p['base_dilation'][3] == 1
    and p['window_dilation'][0] == p['window_dilation'][3] == 1
  )


def _replay(jaxpr, consts, *args) -> list:
  """Evaluates `jaxpr` primitive by primitive (nested jit inlined), rewriting NHWC max pools."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if _is_nhwc_pool(eqn):
      outs = [_max_pool_nchw(*invals, **eqn.params)]
    elif eqn.primitive is lax.rem_p and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.integer):
      a, b = invals  # jax2onnx's rem lowering needs static shapes; this is the same integers
      outs = [a - lax.div(a, b) * b]
    elif eqn.primitive.name in ('jit', 'pjit'):
      sub = eqn.params['jaxpr']
      outs = _replay(sub.jaxpr, sub.consts, *invals)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
    env.update(zip(eqn.outvars, outs))
  return [read(v) for v in jaxpr.outvars]


@contextlib.contextmanager
def _quiet_converter():
  """jax2onnx logs its settings on the root logger (info), a warning per optional plugin it cannot
  import, and prints debug lines on stdout; onnx_ir logs a warning per untyped shape helper. None
  concerns this graph; errors still show."""
  names = [
    n for n in list(logging.root.manager.loggerDict) if n.split('.')[0] in ('jax2onnx', 'onnx_ir')
  ] + ['jax2onnx', 'onnx_ir']
  loggers = [logging.getLogger(n) for n in names] + [logging.root]
  levels = [lg.level for lg in loggers]
  for lg in loggers[:-1]:
    lg.setLevel(logging.ERROR)
  logging.root.setLevel(max(logging.root.level, logging.WARNING))
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _load_jax_plugins() -> None:
  """Registers only jax2onnx's lowerings of JAX primitives (its `jax` plugin tree, ~3 s): the
  replayed jaxpr holds nothing else, while jax2onnx's own discovery imports every plugin tree
  (Flax, Equinox, dm_pix, examples: ~30 s on 2 busy cores, tracebacks for dm_pix). Without the
  helpers it uses (another jax2onnx version) it does nothing and that discovery runs instead.
  """
  if getattr(plugin_system, '_already_imported_plugins', True):
    return
  import_tree = getattr(plugin_system, '_import_tree', None)
  if import_tree is None:
    return
  import_tree(pathlib.Path(plugin_system.__file__).parent / 'jax', 'jax2onnx.plugins.jax')
  plugin_system._already_imported_plugins = True


def export_onnx(fn: Callable) -> onnx.ModelProto:
  """The ONNX model of `fn` (dynamic N, H, W: `input_spec`), via a traced jaxpr
  (docs/design_notes.md)."""
  spec = input_spec()
  closed = jax.make_jaxpr(fn)(spec)

  def replayed(images):
    return _replay(closed.jaxpr, closed.consts, images)[0]

  with _quiet_converter():
    _load_jax_plugins()
    return guard_shape(
      jax2onnx.to_onnx(
        replayed,
        [spec],
        model_name='dolg_descriptor',
        opset=ONNX_OPSET,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
      )
    )


def guard_shape(model: onnx.ModelProto) -> onnx.ModelProto:
  """Adds to `model` the shape check jax.export makes: the output plus the sum of a zero tensor of
  length min(N - 1, H - 64, W - 64), whose negative length stops onnxruntime at the node named
  GUARD_NAME (ONNX has no assertion; x + 0.0 leaves every descriptor unchanged)."""
  graph = model.graph
  unchecked = f'{OUTPUT_NAME}_unchecked'
  for node in graph.node:
    node.output[:] = [unchecked if o == OUTPUT_NAME else o for o in node.output]
  h = onnx.helper
  graph.initializer.append(
    h.make_tensor('guard_min', onnx.TensorProto.INT64, [3], [1, MIN_SIDE, MIN_SIDE])
  )
  graph.node.extend(
    [
      h.make_node('Shape', [INPUT_NAME], ['guard_shape'], end=3),
      h.make_node('Sub', ['guard_shape', 'guard_min'], ['guard_margin']),
      h.make_node('ReduceMin', ['guard_margin'], ['guard_length'], keepdims=1),
      h.make_node(
        'ConstantOfShape',
        ['guard_length'],
        ['guard_zeros'],
        name=GUARD_NAME,
        value=h.make_tensor('zero', onnx.TensorProto.FLOAT, [1], [0.0]),
      ),
      h.make_node('ReduceSum', ['guard_zeros'], ['guard_zero'], keepdims=0),
      h.make_node('Add', [unchecked, 'guard_zero'], [OUTPUT_NAME]),
    ]
  )
  return model


def onnx_session(path: str) -> onnxruntime.InferenceSession:
  """A CPU onnxruntime session of the model at `path` (shape-merge warnings off)."""
  options = onnxruntime.SessionOptions()
  options.log_severity_level = 3
  return onnxruntime.InferenceSession(path, options, providers=['CPUExecutionProvider'])


def load_jax_export(path: str) -> jax.export.Exported:
  with open(path, 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


# ---------------------------------------------------------------------------- verification
def verification_images(
  shapes: Sequence[tuple[int, int, int]] = VERIFY_SHAPES, seed: int = 0
) -> list[np.ndarray]:
  """Random integer-valued float32 RGB batches (N, H, W, 3) in [0, 255], one per shape."""
  rng = np.random.RandomState(seed)
  return [rng.randint(0, 256, (n, h, w, 3)).astype(np.float32) for n, h, w in shapes]


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
  """max |out - ref| / max |ref| (inf when the shapes differ)."""
  out, ref = np.asarray(out), np.asarray(ref)
  if out.shape != ref.shape:
    return float('inf')
  return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def verify(
  fn: Callable,
  out_dir: str,
  shapes: Sequence[tuple[int, int, int]] = VERIFY_SHAPES,
  *,
  log: Callable[[str], None] = print,
) -> dict:
  """Runs OUT_DIR/model.onnx (onnxruntime) and OUT_DIR/model.jax_export against jit(fn).

  Returns {'shapes': [{'shape': [N, H, W], 'onnx': err, 'jax_export': err}, ...],
  'worst': {'onnx': err, 'jax_export': err}} with the relative errors of `relative_error`.
  """
  session = onnx_session(os.path.join(out_dir, ONNX_FILE))
  exported = load_jax_export(os.path.join(out_dir, JAX_EXPORT_FILE))
  reference = jax.jit(fn)
  rows = []
  for images in verification_images(shapes):
    ref = np.asarray(reference(images))
    errs = {
      'onnx': relative_error(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], ref),
      'jax_export': relative_error(np.asarray(exported.call(images)), ref),
    }
    rows.append({'shape': list(images.shape[:3]), **errs})
    log(
      f'verify {"x".join(map(str, images.shape[:3]))} (N x H x W): relative error '
      f'onnx {errs["onnx"]:.2e}, jax_export {errs["jax_export"]:.2e}'
    )
  worst = {k: max(r[k] for r in rows) for k in ('onnx', 'jax_export')}
  return {'shapes': rows, 'worst': worst}


# Recorded in export.json (with Python's version).
_PACKAGES = ('jax', 'jaxlib', 'jax2onnx', 'onnx', 'onnxruntime', 'numpy')


def export_model(
  fn: Callable,
  out_dir: str,
  *,
  verify_shapes=VERIFY_SHAPES,
  tolerance: float = TOLERANCE,
  info: Optional[dict] = None,
  log: Callable[[str], None] = print,
) -> dict:
  """Writes both artifacts of `fn` and export.json into `out_dir`, verifies them; the summary.

  Raises ExportMismatchError when an artifact's worst relative error exceeds `tolerance`.
  """
  os.makedirs(out_dir, exist_ok=True)
  summary_path = os.path.join(out_dir, SUMMARY_FILE)
  if os.path.exists(summary_path):  # an earlier export's record must not vouch for this one
    os.remove(summary_path)
  t0 = time.perf_counter()
  atomic.write_bytes(os.path.join(out_dir, JAX_EXPORT_FILE), export_jax(fn))
  t1 = time.perf_counter()
  model = export_onnx(fn)
  atomic.write_bytes(os.path.join(out_dir, ONNX_FILE), model.SerializeToString())
  t2 = time.perf_counter()
  log(f'wrote {JAX_EXPORT_FILE} ({t1 - t0:.1f} s) and {ONNX_FILE} ({t2 - t1:.1f} s) in {out_dir}')
  checks = verify(fn, out_dir, verify_shapes, log=log)
  summary = dict(info or {})
  summary.update(
    {
      'files': {'onnx': ONNX_FILE, 'jax_export': JAX_EXPORT_FILE},
      'input': {
        'name': INPUT_NAME,
        'shape': ['N', 'H', 'W', 3],
        'dtype': 'float32',
        'range': [0, 255],
        'channels': 'RGB',
        'min_side': MIN_SIDE,
        'constraints': list(SHAPE_CONSTRAINTS),
      },
      'output': {
        'name': OUTPUT_NAME,
        'shape': [
          'N',
          int(
            jax.eval_shape(fn, jax.ShapeDtypeStruct((1, MIN_SIDE, MIN_SIDE, 3), jnp.float32)).shape[
              1
            ]
          ),
        ],
        'dtype': 'float32',
        'l2_normalised': True,
      },
      'platforms': list(PLATFORMS),
      'onnx_opset': ONNX_OPSET,
      'tolerance': tolerance,
      'verification': checks,
      'versions': versions.package_versions(_PACKAGES),
      'seconds': {'jax_export': round(t1 - t0, 2), 'onnx': round(t2 - t1, 2)},
    }
  )
  bad = {k: v for k, v in checks['worst'].items() if not v <= tolerance}
  summary['verified'] = not bad
  atomic.write_json(summary_path, summary, indent=2, sort_keys=True)
  if bad:
    worst = ', '.join(f'{k} {v:.2e}' for k, v in bad.items())
    raise ExportMismatchError(
      f'the exported model disagrees with the JAX model: worst relative error {worst} > '
      f'{tolerance:g} (per shape in {os.path.join(out_dir, SUMMARY_FILE)}); do not serve '
      f'{out_dir}'
    )
  return summary


def run(
  config: ml_collections.ConfigDict,
  *,
  workdir: Optional[str] = None,
  checkpoint: Optional[str] = None,
  out_dir: str,
  verify_shapes=VERIFY_SHAPES,
  tolerance: float = TOLERANCE,
  log: Callable[[str], None] = print,
) -> dict:
  """Loads the model as evaluation does (float32), exports and verifies it; the summary."""
  if not out_dir:
    raise ValueError('give --out=EXPORT_DIR, the folder model.onnx and model.jax_export go to')
  config = export_config(config)
  apply_fn, variables, source = evaluate.load_model(config, workdir=workdir, checkpoint=checkpoint)
  info = {
    'source': source,
    'compute_dtype': 'float32',
    'model': models.architecture_record(apply_fn.model),
    'overrides': evaluate.model_overrides(config),
  }
  return export_model(
    descriptor_fn(apply_fn, variables),
    out_dir,
    verify_shapes=verify_shapes,
    tolerance=tolerance,
    info=info,
    log=log,
  )
