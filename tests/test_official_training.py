"""Our train step against the official DOLG trainer (feymanpriv/DOLG, run by the fixture's author).

The fixture (`$DOLG_OFFICIAL_TRAIN_FIXTURE`, default `../shared/data/official_training/case_a.npz`
and its float64 twin `case_a_float64.npz`; format: the README beside them) holds three SGD steps
computed by the official code itself: its model, CurricularFace head, optimizer, loss and
preprocessing. Everything is taken from the file's `config_json`; the initial weights come from the
`official_weights.py` beside the file and go through our own import path
(`weights.released.convert_state_dict`, what `pretrained.load` uses, plus the head and `t`). The
batches then run through `training.step.make_train_step`, the jitted step `training.loop` uses.

Compared: per-step loss, CurricularFace `t` and gradient norm; after the last step the sum and the
sum of squares of every state-dict tensor (BN running statistics and `desc_cls.t` included;
`num_batches_tracked` excepted: we count steps in `TrainState.step`), and the eval-mode probe
descriptors (compared as stored: the probe field is float32 in both files).

Tolerances follow the case (`case_tolerances`). float64: the README's 1e-8 / 1e-6. float32: the
official code's own float32 rounding on this case ("a different but correct float32
implementation should land at about this distance"), times a safety factor of 4 for two
independent float32 roundings, and never below FLOOR. Where the float32 fixture `NAME.npz` has its
float64 twin `NAME_float64.npz` beside it (the same case run in float64 by the same official code),
that rounding is the two files' own distance, per quantity and per step; a fixture without a twin
gets the README's table, which is case_a's. A twin of another case (other inputs, initial weights
or config) is an error, not a tolerance.

The tolerance rule itself is checked on recorded numbers (which fixture gets which tolerances), on
a synthetic case whose float32 band is WIDER times case_a's (our float32 run passes it with that
pair's tolerances and fails it with case_a's), and with a wrong step (plain momentum instead of
Nesterov), which fails both case_a and the wider case.
"""

import dataclasses
import functools
import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default as default_config
from dolg_jax import sharding as shd
from dolg_jax.weights import released
from dolg_jax.weights import torch_format
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib
from tests.helpers import paths

FIXTURE_DIR = os.path.join(os.path.dirname(paths.REPO), 'shared', 'data', 'official_training')
ENV = 'DOLG_OFFICIAL_TRAIN_FIXTURE'
CASE_A = os.path.join(FIXTURE_DIR, 'case_a.npz')


def _fixture_files() -> list[str]:
  if os.environ.get(ENV):
    return [os.environ[ENV]]
  return [CASE_A, twin_path(CASE_A)]


def twin_path(fixture: str) -> str:
  """`NAME_float64.npz` beside `NAME.npz`: the float64 twin of a float32 fixture."""
  root, ext = os.path.splitext(fixture)
  return f'{root}_float64{ext}'


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """Relative tolerances per quantity; step-indexed where the README gives one per step."""

  loss: tuple[float, ...]
  t: tuple[float, ...]
  grad_norm: tuple[float, ...]
  param_sumsq: float
  param_sum: float  # |d sum| / sqrt(numel * sumsq) (README: sums near 0 are ill-conditioned)
  probe: float  # relative L2 error per probe descriptor
  init: float  # the loaded initial weights (sum / sumsq of what we imported)


# Two independent float32 roundings (ours, the official run's) each about the official float32 run's
# distance from its float64 twin.
SAFETY = 4.0
# The smallest float32 tolerance (relative, ~8 float32 ulps): where the two official runs happen to
# agree more closely than float32 can resolve, a correct float32 port still rounds.
FLOOR = 1e-6
# Of the loaded initial weights (float32 in every float32 case: an import check, not a rounding
# band).
FLOAT32_INIT = 1e-6
# The README's float32 table (case_a's float32 vs float64 of the same official code), times SAFETY:
# the tolerances of a float32 fixture that has no float64 twin.
FLOAT32_TABLE = Tolerances(
  loss=tuple(SAFETY * v for v in (6e-7, 9e-6, 2.8e-4)),
  t=tuple(SAFETY * v for v in (6e-6, 3e-5, 8e-5)),
  grad_norm=tuple(SAFETY * v for v in (1.3e-6, 1.1e-4, 3.5e-4)),
  param_sumsq=SAFETY * 8e-4,
  param_sum=SAFETY * 3e-4,
  probe=SAFETY * 2.0e-3,
  init=FLOAT32_INIT,
)
# The README's float64 section: ~1e-8 on loss, t, grad norm, probes; ~1e-6 on the fingerprints.
FLOAT64 = Tolerances(
  loss=(1e-8,) * 3,
  t=(1e-8,) * 3,
  grad_norm=(1e-8,) * 3,
  param_sumsq=1e-6,
  param_sum=1e-6,
  probe=1e-8,
  init=1e-12,
)

# What a float32 fixture and its float64 twin share (the same case): its inputs and initial weights.
_CASE_FIELDS = (
  'images',
  'labels',
  'lr',
  'keys',
  'grad_keys',
  'param_numel',
  'init_param_sum',
  'init_param_sumsq',
  'probe_sizes',
)
# The results: what the official code computed (the fields the twin's distance is taken on).
RESULT_FIELDS = (
  'loss',
  't',
  'grad_norm',
  'grad_sumsq',
  'param_sum',
  'param_sumsq',
  'probe_descriptors',
)
# config_json entries that may differ between twins.
_CONFIG_PRECISION = ('compute_dtype', 'description')


def _load(fixture: str) -> dict:
  return dict(np.load(fixture))


def _config(z: dict) -> dict:
  return json.loads(str(z['config_json']))


def _fixture_dtype(case: dict) -> str:
  dtype = case.get('compute_dtype', 'float32')
  if dtype not in ('float32', 'float64'):
    raise ValueError(f'{ENV}: config_json compute_dtype {dtype!r} is neither float32 nor float64')
  return dtype


def _official_keys(z) -> list[str]:
  return str(z['keys']).split('\n')


def _compared_tensors(z) -> list[int]:
  """Indices of the state-dict tensors compared (`num_batches_tracked` excepted)."""
  return [i for i, k in enumerate(_official_keys(z)) if not k.endswith('num_batches_tracked')]


def _rel(a, b) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def _probe_fields(z) -> list[str]:
  return [f'probe_image_{i}' for i in range(len(z['probe_sizes']))]


def check_twin(z32: dict, z64: dict, where: str) -> None:
  """Raises ValueError unless `z64` is `z32`'s case in float64 (same inputs, weights, config)."""
  c32, c64 = _config(z32), _config(z64)
  if (_fixture_dtype(c32), _fixture_dtype(c64)) != ('float32', 'float64'):
    raise ValueError(
      f'{where}: compute_dtype {c32.get("compute_dtype")!r} and '
      f'{c64.get("compute_dtype")!r}, expected float32 and its float64 twin'
    )
  for key in sorted(set(c32) | set(c64)):
    if key not in _CONFIG_PRECISION and c32.get(key) != c64.get(key):
      raise ValueError(
        f'{where}: not the same case: config_json {key!r} is {c32.get(key)!r} in '
        f'the float32 file and {c64.get(key)!r} in its float64 twin'
      )
  for field in (*_CASE_FIELDS, *_probe_fields(z32)):
    if field not in z64 or not np.array_equal(z32[field], z64[field]):
      raise ValueError(
        f'{where}: not the same case: field {field!r} differs between the float32 '
        f'file and its float64 twin'
      )


def float32_distances(z32: dict, z64: dict) -> Tolerances:
  """How far the official float32 run is from its float64 twin, on the test's own measures:
  per step for loss / t / grad_norm, the worst tensor (worst probe) for the others."""
  steps = int(_config(z32)['steps'])
  compared = _compared_tensors(z32)
  sumsq32, sumsq64 = z32['param_sumsq'][compared], z64['param_sumsq'][compared]
  d_sum = np.abs(z32['param_sum'][compared] - z64['param_sum'][compared]) / np.sqrt(
    z64['param_numel'][compared] * np.maximum(sumsq64, 1e-300)
  )
  p32 = np.asarray(z32['probe_descriptors'], np.float64)
  p64 = np.asarray(z64['probe_descriptors'], np.float64)
  probe = np.linalg.norm(p32 - p64, axis=1) / np.linalg.norm(p64, axis=1)
  per_step = lambda name: tuple(float(v) for v in _rel(z32[name][:steps], z64[name][:steps]))
  return Tolerances(
    loss=per_step('loss'),
    t=per_step('t'),
    grad_norm=per_step('grad_norm'),
    param_sumsq=float(np.max(_rel(sumsq32, sumsq64))),
    param_sum=float(np.max(d_sum)),
    probe=float(np.max(probe)),
    init=0.0,
  )


def tolerances_from_pair(z32: dict, z64: dict) -> Tolerances:
  """SAFETY x the pair's own float32 distance, per quantity and step, never below FLOOR."""
  d = float32_distances(z32, z64)
  scaled = lambda v: max(SAFETY * v, FLOOR)
  return Tolerances(
    loss=tuple(map(scaled, d.loss)),
    t=tuple(map(scaled, d.t)),
    grad_norm=tuple(map(scaled, d.grad_norm)),
    param_sumsq=scaled(d.param_sumsq),
    param_sum=scaled(d.param_sum),
    probe=scaled(d.probe),
    init=FLOAT32_INIT,
  )


def case_tolerances(fixture: str, z: dict | None = None) -> tuple[Tolerances, str]:
  """The tolerances of `fixture` and where they come from (see the module docstring)."""
  z = _load(fixture) if z is None else z
  if _fixture_dtype(_config(z)) == 'float64':
    return FLOAT64, "float64: the README's 1e-8 / 1e-6"
  twin = twin_path(fixture)
  if os.path.exists(twin):
    z64 = _load(twin)
    check_twin(z, z64, f'{fixture} and {twin}')
    return (
      tolerances_from_pair(z, z64),
      f'float32: {SAFETY:g} x {os.path.basename(fixture)} vs {os.path.basename(twin)}, '
      f'floor {FLOOR:g}',
    )
  return FLOAT32_TABLE, f"float32: {SAFETY:g} x the README's table (no {os.path.basename(twin)})"


def _official_weights_module(fixture: str):
  path = os.path.join(os.path.dirname(os.path.abspath(fixture)), 'official_weights.py')
  spec = importlib.util.spec_from_file_location('official_weights', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _train_config(case: dict, model_cfg, dtype: str):
  """The run's config: the fixture's fields, everything else the defaults."""
  c = default_config.get_config()
  c.model = model_cfg
  c.compute_dtype = dtype
  c.head.type = case['head']
  c.head.num_classes = int(case['num_classes'])
  c.head.margin = float(case['margin_m'])
  c.head.scale = float(case['scale_s'])
  c.head.t_momentum = float(case['t_momentum'])
  c.data.image_size = int(case['image_size'][0])
  t = c.train
  t.optimizer = 'sgd'
  t.momentum = float(case['momentum'])
  t.nesterov = bool(case['nesterov'])
  t.weight_decay = float(case['weight_decay'])
  t.weight_decay_mask = 'all'
  t.global_batch_size = int(case['batch_size'])
  t.grad_accum_steps = 1
  t.bn_mode = 'global'
  t.bn_group_size = 0
  assert float(case['dampening']) == 0.0, 'optax/torch SGD here has no dampening'
  return c


def _flat_state(params_model, batch_stats, head_weight, head_t) -> dict[str, np.ndarray]:
  """Our variables under their official state-dict keys (float64 numpy)."""
  flat = {}
  for collection, tree in (('params', params_model), ('batch_stats', batch_stats)):
    for path, value in torch_format.flatten_tree(jax.device_get(tree)).items():
      flat[torch_format.flax_path_to_torch((collection, *path))] = np.asarray(value, np.float64)
  flat['desc_cls.weight'] = np.asarray(jax.device_get(head_weight), np.float64)
  flat['desc_cls.t'] = np.asarray(jax.device_get(head_t), np.float64).reshape(1)
  return flat


@dataclasses.dataclass
class Run:
  case: dict
  z: dict
  tol: Tolerances
  tol_source: str
  init_flat: dict
  metrics: list
  final_flat: dict
  probes: np.ndarray | None


def _run_official_case(fixture: str, *, wrong_formula=None, probes: bool = True) -> Run:
  """Our train step on the fixture's case. `wrong_formula(config)`, if given, changes the run's
  config (a deliberately wrong step, to show the tolerances catch it)."""
  z = _load(fixture)
  case = _config(z)
  dtype = _fixture_dtype(case)
  wide = np.float64 if dtype == 'float64' else np.float32
  tol, tol_source = case_tolerances(fixture, z)
  ow = _official_weights_module(fixture)
  sd = ow.state_dict(
    int(case['weights_seed']),
    depth=int(case['depth']),
    with_ma=bool(case['with_ma']),
    num_classes=int(case['num_classes']),
    learnable_p=bool(case['learnable_p']),
  )
  model_cfg, variables, head = released.convert_state_dict(sd, fixture)
  # The float64 case: the float32 initial values cast to float64 (README), as the official run.
  cast = lambda tree: jax.tree.map(lambda v: jnp.asarray(np.asarray(v, wide)), tree)
  config = _train_config(case, model_cfg, dtype)
  if wrong_formula is not None:
    wrong_formula(config)
  mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  setup = state_lib.make_setup(config, mesh)
  params = cast({'model': variables['params'], 'head': {'weight': head['weight']}})
  state = state_lib.TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=cast(variables['batch_stats']),
    opt_state=setup.tx.init(params),
    head_t=jnp.asarray(np.asarray(head['t'], wide)),
  )
  state_sh = jax.tree.map(lambda _: shd.replicated(mesh), state)
  # Placed as the step returns it (else the second step compiles again for the new placement).
  state = jax.device_put(state, state_sh)
  init_flat = _flat_state(
    state.params['model'], state.batch_stats, state.params['head']['weight'], state.head_t
  )
  train_step = step_lib.make_train_step(setup, state_sh)
  metrics = []
  for k in range(int(case['steps'])):
    batch = {'image': np.asarray(z['images'][k], wide), 'label': np.asarray(z['labels'][k])}
    state, m = train_step(state, batch, np.asarray(case['lr_per_step'][k], wide))
    metrics.append(jax.device_get(m))
  final_flat = _flat_state(
    state.params['model'], state.batch_stats, state.params['head']['weight'], state.head_t
  )
  out = None
  if probes:
    model_vars = {'params': state.params['model'], 'batch_stats': state.batch_stats}
    # Jitted, as evaluation extracts (one compile per probe size; op by op takes twice as long).
    describe = jax.jit(lambda v, image: setup.model.apply(v, image[None], train=False)[0])
    out = np.stack(
      [np.asarray(describe(model_vars, np.asarray(z[f], wide))) for f in _probe_fields(z)]
    )
  return Run(case, z, tol, tol_source, init_flat, metrics, final_flat, out)


@functools.cache
def _cached_run(fixture: str) -> Run:
  """One run per fixture while this module runs (the step compiles once; `_release_runs`)."""
  if _fixture_dtype(_config(_load(fixture))) == 'float64':
    with jax.enable_x64(True):  # this run only: its results are numpy
      return _run_official_case(fixture)
  return _run_official_case(fixture)


@pytest.fixture(scope='module', autouse=True)
def _release_runs():
  """The runs (two float64 copies of every weight each) are freed with the module."""
  yield
  _cached_run.cache_clear()


def _require(fixture: str) -> None:
  if not os.path.exists(fixture):
    pytest.fail(
      f'{fixture} does not exist: set ${ENV} to a fixture in the format of {FIXTURE_DIR}/README.md'
    )


@pytest.fixture(scope='module', params=_fixture_files(), ids=os.path.basename)
def official_run(request):
  _require(request.param)
  run = _cached_run(request.param)
  print(f'tolerances: {run.tol_source}')
  return run


@pytest.fixture(scope='module')
def case_a_run():
  """Our float32 run of case_a (the same run as official_run's case_a.npz)."""
  _require(CASE_A)
  return _cached_run(CASE_A)


def errors(r: Run, z: dict) -> dict[str, np.ndarray]:
  """Our run's relative errors against the official results in `z`, per compared quantity:
  per step (loss, t, grad_norm), per tensor (param_sumsq, param_sum) or per probe."""
  steps = int(r.case['steps'])
  out = {}
  for name, field in (('loss', 'loss'), ('t', 'head_t'), ('grad_norm', 'grad_norm')):
    ours = np.array([np.asarray(m[field], np.float64).reshape(()) for m in r.metrics])
    out[name] = _rel(ours, z[name][:steps])
  keys, compared = _official_keys(z), _compared_tensors(z)
  sumsq = np.array([np.sum(r.final_flat[keys[i]] ** 2) for i in compared])
  sums = np.array([np.sum(r.final_flat[keys[i]]) for i in compared])
  ref_sumsq, ref_sum = z['param_sumsq'][compared], z['param_sum'][compared]
  out['param_sumsq'] = _rel(sumsq, ref_sumsq)
  out['param_sum'] = np.abs(sums - ref_sum) / np.sqrt(
    z['param_numel'][compared] * np.maximum(ref_sumsq, 1e-300)
  )
  if r.probes is not None:
    # The reference is stored in float32 also in the float64 file: compare ours as it would be
    # stored (a float64 port equal to the official run rounds to the same float32 values).
    stored = z['probe_descriptors'].dtype
    ours = r.probes.astype(stored).astype(np.float64)
    ref = np.asarray(z['probe_descriptors'], np.float64)
    out['probe'] = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
  return out


def _tolerance(tol: Tolerances, name: str, errs: np.ndarray) -> np.ndarray:
  value = np.asarray(getattr(tol, name), np.float64)
  if value.ndim:  # per step
    value = value[: errs.shape[0]]
  return np.broadcast_to(value, errs.shape)


def over_tolerance(errs: dict[str, np.ndarray], tol: Tolerances) -> dict[str, list]:
  """{quantity: [(index, error, tolerance), ...]} of every entry over its tolerance."""
  out = {}
  for name, err in errs.items():
    t = _tolerance(tol, name, err)
    bad = np.flatnonzero(err > t)
    if bad.size:
      out[name] = [(int(i), float(err[i]), float(t[i])) for i in bad]
  return out


def _report(name, errs, tols):
  errs, tols = (
    np.asarray(errs, np.float64),
    np.broadcast_to(np.asarray(tols, np.float64), np.shape(errs)),
  )
  print(f'{name}: worst relative error {float(np.max(errs)):.3g}')
  bad = np.flatnonzero(errs > tols)
  assert not bad.size, (
    f'{name}: {bad.size} over tolerance, e.g. #{bad[0]}: {errs[bad[0]]:.3g} > {tols[bad[0]]:.3g}'
  )


def test_official_training_initial_weights_are_the_officials(official_run):
  """Our import of the initial state dict holds the official tensors (checks the key mapping)."""
  r = official_run
  keys = [k for k in _official_keys(r.z) if not k.endswith('num_batches_tracked')]
  assert sorted(r.init_flat) == sorted(keys)
  idx = {k: i for i, k in enumerate(_official_keys(r.z))}
  sumsq = np.array([np.sum(r.init_flat[k] ** 2) for k in keys])
  _report('init sumsq', _rel(sumsq, r.z['init_param_sumsq'][[idx[k] for k in keys]]), r.tol.init)


def test_official_training_loss_t_and_grad_norm_per_step(official_run):
  r = official_run
  errs = errors(r, r.z)
  for name in ('loss', 't', 'grad_norm'):
    _report(name, errs[name], _tolerance(r.tol, name, errs[name]))


def test_official_training_parameter_fingerprints_after_the_last_step(official_run):
  r = official_run
  errs = errors(r, r.z)
  keys, compared = _official_keys(r.z), _compared_tensors(r.z)
  for name, label in (('param_sumsq', 'param_sumsq'), ('param_sum', 'param_sum (normalised)')):
    print(f'{label}: worst tensor {keys[compared[int(np.argmax(errs[name]))]]}')
    _report(label, errs[name], getattr(r.tol, name))


def test_official_training_probe_descriptors(official_run):
  r = official_run
  _report('probe descriptors', errors(r, r.z)['probe'], r.tol.probe)


# --- The tolerances follow the case --------------------------------------------------------------

# The synthetic wide case's float32 rounding, in multiples of case_a's.
WIDER = 8.0


def widened(z32: dict, z64: dict, factor: float) -> dict:
  """The float32 file of a case whose official float32 run lies `factor` times as far from its
  float64 twin `z64` as `z32`'s does: every result r32 moved to r64 + factor * (r32 - r64) (in
  float64, stored in the field's dtype); inputs, initial weights and config unchanged, so `z64`
  stays its twin."""
  out = dict(z32)
  for field in RESULT_FIELDS:
    r32, r64 = np.asarray(z32[field], np.float64), np.asarray(z64[field], np.float64)
    out[field] = (r64 + factor * (r32 - r64)).astype(z32[field].dtype)
  config = _config(z32)
  config['description'] = (
    f'SYNTHETIC (tests): {os.path.basename(CASE_A)} with every float32 '
    f'result {factor:g}x as far from its float64 twin. ' + config['description']
  )
  out['config_json'] = np.asarray(json.dumps(config))
  return out


def _write_pair(directory, name: str, z32: dict, z64: dict) -> str:
  path = os.path.join(str(directory), f'{name}.npz')
  np.savez(path, **z32)
  np.savez(twin_path(path), **z64)
  return path


@functools.cache
def _case_a_pair() -> tuple[dict, dict]:
  return _load(CASE_A), _load(twin_path(CASE_A))


def _as_arrays(tol: Tolerances) -> dict[str, np.ndarray]:
  return {f.name: np.asarray(getattr(tol, f.name), np.float64) for f in dataclasses.fields(tol)}


def test_official_training_float32_tolerances_follow_the_case(tmp_path):
  """Which tolerances a fixture gets (pure: recorded numbers only, no training)."""
  _require(CASE_A)
  z32, z64 = _case_a_pair()
  # case_a with its twin: 4 x the two files' own distance; the README's table is that distance,
  # rounded (so the table describes case_a, and a twinless float32 fixture gets case_a's band).
  tol, source = case_tolerances(CASE_A)
  assert 'case_a_float64.npz' in source
  for name, value in _as_arrays(tol).items():
    if name != 'init':
      np.testing.assert_allclose(value, _as_arrays(FLOAT32_TABLE)[name], rtol=0.15, err_msg=name)
  assert case_tolerances(twin_path(CASE_A))[0] == FLOAT64
  # Without a twin: the README's table.
  alone = tmp_path / 'alone' / 'case_x.npz'
  alone.parent.mkdir()
  shutil.copy(CASE_A, alone)
  alone_tol, alone_source = case_tolerances(str(alone))
  assert alone_tol == FLOAT32_TABLE and 'README' in alone_source
  # A wider case: each tolerance WIDER x case_a's (none is at the floor).
  wide, _ = case_tolerances(_write_pair(tmp_path, 'wide', widened(z32, z64, WIDER), z64))
  for name, value in _as_arrays(wide).items():
    if name != 'init':
      np.testing.assert_allclose(value, WIDER * _as_arrays(tol)[name], rtol=1e-3, err_msg=name)
  # Where the two runs agree exactly, the floor.
  same = dict(z32, loss=z64['loss'], param_sum=z64['param_sum'])
  floored, _ = case_tolerances(_write_pair(tmp_path, 'same', same, z64))
  assert floored.loss == (FLOOR,) * 3 and floored.param_sum == FLOOR
  assert floored.t == tol.t and floored.param_sumsq == tol.param_sumsq
  # A twin of another case is refused, naming what differs.
  other_labels = dict(z64, labels=np.roll(z64['labels'], 1))
  with pytest.raises(ValueError, match="field 'labels' differs"):
    case_tolerances(_write_pair(tmp_path, 'labels', z32, other_labels))
  other_config = dict(
    z64, config_json=np.asarray(json.dumps(dict(_config(z64), weight_decay=0.05)))
  )
  with pytest.raises(ValueError, match="config_json 'weight_decay'"):
    case_tolerances(_write_pair(tmp_path, 'config', z32, other_config))
  with pytest.raises(ValueError, match='compute_dtype'):
    case_tolerances(_write_pair(tmp_path, 'dtype', z32, z32))


def test_official_training_passes_a_case_with_a_wider_float32_band(case_a_run, tmp_path):
  """A case whose official float32 rounding is WIDER x case_a's (case_a's results pushed away
  from their float64 twin): our float32 step, the run on the same inputs, passes it with the
  tolerances from that pair, where case_a's band (the fixed tolerances of before) fails it."""
  z32, z64 = _case_a_pair()
  path = _write_pair(tmp_path, 'case_wide', widened(z32, z64, WIDER), z64)
  tol, source = case_tolerances(path)
  assert 'case_wide_float64.npz' in source
  errs = errors(case_a_run, _load(path))
  assert set(errs) == {'loss', 't', 'grad_norm', 'param_sumsq', 'param_sum', 'probe'}
  assert not over_tolerance(errs, tol), over_tolerance(errs, tol)
  # Not vacuous: against these results, case_a's band rejects our (correct) step.
  too_tight = over_tolerance(errs, case_a_run.tol)
  print('over case_a\'s band:', {k: len(v) for k, v in too_tight.items()})
  assert too_tight


@pytest.fixture(scope='module')
def plain_momentum_run():
  """A wrong step: plain (heavy-ball) momentum where the official SGD uses Nesterov."""
  _require(CASE_A)
  assert bool(_config(_load(CASE_A))['nesterov'])

  def wrong(config):
    config.train.nesterov = False

  return _run_official_case(CASE_A, wrong_formula=wrong, probes=False)


def test_official_training_a_wrong_formula_fails_in_a_wider_band(plain_momentum_run, tmp_path):
  """The wider tolerances still catch a wrong formula: without Nesterov our step fails both
  case_a and the WIDER-band case; step 0's forward (before any update) still agrees."""
  z32, z64 = _case_a_pair()
  path = _write_pair(tmp_path, 'case_wide', widened(z32, z64, WIDER), z64)
  for fixture in (CASE_A, path):
    tol, _ = case_tolerances(fixture)
    over = over_tolerance(errors(plain_momentum_run, _load(fixture)), tol)
    print(os.path.basename(fixture), {k: [i for i, *_ in v] for k, v in over.items()})
    # The update is wrong: step 1's loss (after one update) and the final weights are off ...
    assert 1 in [i for i, *_ in over.get('loss', [])], over
    assert 'param_sumsq' in over, over
    # ... while step 0's forward and backward, before any update, are right.
    assert all(i > 0 for name in ('loss', 't', 'grad_norm') for i, *_ in over.get(name, [])), over
