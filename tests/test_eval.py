"""End to end: fixtures in the official layout -> extraction -> table vs hand-computed values."""

import glob
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import default
from dolg_jax.retrieval import descriptor_cache
from dolg_jax.retrieval import evaluate as eval_lib
from dolg_jax.retrieval import metrics
from dolg_jax.retrieval import rerank
from dolg_jax.retrieval import scoring
from dolg_jax.retrieval import search
from dolg_jax.data import gldv2_retrieval
from dolg_jax.data import revisitop
from tests.helpers.paths import REPO
from dolg_jax.data.synthetic import gldv2_retrieval_fixture
from dolg_jax.data.synthetic import revisitop_fixture as fx
from tests.helpers.eval_config import extract_config

RED = fx.PALETTE[0]
GREY = fx.GREY


def mean_colour_apply(variables, images, valid_hw=None):
  """Stand-in model: the mean RGB colour (times a learnable-looking scale) of the valid pixels."""
  x = images.astype(jnp.float32)
  if valid_hw is None:
    return x.mean((1, 2)) * variables['scale']
  rows = jnp.arange(x.shape[1])[None, :, None] < valid_hw[:, 0, None, None]
  cols = jnp.arange(x.shape[2])[None, None, :] < valid_hw[:, 1, None, None]
  m = (rows & cols)[..., None].astype(jnp.float32)
  return (x * m).sum((1, 2)) / m.sum((1, 2)) * variables['scale']


VARIABLES = {'scale': jnp.ones((), jnp.float32)}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval')
  manual = os.path.join(root, 'manual')
  # Landmark 0 (red) gets a near-red distractor in the base set: it ranks after the two easy
  # images and before the hard one. R1M gets an even redder one (ranks before it).
  fx.write_gnd_fixture(
    os.path.join(manual, 'roxford5k'),
    'roxford5k',
    extra_index=[('other_twist', 0.8 * RED + 0.2 * GREY)],
  )
  fx.write_r1m_fixture(os.path.join(manual, 'revisitop1m'), 5, colours=[0.9 * RED + 0.1 * GREY])
  out = os.path.join(root, 'data')
  revisitop.prepare('roxford5k', os.path.join(manual, 'roxford5k'), out)
  revisitop.prepare('revisitop1m', os.path.join(manual, 'revisitop1m'), out)
  return out


def _config(data_dir, **overrides):
  c = default.get_config()
  e = c.eval
  e.datasets = ('roxford5k',)
  e.data_dir = data_dir
  e.use_distractors = True
  e.batch_size = 4
  e.report_queries = 3
  for k, v in overrides.items():
    setattr(e, k, v)
  return c


# Hand-computed (see the fixture): q0 ranks E, E, D, H, J (+1M: E, E, R, D, H, J); q1, q2 perfect.
AP_M0 = (1 + 1 + (2 / 3 + 3 / 4) / 2) / 3  # positives at 0, 1, 3
AP_H0 = (0 / 1 + 1 / 2) / 2  # hard at 3, two junk (easy) before -> 1
AP_M0_1M = (1 + 1 + (2 / 4 + 3 / 5) / 2) / 3  # positives at 0, 1, 4
AP_H0_1M = (0 / 2 + 1 / 3) / 2  # hard at 4 - 2 junk -> 2
EXPECTED = {
  'base': {
    'easy': (1.0, 1.0, 1.0, 1.0),
    'medium': ((AP_M0 + 2) / 3, 1.0, (3 / 4 + 2) / 3, (3 / 4 + 2) / 3),
    'hard': ((AP_H0 + 2) / 3, 2 / 3, (1 / 2 + 2) / 3, (1 / 2 + 2) / 3),
  },
  '+1m': {
    'easy': (1.0, 1.0, 1.0, 1.0),
    'medium': ((AP_M0_1M + 2) / 3, 1.0, (3 / 5 + 2) / 3, (3 / 5 + 2) / 3),
    'hard': ((AP_H0_1M + 2) / 3, 2 / 3, (1 / 3 + 2) / 3, (1 / 3 + 2) / 3),
  },
}


def _check_table(results):
  for setting, protos in EXPECTED.items():
    for p, (m, p1, p5, p10) in protos.items():
      got = results['roxford5k'][setting][p]
      np.testing.assert_allclose(
        [got['map'], got['mp@1'], got['mp@5'], got['mp@10']],
        [m, p1, p5, p10],
        rtol=0,
        atol=1e-9,
        err_msg=f'{setting} {p}',
      )


def test_end_to_end_table_matches_hand_computed_values(data_dir, tmp_path):
  out_dir = os.path.join(tmp_path, 'out')
  out = eval_lib.evaluate_variables(_config(data_dir), mean_colour_apply, VARIABLES, out_dir)
  _check_table(out['results'])
  with open(os.path.join(out_dir, 'results.json')) as f:
    saved = json.load(f)
  _check_table(saved['results'])
  aps = saved['results']['roxford5k']['base']['medium']['aps']
  assert aps[0] == pytest.approx(AP_M0, abs=1e-12)
  assert 'roxford5k+1M' in out['table'] and 'M mAP' in out['table']
  # The report: HTML + PNG grid, first result of each query framed green (positive).
  html_path, png = saved['reports']['roxford5k']
  assert os.path.exists(html_path) and 'other_twist' in open(html_path).read()
  grid = np.asarray(Image.open(png).convert('RGB'))
  assert grid.shape[0] > 3 * 96
  greens = np.all(np.abs(grid.astype(int) - [40, 170, 60]) < 3, axis=-1).sum()
  reds = np.all(np.abs(grid.astype(int) - [210, 40, 40]) < 3, axis=-1).sum()
  assert greens > 0 and reds > 0

  # Cached descriptors: a model that cannot run still evaluates (same variables -> cache hit),
  # and other search settings re-score from the cache.
  def broken(v, x):
    raise AssertionError('extraction should have come from the cache')

  again = eval_lib.evaluate_variables(
    _config(data_dir, qe_k=1, report_queries=0), broken, VARIABLES, out_dir
  )
  assert again['results']['roxford5k']['base']['easy']['map'] == pytest.approx(1.0)


def test_query_crop_matters(data_dir, tmp_path):
  # Without the crop (rounding to a box covering the whole image) the grey frame dilutes the
  # query colour: same positives first here, but the descriptors differ.
  from dolg_jax.retrieval import extract as ex

  src = revisitop.data_source('roxford5k', data_dir, 'query')
  e = ex.Extractor(mean_colour_apply, VARIABLES, extract_config(scales=(1.0,)))
  exs = list(revisitop.iter_examples(src))
  crop = e.extract(
    [{'index': int(x['index']), 'image': x['image'], 'bbx': x['bbx']} for x in exs], 3
  )
  full = e.extract([{'index': int(x['index']), 'image': x['image']} for x in exs], 3)
  assert (crop * full).sum(1).max() < 0.999
  red = RED / np.linalg.norm(RED)
  q0 = [int(x['index']) for x in exs if x['id'] == b'query_lm0_0'][0]
  assert float(crop[q0] @ red) > 0.9999


def test_cli_with_a_converted_checkpoint(data_dir, tmp_path):
  """python -m dolg_jax.eval on a converted (pretrained.save_converted) tiny model."""
  from configs import tiny
  from dolg_jax import models, pretrained

  cfg = tiny.get_config()
  model = models.build_model(cfg.model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  ckpt = os.path.join(tmp_path, 'tiny_converted')
  pretrained.save_converted(ckpt, cfg.model, variables)
  out_dir = os.path.join(tmp_path, 'cli_out')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [
    sys.executable,
    '-m',
    'dolg_jax.eval',
    '--config=configs/tiny.py',
    f'--checkpoint={ckpt}',
    f'--output_dir={out_dir}',
    f'--config.eval.data_dir={data_dir}',
    "--config.eval.datasets=('roxford5k',)",
    '--config.eval.scales=(1.0,)',
    '--config.eval.report_queries=2',
    f'--config.eval.xla_cache_dir={tmp_path}/xla',
  ]
  res = subprocess.run(
    cmd,
    cwd=repo,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'roxford5k' in res.stdout and 'E mAP' in res.stdout
  with open(os.path.join(out_dir, 'results.json')) as f:
    saved = json.load(f)
  assert saved['source'].startswith('released:')
  # Padded canvases (the default): 96x128 and 128x96 hold every index image and query crop, each
  # with full and partial batches.
  assert saved['compile_count'] <= 4
  for p in ('easy', 'medium', 'hard'):
    assert 0.0 <= saved['results']['roxford5k']['base'][p]['map'] <= 1.0


def test_load_model_dispatch(tmp_path, monkeypatch):
  """--workdir / step dirs go through weights.checkpoint.load_variables and config.model;
  files and converted dirs through pretrained.load; exactly one of the two flags."""
  from configs import tiny
  from dolg_jax import models, pretrained
  from dolg_jax.weights import checkpoint as ckpt_lib

  cfg = tiny.get_config()
  model = models.build_model(cfg.model)
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 64, 64, 3)), train=False)
  calls = []

  def fake_load_variables(path):
    calls.append(path)
    return jax.tree.map(np.asarray, variables)

  monkeypatch.setattr(ckpt_lib, 'load_variables', fake_load_variables)
  workdir = os.path.join(tmp_path, 'wd')
  os.makedirs(workdir)
  apply_fn, v, source = eval_lib.load_model(cfg, workdir=workdir)
  assert calls == [workdir] and source.startswith('ours:')
  assert callable(apply_fn)
  assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), v, variables))
  conv = os.path.join(tmp_path, 'conv')
  pretrained.save_converted(conv, cfg.model, variables)
  _, _, source = eval_lib.load_model(cfg, checkpoint=conv)
  assert source.startswith('released:')
  with pytest.raises(ValueError, match='exactly one'):
    eval_lib.load_model(cfg, workdir=workdir, checkpoint=conv)
  with pytest.raises(FileNotFoundError):
    eval_lib.load_model(cfg, checkpoint=os.path.join(tmp_path, 'nope.pyth'))
  assert descriptor_cache.variables_hash(variables) == descriptor_cache.variables_hash(
    jax.tree.map(np.asarray, variables)
  )
  assert descriptor_cache.variables_hash(variables) != descriptor_cache.variables_hash(
    jax.tree.map(lambda a: a + 1, variables)
  )


# ------------------------------------------------------------------ SuperGlobal and GLDv2 retrieval


def _cached_split(out_dir, dataset, split):
  files = [
    f
    for f in glob.glob(os.path.join(out_dir, 'cache', f'{dataset}_{split}_*.npy'))
    if not f.endswith('.ids.npy')
  ]
  assert len(files) == 1, files
  return np.load(files[0])


def _no_extraction(v, x, valid_hw=None):
  raise AssertionError('extraction should have come from the cache')


def test_superglobal_end_to_end(data_dir, tmp_path):
  """eval.rerank='superglobal' re-scores from the cache (no extraction) and equals the revisitop
  metrics of rerank.superglobal on the cached descriptors, base and +1M (full ranks, not the fast
  path); the table and the report say / show it; extraction modules get their own cache entries."""
  out_dir = os.path.join(tmp_path, 'out')
  plain = eval_lib.evaluate_variables(
    _config(data_dir, report_queries=0), mean_colour_apply, VARIABLES, out_dir
  )
  _check_table(plain['results'])
  assert ' SG' not in plain['table'] and plain['search']['rerank'] == ''
  sg_cfg = _config(data_dir, rerank='superglobal', report_queries=3)  # M, K, beta: 400, 9, 0.15
  sg = eval_lib.evaluate_variables(sg_cfg, _no_extraction, VARIABLES, out_dir)
  assert sg['compile_count'] == 0
  q, db, r1m = (
    _cached_split(out_dir, 'roxford5k', 'query'),
    _cached_split(out_dir, 'roxford5k', 'index'),
    _cached_split(out_dir, 'revisitop1m', 'index'),
  )
  gnd_cfg = revisitop.load_gnd('roxford5k', data_dir)
  ranks = rerank.superglobal(q, db, M=400, K=9, beta=0.15)
  # Here re-ranking changes every query's top 10 (so the report check below tells them apart).
  assert (ranks[:10] != search.full_ranks(q @ db.T)[:10]).any(axis=0).all()
  for setting, r in (
    ('base', ranks),
    ('+1m', rerank.superglobal(q, np.concatenate([db, r1m]), M=400, K=9, beta=0.15)),
  ):
    want = metrics.compute_protocols(r, gnd_cfg['gnd'], (1, 5, 10))
    for p in metrics.PROTOCOLS:
      got = sg['results']['roxford5k'][setting][p]
      np.testing.assert_allclose(
        [got['map'], got['mp@1'], got['mp@5'], got['mp@10']],
        [want[p]['map'], *want[p]['mp']],
        rtol=0,
        atol=1e-12,
      )
  with open(os.path.join(out_dir, 'results.json')) as f:
    saved = json.load(f)
  assert (
    saved['search'] | {'rerank': 'superglobal', 'rerank_m': 400, 'rerank_k': 9} == saved['search']
    and saved['search']['qe_k'] == 0
  )
  assert 'roxford5k SG' in sg['table'] and 'roxford5k+1M SG' in sg['table']
  assert 'SG: SuperGlobal re-ranking (M=400, K=9, beta=0.15)' in sg['table']
  # The report lists each query's results in the re-ranked order.
  page = open(saved['reports']['roxford5k'][0]).read()
  rows = [r for r in page.split('<tr>') if r.startswith('<td>')]
  assert len(rows) == 3
  for qi, row in enumerate(rows):
    names = re.findall(r'>([^<>]+) \(-?[0-9.]+\)</span>', row)
    assert names == [gnd_cfg['imlist'][i] for i in ranks[: len(names), qi]] and len(names) >= 3

  # An extraction module on: a new cache key, so the descriptors are extracted again.
  on = eval_lib.evaluate_variables(
    _config(data_dir, gem_plus_p=4.6, report_queries=0), mean_colour_apply, VARIABLES, out_dir
  )
  assert on['compile_count'] > 0 and on['model_hash'].endswith('-gem_plus_p=4.6')
  assert on['table'].endswith('extraction: scale_pool=mean, gem_plus_p=4.6')
  assert len(glob.glob(os.path.join(out_dir, 'cache', 'roxford5k_query_*.json'))) == 2
  with pytest.raises(ValueError, match='qe_k=1 are both set'):
    eval_lib.evaluate_variables(
      _config(data_dir, rerank='superglobal', qe_k=1), _no_extraction, VARIABLES, out_dir
    )


def test_model_overrides_reach_the_model(tmp_path):
  """eval.gem_plus_p / regional_gem / relu_plus are applied to our model and to released weights
  (what each module computes is tested in tests/test_models.py)."""
  from configs import tiny
  from dolg_jax import models, pretrained

  cfg = tiny.get_config()
  shapes = jax.eval_shape(
    lambda: models.build_model(cfg.model).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False
    )
  )
  conv = os.path.join(tmp_path, 'conv')
  pretrained.save_converted(
    conv, cfg.model, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  )
  assert eval_lib.model_overrides(cfg) == {}
  on = {'gem_plus_p': 4.6, 'regional_gem': True, 'relu_plus': 0.014}
  for field, value in on.items():
    setattr(cfg.eval, field, value)
  assert eval_lib.model_overrides(cfg) == on
  released_fn, _, _ = eval_lib.load_model(cfg, checkpoint=conv)
  for model in (eval_lib.make_apply_fn(cfg).model, released_fn.model):
    assert {f: getattr(model, f) for f in on} == on
  cfg.model.global_pool = 'gap'
  with pytest.raises(ValueError, match='config.eval overrides'):
    eval_lib.make_apply_fn(cfg)


def test_gldv2_retrieval_end_to_end(tmp_path):
  """gldv2_retrieval in eval.datasets: the official-layout fixture with landmark colours and the
  mean-colour stand-in model give the known mAP@100 / mP@100, plain and re-ranked (the second
  from the cached descriptors and ids)."""
  fix = gldv2_retrieval_fixture.write_fixture(str(tmp_path / 'manual'), landmark_colours=True)
  data = str(tmp_path / 'data')
  gldv2_retrieval.prepare(fix.manual_dir, data, allow_missing=True)
  out_dir = str(tmp_path / 'out')
  miss = fix.missing_test[0]
  want = {'public': (4 - (miss in fix.public)) / 4, 'private': (4 - (miss in fix.private)) / 4}
  runs = ((mean_colour_apply, ''), (_no_extraction, 'superglobal'))
  for apply_fn, rr in runs:
    c = _config(data, datasets=('gldv2_retrieval',), rerank=rr, use_distractors=False)
    out = eval_lib.evaluate_variables(c, apply_fn, VARIABLES, out_dir)
    res = out['results']['gldv2_retrieval']['base']
    for subset in ('public', 'private'):
      assert res[subset]['map@100'] == pytest.approx(want[subset], abs=1e-12)
      assert res[subset]['mp@100'] == pytest.approx(want[subset] * 0.03, abs=1e-12)
      assert res[subset]['num_index'] == 16 and res[subset]['num_queries'] == 4
    assert 'Public mAP@100' in out['table'] and ('gldv2_retrieval SG' in out['table']) == bool(rr)
  assert out['compile_count'] == 0
  assert set(scoring.flat_maps(out['results'])) == {
    'map@100/gldv2_retrieval/public',
    'map@100/gldv2_retrieval/private',
  }


def test_cli_failure_ends_with_one_line(tmp_path):
  """Nothing prepared and no such workdir: exit 1 and one last line naming the first problem met
  (the datasets are checked before the model is loaded) and the command that fixes it."""
  missing = str(tmp_path / 'no_such_run')
  proc = subprocess.run(
    [sys.executable, '-m', 'dolg_jax.eval', '--config=configs/tiny.py', f'--workdir={missing}'],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('FAILED: roxford5k, rparis6k are not prepared under'), last
  assert 'python -m dolg_jax.data.prepare --dataset=NAME' in last
  assert 'Traceback' not in proc.stderr


def test_in_training_evaluations_share_one_compiled_extractor(data_dir, tmp_path):
  """training.loop's RunEvaluator: the second evaluation (new weights) compiles nothing, the +1M
  path included (XLA backend compilations counted through jax.monitoring)."""
  from configs import tiny
  from dolg_jax import models

  c = tiny.get_config()
  c.eval = _config(data_dir, scales=(1.0,), report_queries=0).eval
  model = models.build_model(c.model, 'float32')
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 64, 64, 3)), train=False))
  weights = [init(jax.random.key(i)) for i in (1, 2)]
  compiles = []
  counting = [False]

  def listener(event, duration, **kw):
    if counting[0] and event == '/jax/core/compile/backend_compile_duration':
      compiles.append(duration)

  jax.monitoring.register_event_duration_secs_listener(listener)
  evaluator = eval_lib.RunEvaluator(c)
  first = evaluator(weights[0], str(tmp_path / 'step_1'), source='a')
  counting[0] = True
  second = evaluator(weights[1], str(tmp_path / 'step_2'), source='b')
  counting[0] = False
  assert first['model_hash'] != second['model_hash']  # new weights, extracted again
  assert not compiles, f'the second in-training evaluation compiled {len(compiles)} program(s)'
