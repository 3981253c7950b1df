"""python -m dolg_jax.study on three tiny runs (two seeds of one config, one ablation).

The runs' manifest.json files are written by the training loop's writer (training/manifest.py) and
their results.json tables by dolg_jax.eval's scorer on random descriptors, in the file layout
dolg_jax.eval and the training loop use (eval/results.json, eval/step_N/results.json).
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import ablation
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import scoring
from dolg_jax.retrieval import study
from dolg_jax.training import manifest as manifest_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gnd(rng, n_db, n_q):
  gnd = []
  for _ in range(n_q):
    ids = rng.permutation(n_db)[:7]
    gnd.append({'easy': ids[:3].tolist(), 'hard': ids[3:5].tolist(), 'junk': ids[5:].tolist()})
  return gnd


def _write_run(workdir, config, seed, results_subdir='eval'):
  """A run directory: manifest.json (real writer) and results.json (real scorer, eval's keys)."""
  config.seed = seed
  os.makedirs(workdir, exist_ok=True)
  manifest_lib.write_manifest(
    workdir,
    manifest_lib.build_manifest(
      config,
      seeds={'seed': seed, 'data_seed': seed + 1},
      dataset={'name': config.data.dataset, 'splits': {'train': 100}, 'num_classes': 8},
    ),
  )
  rng = np.random.default_rng(
    seed + 100 * len(config.model.to_dict()) + (0 if config.model.use_local_branch else 7)
  )
  results = {}
  distractors = rng.normal(size=(40, 8)).astype(np.float32)
  for k, name in enumerate(('roxford5k', 'rparis6k')):
    g = np.random.default_rng(k)
    gnd = _gnd(g, 30, 6)
    db = rng.normal(size=(30, 8)).astype(np.float32)
    q = db[[x['easy'][0] for x in gnd]] + rng.normal(scale=1.5, size=(6, 8)).astype(np.float32)
    res = scoring.score_dataset(q, db, gnd, config.eval, distractors)
    res.pop('topk')
    results[name] = res
  out = {
    'source': f'ours:{workdir}',
    'model_hash': f'{seed:016x}-float32',
    'extraction': extract_lib.from_config(config.eval).key(),
    'search': {k: config.eval.get(k) for k in ('qe_k', 'qe_alpha', 'dba_k', 'dba_alpha')},
    'use_distractors': True,
    'results': results,
    'compile_count': 1,
    'reports': {},
    'seconds': 1.0,
  }
  out_dir = os.path.join(workdir, results_subdir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(out, f, indent=1)
  return out


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('runs')
  made = {}
  for name, variant, seed, sub in (
    ('full_s0', 'full', 0, 'eval'),
    ('full_s1', 'full', 1, os.path.join('eval', 'step_40')),
    ('no_local_s0', 'no_local', 0, 'eval'),
  ):
    config = ablation.get_config(variant)
    config.eval.use_distractors = True
    made[name] = (str(root / name), _write_run(str(root / name), config, seed, sub))
  # An older evaluation of full_s1 that must not be picked (step_40 is the latest).
  _write_run(str(root / 'full_s1'), ablation.get_config('full'), 1, os.path.join('eval', 'step_20'))
  return made


def _maps(results, dataset, setting, protocol):
  return 100 * results['results'][dataset][setting][protocol]['map']


def test_study_command_table_mean_std_fields_and_flags(runs, tmp_path):
  out_dir = str(tmp_path / 'study')
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
    [sys.executable, '-m', 'dolg_jax.study', *[w for w, _ in runs.values()], f'--out={out_dir}'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout
  print(table)
  lines = [l for l in table.splitlines() if l.startswith('| ')]
  assert lines[0].startswith('| row | n | ROxf E | ROxf M | ROxf H | RPar E')
  assert 'ROxf+1M M' in lines[0]
  rows = {l.split(' | ')[0][2:]: l for l in lines[1:]}
  assert set(rows) == {
    'full_s0+full_s1',
    '*DOLG R50, paper [paper_r50]*',
    'no_local_s0',
    '*DOLG R50 no_local, paper ablation [paper_ablation_r50_no_local]*',
  }
  s0, s1 = runs['full_s0'][1], runs['full_s1'][1]
  with open(os.path.join(out_dir, 'study.json')) as f:
    data = json.load(f)
  assert data['differing_fields'] == ['ablation', 'model.use_local_branch']
  full = next(r for r in data['rows'] if r['label'] == 'full_s0+full_s1')
  assert full['n'] == 2 and full['seeds'] == '0,1' and full['compared_to'] == 'paper_r50'
  for d in ('roxford5k', 'rparis6k'):
    for s in ('base', '+1m'):
      for p in ('easy', 'medium', 'hard'):
        vals = [_maps(s0, d, s, p), _maps(s1, d, s, p)]
        key = f'{d}/{s}/{p}'
        assert full['mean'][key] == pytest.approx(np.mean(vals), abs=1e-9)
        assert full['std'][key] == pytest.approx(np.std(vals, ddof=1), abs=1e-9)
  assert full['delta']['roxford5k/base/medium'] == pytest.approx(
    np.mean([_maps(s0, 'roxford5k', 'base', 'medium'), _maps(s1, 'roxford5k', 'base', 'medium')])
    - 80.5
  )
  assert full['delta']['roxford5k/base/easy'] is None  # not published
  # The paper's Table 1 gives +1M Medium / Hard: deltas, and no '+1M: not published' flag.
  assert full['delta']['rparis6k/+1m/hard'] == pytest.approx(
    np.mean([_maps(s0, 'rparis6k', '+1m', 'hard'), _maps(s1, 'rparis6k', '+1m', 'hard')]) - 62.83
  )
  assert full['delta']['roxford5k/+1m/easy'] is None
  assert full['fields'] == 'ablation=full, model.use_local_branch=True'
  assert 'query crop vs no crop' in full['flags'] and '+1M' not in full['flags']
  assert 'training set gldv2/clean vs gldv2/clean_all' in full['flags']
  assert 'scales: published unknown' in full['flags']
  # The printed Markdown shows mean ± std (delta) for the two seeds.
  m = np.mean([_maps(s0, 'rparis6k', 'base', 'hard'), _maps(s1, 'rparis6k', 'base', 'hard')])
  sd = np.std(
    [_maps(s0, 'rparis6k', 'base', 'hard'), _maps(s1, 'rparis6k', 'base', 'hard')], ddof=1
  )
  assert f'{m:.2f} ± {sd:.2f} ({m - 77.7:+.2f})' in rows['full_s0+full_s1']
  abl = next(r for r in data['rows'] if r['label'] == 'no_local_s0')
  assert abl['n'] == 1 and abl['std']['roxford5k/base/hard'] is None
  assert abl['compared_to'] == 'paper_ablation_r50_no_local'
  assert abl['delta']['rparis6k/base/hard'] == pytest.approx(
    _maps(runs['no_local_s0'][1], 'rparis6k', 'base', 'hard') - 76.17
  )
  # The ablation table has no +1M columns.
  assert abl['delta']['roxford5k/+1m/medium'] is None and '+1M: not published' in abl['flags']
  with open(os.path.join(out_dir, 'study.csv')) as f:
    csv_rows = list(csv.DictReader(f))
  assert [r['kind'] for r in csv_rows] == ['ours', 'published', 'ours', 'published']
  assert float(csv_rows[0]['roxford5k_medium_mean']) == pytest.approx(
    full['mean']['roxford5k/base/medium'], abs=1e-4
  )
  assert csv_rows[1]['rparis6k_hard_mean'] == '77.7000' and csv_rows[1]['rparis6k_easy_mean'] == ''
  with Image.open(os.path.join(out_dir, 'study.png')) as im:
    assert im.size[0] > 400 and im.size[1] > 300


def test_compare_to_official_cropped_flags_scales(runs, tmp_path):
  out = study.write_study(
    [runs['full_s0'][0]], str(tmp_path / 's'), compare_to='official_r50_cropped'
  )
  row = out['rows'][0]
  assert row.compared_to == 'official_r50_cropped'
  assert 'scales 3 [0.7071, 1.0, 1.4142] vs 5' in row.flags and 'crop' not in row.flags
  assert out['fields'] == []


def test_bad_inputs_name_the_directory(runs, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(study.StudyError, match='no results.json .* python -m dolg_jax.eval'):
    study.write_study([str(empty)], str(tmp_path / 'o'))
  with pytest.raises(study.StudyError, match='not a published row'):
    study.write_study([runs['full_s0'][0]], str(tmp_path / 'o'), compare_to='paper_r5O')
  broken = tmp_path / 'broken'
  (broken / 'eval').mkdir(parents=True)
  (broken / 'eval' / 'results.json').write_text('{"results": ')
  with pytest.raises(study.StudyError, match='not valid JSON'):
    study.write_study([str(broken)], str(tmp_path / 'o'))


def test_published_data_has_sources_and_the_verified_numbers():
  """The values as their sources print them (published_results.json names the commit of each):
  the paper's Table 1 (imgs/result_overview.png of feymanpriv/DOLG), the official README's table
  and the paper's ablation table."""
  data = study.load_published()
  rows = {r['id']: r for r in data['rows']}
  mh = lambda r, s='base': [
    r['map'][d][s][p] for d in ('roxford5k', 'rparis6k') for p in ('medium', 'hard')
  ]
  assert mh(rows['paper_r50']) == [80.5, 58.82, 89.81, 77.7]
  assert mh(rows['paper_r50'], '+1m') == [76.58, 52.21, 80.79, 62.83]
  assert mh(rows['paper_r101']) == [81.5, 61.1, 91.02, 80.3]
  assert mh(rows['paper_r101'], '+1m') == [77.43, 54.81, 83.29, 66.69]
  assert mh(rows['official_r101_cropped']) == [82.37, 64.93, 90.97, 81.71]
  assert mh(rows['official_r101_cropped'], '+1m') == [73.63, 51.57, 80.44, 62.95]
  assert mh(rows['official_r50_cropped'], '+1m') == [71.36, 47.34, 78.99, 59.75]
  assert mh(rows['official_r50_uncropped'], '+1m') == [77.78, 55.48, 82.16, 65.77]
  assert mh(rows['official_r101_uncropped'], '+1m') == [78.96, 57.86, 82.89, 67.34]
  assert mh(rows['paper_ablation_r50_no_self_attention']) == [78.15, 55.34, 89.48, 77.16]
  for r in rows.values():  # Easy is in none of these sources, +1M not in the ablation table.
    assert all(
      r['map'][d][s]['easy'] is None for d in ('roxford5k', 'rparis6k') for s in ('base', '+1m')
    )
    if r['source'] == 'paper_ablation':
      assert mh(r, '+1m') == [None] * 4
    assert r['source'] in data['sources']
  for name in ('paper_main', 'official_readme'):
    source = data['sources'][name]
    assert len(source['commit']) == 40 and source['commit'] in source['url']


def test_other_protocol_is_its_own_row_and_runs_without_manifest_are_marked(runs, tmp_path):
  src = runs['full_s0'][0]
  qe = tmp_path / 'full_s0_qe'
  (qe / 'eval').mkdir(parents=True)
  with open(os.path.join(src, 'manifest.json')) as f:
    (qe / 'manifest.json').write_text(f.read())
  results = dict(
    runs['full_s0'][1], search={'qe_k': 2, 'qe_alpha': 3.0, 'dba_k': 0, 'dba_alpha': 3.0}
  )
  (qe / 'eval' / 'results.json').write_text(json.dumps(results))
  released = tmp_path / 'released_eval'  # `dolg_jax.eval --checkpoint=...` output only.
  released.mkdir()
  (released / 'results.json').write_text(json.dumps(runs['full_s0'][1]))
  out = study.write_study([src, runs['full_s1'][0], str(qe), str(released)], str(tmp_path / 'o'))
  ours = [r for r in out['rows'] if r.kind == 'ours']
  assert [r.label for r in ours] == ['full_s0+full_s1', 'full_s0_qe', 'released_eval']
  assert 'search qe_k=2 dba_k=0 vs none' in ours[1].flags
  assert ours[2].fields == 'no manifest.json: config unknown'
  assert ours[2].flags == 'no published row of this depth/variant' and not ours[2].compared_to
  assert out['fields'] == []
