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
descriptors (compared as stored: the probe field is float32 in both files). Tolerances: float32, the README's float32-vs-float64 table ("a different but correct
float32 implementation should land at about this distance") times a safety factor of 4 for two
independent float32 roundings; float64, the README's 1e-8 / 1e-6.
"""

import dataclasses
import importlib.util
import json
import os

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


def _fixture_files() -> list[str]:
  if os.environ.get(ENV):
    return [os.environ[ENV]]
  return [os.path.join(FIXTURE_DIR, 'case_a.npz'), os.path.join(FIXTURE_DIR, 'case_a_float64.npz')]


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """Relative tolerances per quantity; step-indexed where the README gives one per step."""
  loss: tuple[float, ...]
  t: tuple[float, ...]
  grad_norm: tuple[float, ...]
  param_sumsq: float
  param_sum: float        # |d sum| / sqrt(numel * sumsq) (README: sums near 0 are ill-conditioned)
  probe: float            # relative L2 error per probe descriptor
  init: float             # the loaded initial weights (sum / sumsq of what we imported)


# The README's float32 table (float32 vs float64 of the same official code), times SAFETY.
SAFETY = 4.0
FLOAT32 = Tolerances(loss=tuple(SAFETY * v for v in (6e-7, 9e-6, 2.8e-4)),
                     t=tuple(SAFETY * v for v in (6e-6, 3e-5, 8e-5)),
                     grad_norm=tuple(SAFETY * v for v in (1.3e-6, 1.1e-4, 3.5e-4)),
                     param_sumsq=SAFETY * 8e-4, param_sum=SAFETY * 3e-4, probe=SAFETY * 2.0e-3,
                     init=1e-6)
# The README's float64 section: ~1e-8 on loss, t, grad norm, probes; ~1e-6 on the fingerprints.
FLOAT64 = Tolerances(loss=(1e-8,) * 3, t=(1e-8,) * 3, grad_norm=(1e-8,) * 3, param_sumsq=1e-6,
                     param_sum=1e-6, probe=1e-8, init=1e-12)


def _fixture_dtype(case: dict) -> str:
  dtype = case.get('compute_dtype', 'float32')
  if dtype not in ('float32', 'float64'):
    raise ValueError(f'{ENV}: config_json compute_dtype {dtype!r} is neither float32 nor float64')
  return dtype


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


def _official_keys(z) -> list[str]:
  return str(z['keys']).split('\n')


def _flat_state(params_model, batch_stats, head_weight, head_t) -> dict[str, np.ndarray]:
  """Our variables under their official state-dict keys (float64 numpy)."""
  flat = {}
  for collection, tree in (('params', params_model), ('batch_stats', batch_stats)):
    for path, value in torch_format.flatten_tree(jax.device_get(tree)).items():
      flat[torch_format.flax_path_to_torch((collection, *path))] = np.asarray(value, np.float64)
  flat['desc_cls.weight'] = np.asarray(jax.device_get(head_weight), np.float64)
  flat['desc_cls.t'] = np.asarray(jax.device_get(head_t), np.float64).reshape(1)
  return flat


def _rel(a, b) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


@dataclasses.dataclass
class Run:
  case: dict
  z: dict
  tol: Tolerances
  init_flat: dict
  metrics: list
  final_flat: dict
  probes: np.ndarray


def _run_official_case(fixture: str) -> Run:
  z = dict(np.load(fixture))
  case = json.loads(str(z['config_json']))
  dtype = _fixture_dtype(case)
  wide = np.float64 if dtype == 'float64' else np.float32
  ow = _official_weights_module(fixture)
  sd = ow.state_dict(int(case['weights_seed']), depth=int(case['depth']),
                     with_ma=bool(case['with_ma']), num_classes=int(case['num_classes']),
                     learnable_p=bool(case['learnable_p']))
  model_cfg, variables, head = released.convert_state_dict(sd, fixture)
  # The float64 case: the float32 initial values cast to float64 (README), as the official run.
  cast = lambda tree: jax.tree.map(lambda v: jnp.asarray(np.asarray(v, wide)), tree)
  config = _train_config(case, model_cfg, dtype)
  mesh = shd.make_mesh(config.mesh, devices=jax.devices()[:1])
  setup = state_lib.make_setup(config, mesh)
  params = cast({'model': variables['params'], 'head': {'weight': head['weight']}})
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               batch_stats=cast(variables['batch_stats']),
                               opt_state=setup.tx.init(params),
                               head_t=jnp.asarray(np.asarray(head['t'], wide)))
  state_sh = jax.tree.map(lambda _: shd.replicated(mesh), state)
  init_flat = _flat_state(state.params['model'], state.batch_stats, state.params['head']['weight'],
                          state.head_t)
  train_step = step_lib.make_train_step(setup, state_sh)
  metrics = []
  for k in range(int(case['steps'])):
    batch = {'image': np.asarray(z['images'][k], wide), 'label': np.asarray(z['labels'][k])}
    state, m = train_step(state, batch, np.asarray(case['lr_per_step'][k], wide))
    metrics.append(jax.device_get(m))
  final_flat = _flat_state(state.params['model'], state.batch_stats,
                           state.params['head']['weight'], state.head_t)
  model_vars = {'params': state.params['model'], 'batch_stats': state.batch_stats}
  probes = np.stack([
      np.asarray(setup.model.apply(model_vars, np.asarray(z[f'probe_image_{i}'], wide)[None],
                                   train=False))[0]
      for i in range(len(z['probe_sizes']))])
  return Run(case, z, FLOAT64 if dtype == 'float64' else FLOAT32, init_flat, metrics,
             final_flat, probes)


@pytest.fixture(scope='module', params=_fixture_files(), ids=os.path.basename)
def official_run(request):
  fixture = request.param
  if not os.path.exists(fixture):
    pytest.fail(f'{fixture} does not exist: set ${ENV} to a fixture in the format of '
                f'{FIXTURE_DIR}/README.md')
  dtype = _fixture_dtype(json.loads(str(np.load(fixture)['config_json'])))
  if dtype != 'float64':
    yield _run_official_case(fixture)
    return
  with jax.enable_x64(True):  # this fixture only
    yield _run_official_case(fixture)


def _report(name, errs, tols):
  errs, tols = np.asarray(errs, np.float64), np.broadcast_to(np.asarray(tols, np.float64),
                                                              np.shape(errs))
  print(f'{name}: worst relative error {float(np.max(errs)):.3g}')
  bad = np.flatnonzero(errs > tols)
  assert not bad.size, f'{name}: {bad.size} over tolerance, e.g. #{bad[0]}: {errs[bad[0]]:.3g} > {tols[bad[0]]:.3g}'



def test_official_training_initial_weights_are_the_officials(official_run):
  """Our import of the initial state dict holds the official tensors (checks the key mapping)."""
  r = official_run
  keys = [k for k in _official_keys(r.z) if not k.endswith('num_batches_tracked')]
  assert sorted(r.init_flat) == sorted(keys)
  idx = {k: i for i, k in enumerate(_official_keys(r.z))}
  sumsq = np.array([np.sum(r.init_flat[k] ** 2) for k in keys])
  _report('init sumsq', _rel(sumsq, r.z['init_param_sumsq'][[idx[k] for k in keys]]),
          r.tol.init)


def test_official_training_loss_t_and_grad_norm_per_step(official_run):
  r = official_run
  steps = int(r.case['steps'])
  for name, field in (('loss', 'loss'), ('t', 'head_t'), ('grad_norm', 'grad_norm')):
    ours = np.array([np.asarray(m[field], np.float64).reshape(()) for m in r.metrics])
    _report(name, _rel(ours, r.z[name][:steps]), getattr(r.tol, name)[:steps])


def test_official_training_parameter_fingerprints_after_the_last_step(official_run):
  r = official_run
  keys = _official_keys(r.z)
  compared = [i for i, k in enumerate(keys) if not k.endswith('num_batches_tracked')]
  sumsq = np.array([np.sum(r.final_flat[keys[i]] ** 2) for i in compared])
  sums = np.array([np.sum(r.final_flat[keys[i]]) for i in compared])
  ref_sumsq, ref_sum = r.z['param_sumsq'][compared], r.z['param_sum'][compared]
  numel = r.z['param_numel'][compared]
  err_sumsq = _rel(sumsq, ref_sumsq)
  err_sum = np.abs(sums - ref_sum) / np.sqrt(numel * np.maximum(ref_sumsq, 1e-300))
  for name, err, tol in (('param_sumsq', err_sumsq, r.tol.param_sumsq),
                         ('param_sum (normalised)', err_sum, r.tol.param_sum)):
    print(f'{name}: worst tensor {keys[compared[int(np.argmax(err))]]}')
    _report(name, err, tol)


def test_official_training_probe_descriptors(official_run):
  r = official_run
  # The reference is stored in float32 also in the float64 file: compare ours as it would be
  # stored (a float64 port equal to the official run rounds to the same float32 values).
  stored = r.z['probe_descriptors'].dtype
  ours = r.probes.astype(stored).astype(np.float64)
  ref = np.asarray(r.z['probe_descriptors'], np.float64)
  err = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
  _report('probe descriptors', err, r.tol.probe)
