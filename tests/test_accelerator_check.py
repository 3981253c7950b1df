"""launch/accelerator_check.sh --smoke: every part (PyTorch reference, train, extraction, input
pipeline) runs on CPU at tiny sizes and lands in one JSON file with the JAX/PyTorch ratio."""

import json
import os
import subprocess
import sys

from tests.helpers import train_testlib as tl


def test_accelerator_check_smoke(tmp_path):
  out = tmp_path / 'check'
  proc = subprocess.run(['bash', 'launch/accelerator_check.sh', '--smoke', str(out)], cwd=tl.REPO,
                        env=tl.env(PYTHON=sys.executable), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, tl.explain(proc)
  assert sorted(os.listdir(out)) == ['accelerator_check.json', 'torch_reference.json']
  res = json.loads((out / 'accelerator_check.json').read_text())
  assert res['smoke'] and res['platform'] == 'cpu'
  assert [(r['depth'], r['batch_per_device']) for r in res['train']] == [(50, 2), (101, 2)]
  for r in res['train']:
    assert 'error' not in r, r
    assert r['images_per_sec'] > 0 and r['images_per_sec_per_device'] == r['images_per_sec']
    assert r['gflop_per_step'] > 0 and 'fraction_of_peak' not in r   # CPU: no peak
  (ext,) = res['extraction']
  assert 'error' not in ext, ext
  assert ext['images_per_sec'] > 0 and len(ext['scales']) == 3 and ext['compilations'] >= 1
  assert ext['roxf_rpar_projected_s'] == ext['seconds'] * 11455 / ext['images']
  pipe = res['pipeline']
  assert 'error' not in pipe and pipe['images_per_sec'] > 0, pipe
  torch_train = res['torch']['train']
  assert [r['depth'] for r in torch_train] == [50, 101] and res['torch']['amp_dtype'] == 'bfloat16'
  ratios = res['jax_over_torch']
  assert len(ratios) == 2
  for r in ratios:
    assert r['jax_over_torch'] == r['jax_images_per_sec'] / r['torch_images_per_sec'] > 0


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
  """An unknown compute dtype breaks training and extraction; the pipeline part still runs and
  every error is in the JSON."""
  out = tmp_path / 'check.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'dolg_jax.tools.accelerator_check', '--smoke',
       '--config=configs/tiny.py', '--config.compute_dtype=float7', '--extract_dtypes=float7',
       '--depths=50', f'--output={out}', f'--torch_result={tmp_path}/missing.json'],
      cwd=tl.REPO, env=tl.env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, tl.explain(proc)
  res = json.loads(out.read_text())
  assert 'float7' in res['train'][0]['error']
  assert 'float7' in res['extraction'][0]['error']
  assert res['pipeline']['images_per_sec'] > 0
  assert 'No such file' in res['torch']['error'] and 'jax_over_torch' not in res
