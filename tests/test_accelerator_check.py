"""launch/accelerator_check.sh --smoke: every part (PyTorch reference, train, extraction, input
pipeline) runs on CPU at tiny sizes and lands in one JSON file with the JAX/PyTorch ratio; the
extraction throughput counts real images; the ratio pairs the same (depth, batch)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from dolg_jax.retrieval import extract as ex
from dolg_jax.tools import accelerator_check
from dolg_jax.tools import bench_eval
from tests.helpers import train_testlib as tl
from tests.helpers.eval_config import extract_config


def test_accelerator_check_smoke(tmp_path):
  out = tmp_path / 'check'
  proc = subprocess.run(
    ['bash', 'launch/accelerator_check.sh', '--smoke', str(out)],
    cwd=tl.REPO,
    env=tl.env(PYTHON=sys.executable),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, tl.explain(proc)
  assert sorted(os.listdir(out)) == ['accelerator_check.json', 'torch_reference.json']
  res = json.loads((out / 'accelerator_check.json').read_text())
  assert res['smoke'] and res['platform'] == 'cpu'
  assert [(r['depth'], r['batch_per_device']) for r in res['train']] == [(50, 2), (101, 2)]
  for r in res['train']:
    assert 'error' not in r, r
    assert r['images_per_sec'] > 0 and r['images_per_sec_per_device'] == r['images_per_sec']
    assert r['gflop_per_step'] > 0 and 'fraction_of_peak' not in r  # CPU: no peak
  (ext,) = res['extraction']
  assert 'error' not in ext, ext
  assert ext['input'] == 'jpeg' and ext['images'] == 4 and ext['images_per_sec'] > 0
  assert len(ext['scales']) == 3 and ext['compilations'] >= 1
  # 4 real images x 3 scales, in batches padded to the eval batch (16): most slots are padding.
  assert ext['image_scales'] == 12 and ext['batch_slots'] % ext['batch_size'] == 0
  assert ext['batch_slots'] > 12 and ext['slot_fill'] < 1.0
  assert 'roxf_rpar_projected_s' not in ext  # no projection from one size without crops
  pipe = res['pipeline']
  assert 'error' not in pipe and pipe['images_per_sec'] > 0, pipe
  torch_train = res['torch']['train']
  assert [r['depth'] for r in torch_train] == [50, 101] and res['torch']['amp_dtype'] == 'bfloat16'
  ratios = res['jax_over_torch']
  assert [(r['depth'], r['batch_per_device']) for r in ratios] == [(50, 2), (101, 2)]
  assert all(r['jax_over_torch'] > 0 for r in ratios)


def test_ratios_pair_the_same_depth_and_batch():
  """Torch's list in another order, with a failed and an unmatched entry: each JAX figure is
  divided by the PyTorch figure of its own (depth, per-device batch), the rest left out."""
  train = [
    {'depth': 50, 'batch_per_device': 32, 'images_per_sec': 300.0},
    {'depth': 101, 'batch_per_device': 32, 'images_per_sec': 100.0},
    {'depth': 50, 'batch_per_device': 64, 'error': 'OOM'},
    {'depth': 101, 'batch_per_device': 64, 'images_per_sec': 90.0},
  ]
  torch_result = {
    'train': [
      {'depth': 101, 'batch': 32, 'images_per_sec': 50.0},
      {'depth': 50, 'batch': 64, 'images_per_sec': 10.0},
      {'depth': 101, 'batch': 64, 'error': 'OOM'},
      {'depth': 50, 'batch': 32, 'images_per_sec': 600.0},
    ]
  }
  out = accelerator_check.torch_ratios(train, torch_result)
  assert [(r['depth'], r['batch_per_device'], r['jax_over_torch']) for r in out] == [
    (50, 32, 0.5),
    (101, 32, 2.0),
  ]


def _stand_in(variables, images, valid_hw=None):
  return images.astype(jnp.float32).mean((1, 2)) @ variables['w']


@pytest.mark.parametrize('n_images, fill', [(2, 2 / 16), (16, 1.0)])
def test_extraction_throughput_counts_real_images(n_images, fill):
  """2 images at 3 scales run 3 batches of 16 slots: 2 images (6 image-scales in 48 slots) are
  counted, not 48; 16 images fill every slot."""
  rng = np.random.default_rng(0)
  examples = [
    {'index': i, 'image': rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)}
    for i in range(n_images)
  ]
  cfg = extract_config(scales=(0.7071, 1.0, 1.4142), batch_size=16, num_workers=0, pad=True)
  r = bench_eval.time_extraction(ex.Extractor(_stand_in, {'w': jnp.ones((3, 4))}, cfg), examples)
  assert r['images'] == n_images and r['image_scales'] == 3 * n_images
  assert r['batch_slots'] == 48 and r['slot_fill'] == pytest.approx(fill)
  assert r['compilations'] == 3 and r['seconds'] > 0


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
  """An unknown compute dtype breaks training and extraction; the pipeline part still runs and
  every error is in the JSON."""
  out = tmp_path / 'check.json'
  proc = subprocess.run(
    [
      sys.executable,
      '-m',
      'dolg_jax.tools.accelerator_check',
      '--smoke',
      '--config=configs/tiny.py',
      '--config.compute_dtype=float7',
      '--extract_dtypes=float7',
      '--depths=50',
      f'--output={out}',
      f'--torch_result={tmp_path}/missing.json',
    ],
    cwd=tl.REPO,
    env=tl.env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, tl.explain(proc)
  res = json.loads(out.read_text())
  assert 'float7' in res['train'][0]['error']
  assert 'float7' in res['extraction'][0]['error']
  assert res['pipeline']['images_per_sec'] > 0
  assert 'No such file' in res['torch']['error'] and 'jax_over_torch' not in res
