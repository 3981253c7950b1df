"""python -m dolg_jax.export: model.onnx in onnxruntime and model.jax_export in a jax-only process,
both against the JAX model at two sizes and batch 2; a mismatch ends in one FAILED line.

One export (the command, on a tiny converted checkpoint) is shared by the module's tests.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import pytest

from configs import tiny
from dolg_jax import models
from dolg_jax import pretrained
from dolg_jax.retrieval import export as export_lib
from dolg_jax.training import failures
from dolg_jax.weights import released
from tests.helpers.paths import REPO

SHAPES = ((2, 64, 96), (1, 113, 72))  # two sizes, batch 2 (H, W not multiples of 32 in the 2nd)


def _perturbed(variables, seed=1):
  """Random non-trivial BN statistics, scales and biases (so eval-mode BN is really exported)."""
  rng = np.random.RandomState(seed)

  def perturb(path, x):
    name = jax.tree_util.keystr(path)
    x = np.asarray(x, np.float32)
    if "'var'" in name:
      return rng.uniform(0.5, 2.0, x.shape).astype(np.float32)
    if "'mean'" in name or "'bias'" in name:
      return (0.1 * rng.randn(*x.shape)).astype(np.float32)
    if "'scale'" in name:
      return rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    return x

  return jax.tree_util.tree_map_with_path(perturb, jax.tree.map(np.asarray, dict(variables)))


def _images(n, h, w, seed):
  return np.random.RandomState(seed).randint(0, 256, (n, h, w, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """The command run once on a tiny converted checkpoint; the JAX reference of the same file."""
  d = tmp_path_factory.mktemp('export')
  cfg = tiny.get_config()
  model = models.build_model(cfg.model)
  variables = _perturbed(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False))
  ckpt = str(d / 'tiny_converted')
  pretrained.save_converted(ckpt, cfg.model, variables)
  out = str(d / 'exported')
  res = subprocess.run(
    [
      sys.executable,
      '-m',
      'dolg_jax.export',
      '--config=configs/tiny.py',
      f'--checkpoint={ckpt}',
      f'--out={out}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  ref_model, ref_vars = released.load(ckpt)
  reference = jax.jit(lambda x: ref_model.apply(ref_vars, x, train=False))

  def expected(images):
    d = np.asarray(reference(images), np.float32)
    return d / np.linalg.norm(d, axis=1, keepdims=True)

  return {
    'dir': d,
    'ckpt': ckpt,
    'out': out,
    'res': res,
    'expected': expected,
    'model': ref_model,
    'variables': ref_vars,
  }


def test_command_writes_and_verifies_both(exported):
  res = exported['res']
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'worst relative error: onnx' in res.stdout
  out = exported['out']
  assert os.path.isfile(os.path.join(out, 'model.onnx'))
  assert os.path.isfile(os.path.join(out, 'model.jax_export'))
  with open(os.path.join(out, 'export.json')) as f:
    summary = json.load(f)
  assert summary['verified'] and summary['source'].startswith('released:')
  checked = [tuple(r['shape']) for r in summary['verification']['shapes']]
  assert len({s[1:] for s in checked}) >= 2 and any(s[0] == 2 for s in checked)
  assert max(summary['verification']['worst'].values()) <= 1e-4
  assert summary['output']['shape'] == ['N', 16] and summary['platforms'] == ['cpu', 'cuda']
  assert not [f for f in os.listdir(out) if '.tmp' in f]  # written under temporary names


def test_onnx_runtime_dynamic_n_h_w(exported):
  session = onnxruntime.InferenceSession(
    os.path.join(exported['out'], 'model.onnx'), providers=['CPUExecutionProvider']
  )
  (inp,), (outp,) = session.get_inputs(), session.get_outputs()
  assert inp.shape[:3] == ['N', 'H', 'W'] and inp.shape[3] == 3 and inp.type == 'tensor(float)'
  for k, (n, h, w) in enumerate(SHAPES):
    images = _images(n, h, w, seed=10 + k)
    got = session.run([outp.name], {inp.name: images})[0]
    want = exported['expected'](images)
    assert got.shape == (n, 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert export_lib.relative_error(got, want) < 1e-4


JAX_ONLY = r'''
import sys
import numpy as np
import jax
with open(sys.argv[1], 'rb') as f:
  exp = jax.export.deserialize(bytearray(f.read()))
data = np.load(sys.argv[2])
out = {k: np.asarray(exp.call(data[k])) for k in data.files}
np.savez(sys.argv[3], **out)
assert 'dolg_jax' not in sys.modules and 'flax' not in sys.modules, sorted(sys.modules)
print('platforms', ','.join(exp.platforms))
'''


def test_jax_export_runs_with_only_jax_and_numpy(exported, tmp_path):
  images = {f'x{k}': _images(n, h, w, seed=20 + k) for k, (n, h, w) in enumerate(SHAPES)}
  np.savez(tmp_path / 'in.npz', **images)
  res = subprocess.run(
    [
      sys.executable,
      '-c',
      JAX_ONLY,
      os.path.join(exported['out'], 'model.jax_export'),
      str(tmp_path / 'in.npz'),
      str(tmp_path / 'out.npz'),
    ],
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=''),
  )
  assert res.returncode == 0, res.stderr[-3000:]
  assert 'platforms cpu,cuda' in res.stdout
  got = np.load(tmp_path / 'out.npz')
  for k, x in images.items():
    assert got[k].shape == (x.shape[0], 16)
    assert export_lib.relative_error(got[k], exported['expected'](x)) < 1e-4


def test_mismatch_is_detected_and_ends_in_one_failed_line(exported, tmp_path, monkeypatch):
  """An ONNX model of other weights than the JAX model: export_model refuses the export."""
  with open(os.path.join(exported['out'], 'model.onnx'), 'rb') as f:
    onnx_bytes = f.read()

  class Stale:  # the earlier export's ONNX model stands in for this one's
    def SerializeToString(self):
      return onnx_bytes

  monkeypatch.setattr(export_lib, 'export_onnx', lambda fn, spec=None: Stale())
  other = jax.tree.map(lambda v: v, exported['variables'])
  other['params']['fc']['bias'] = other['params']['fc']['bias'] + 0.5
  model = exported['model']
  fn = export_lib.descriptor_fn(lambda v, x: model.apply(v, x, train=False), other)
  lines = []
  with pytest.raises(export_lib.ExportMismatchError) as err:
    export_lib.export_model(
      fn, str(tmp_path / 'bad'), verify_shapes=((2, 64, 64),), log=lines.append
    )
  line = failures.describe(err.value, str(tmp_path / 'bad'))
  assert line.startswith('FAILED: the exported model disagrees') and '\n' not in line
  assert 'onnx' in line and 'jax_export' not in line.split('>')[0]  # only the ONNX one is off
  with open(tmp_path / 'bad' / 'export.json') as f:
    assert json.load(f)['verified'] is False
  assert any('relative error onnx' in s for s in lines)


def test_missing_checkpoint_fails_in_one_line(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    export_lib.run(
      tiny.get_config(), checkpoint=str(tmp_path / 'nowhere'), out_dir=str(tmp_path / 'out')
    )
  line = failures.describe(err.value, str(tmp_path / 'out'))
  assert line.startswith('FAILED: ') and 'nowhere does not exist' in line and '\n' not in line
  assert not os.path.exists(tmp_path / 'out' / 'model.onnx')


@pytest.mark.parametrize('shape', [(0, 64, 64), (1, 63, 64), (2, 96, 32)])
def test_both_refuse_batch_0_and_sides_under_64_alike(exported, shape):
  images = np.zeros(shape + (3,), np.float32)
  session = export_lib.onnx_session(os.path.join(exported['out'], export_lib.ONNX_FILE))
  with pytest.raises(Exception, match='Input shapes do not match the') as onnx_error:
    session.run([export_lib.OUTPUT_NAME], {export_lib.INPUT_NAME: images})
  assert 'N >= 1, H >= 64, W >= 64' in str(onnx_error.value)
  exported_fn = export_lib.load_jax_export(
    os.path.join(exported['out'], export_lib.JAX_EXPORT_FILE)
  )
  with pytest.raises(ValueError, match='Input shapes do not match the'):
    exported_fn.call(images)
