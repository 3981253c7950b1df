"""pretrained and convert: errors, ImageNet backbones, margin head, reloading without torch.

Small widths keep this fast; full-size parity lives in test_parity.py.
"""

import argparse
import functools
import json
import io
import os
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from dolg_jax import convert
from dolg_jax import models
from dolg_jax import pretrained
from dolg_jax.weights import released
from tests.helpers import torch_reference as ref_lib
from tests.helpers.paths import REPO

WIDTH = 8  # res3 128 channels, res4 256
TINY_DEPTHS = (1, 1, 2, 1)  # blocks per stage of the small test models (inferred on import)


def _images(h, w, n=1, seed=0):
  return np.random.RandomState(seed).uniform(0, 255, (n, h, w, 3)).astype(np.float32)


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A small official-layout DOLG (width 8, blocks (1, 1, 2, 1), multi-atrous, learnable p)."""
  torch.manual_seed(1)
  model = ref_lib.randomize_(
    ref_lib.DOLGReference(
      width=WIDTH, stage_depths=TINY_DEPTHS, with_aspp=True, gem_p=2.6, num_classes=7
    ),
    seed=3,
    calib_size=64,
  )
  with torch.no_grad():
    model.desc_cls.t.fill_(0.25)
  d = tmp_path_factory.mktemp('tiny')
  sd = model.state_dict()
  pyth, pth = str(d / 'tiny.pyth'), str(d / 'tiny.pth')
  torch.save({'epoch': 3, 'model_state': sd, 'optimizer_state': {}}, pyth)
  torch.save(sd, pth)
  images = _images(97, 131)
  with torch.no_grad():
    expected = model(ref_lib.preprocess_rgb(images)).numpy()
  return {
    'model': model,
    'sd': sd,
    'pyth': pyth,
    'pth': pth,
    'dir': d,
    'images': images,
    'expected': expected,
  }


# ------------------------------------------------------------------------------- released model
def test_tiny_parity_and_inferred_config(tiny):
  model, variables = pretrained.load(tiny['pyth'])
  assert (
    tuple(model.stage_depths),
    model.width,
    model.use_multi_atrous,
    model.gem_p_learnable,
  ) == (TINY_DEPTHS, WIDTH, True, True)
  assert (model.local_dim, model.global_dim, model.atrous_dim, model.embedding_dim) == (
    16 * WIDTH,
    16 * WIDTH,
    8 * WIDTH,
    512,
  )
  assert set(variables) == {'params', 'batch_stats'}
  err = _rel_err(jax.jit(model.apply)(variables, tiny['images']), tiny['expected'])
  assert err < 1e-4, err


def test_load_head(tiny):
  head = pretrained.load_head(tiny['pth'])
  np.testing.assert_array_equal(head['weight'], tiny['sd']['desc_cls.weight'].numpy())
  assert head['weight'].shape == (7, 512)
  assert float(head['t']) == 0.25
  sd = {k: v for k, v in tiny['sd'].items() if not k.startswith('desc_cls.')}
  path = str(tiny['dir'] / 'nohead.pth')
  torch.save(sd, path)
  assert pretrained.load_head(path) is None
  pretrained.load(path)  # the head is optional for the model


@pytest.mark.parametrize('depth', [50, 101])
def test_depth_inferred_from_block_counts(tmp_path, depth):
  """R50 vs R101 from the number of s3 blocks (shapes only: nothing is run)."""
  path = str(tmp_path / f'r{depth}.pth')
  torch.save(ref_lib.DOLGReference(depth=depth, width=WIDTH).state_dict(), path)
  cfg = pretrained.load_config(path)
  assert (cfg.depth, tuple(cfg.stage_depths), cfg.use_multi_atrous, cfg.gem_p_learnable) == (
    depth,
    (),
    False,
    True,
  )
  bb_path = str(tmp_path / f'tv{depth}.pth')
  torch.save(
    ref_lib.to_torchvision_state_dict(ref_lib.ResNetBackbone(depth, WIDTH).state_dict()), bb_path
  )
  bb = pretrained.load_backbone(bb_path)
  assert len(bb['params']['globalmodel']['s3']) == {50: 6, 101: 23}[depth]


# --------------------------------------------------------------------------------------- errors
def test_error_missing_file(tmp_path):
  with pytest.raises(pretrained.CheckpointError, match='no such file'):
    pretrained.load(str(tmp_path / 'nope.pyth'))


def test_error_truncated_file(tiny, tmp_path):
  data = open(tiny['pyth'], 'rb').read()
  path = tmp_path / 'truncated.pyth'
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(pretrained.CheckpointError, match='truncated.pyth') as e:
    pretrained.load(str(path))
  message = str(e.value)
  assert 'truncated / damaged' in message and f'{len(data) // 2:,} bytes' in message
  assert 'allow_pickle' not in message


def _legacy_bytes():
  """A state dict in torch's legacy (pre-1.6, non-zip) serialization."""
  buf = io.BytesIO()
  torch.save({'w': torch.ones(4)}, buf, _use_new_zipfile_serialization=False)
  return buf.getvalue()


@pytest.mark.parametrize(
  'name, make, found',
  [
    (
      'random.pth',
      lambda: np.random.RandomState(0).bytes(4096),
      'neither the zip archive nor the pickle that torch.save writes',
    ),
    (
      'notes.txt',
      lambda: b'hello, I am not a checkpoint',
      'neither the zip archive nor the pickle that torch.save writes',
    ),
    ('empty.pth', lambda: b'', 'an empty file'),
    ('plain.pkl', lambda: pickle.dumps({'w': 1}), "a pickle without torch's magic number"),
    ('legacy_cut.pth', lambda: _legacy_bytes()[:150], 'a legacy torch file cut short'),
  ],
)
def test_error_not_a_torch_file(tmp_path, name, make, found):
  """Damaged and non-torch files are named as such, with their size, never as 'Python objects'."""
  path = tmp_path / name
  path.write_bytes(make())
  with pytest.raises(pretrained.CheckpointError) as e:
    pretrained.load(str(path))
  message = str(e.value)
  assert message.startswith(
    f'{path}: not a torch checkpoint, or a truncated / damaged one ('
    f'{path.stat().st_size:,} bytes: {found}'
  ), message
  assert 'allow_pickle' not in message and '\n' not in message
  with pytest.raises(pretrained.CheckpointError, match='truncated / damaged'):  # also when trusted
    pretrained.load(str(path), allow_pickle=True)


def test_intact_legacy_file_reads(tmp_path):
  path = tmp_path / 'legacy.pth'
  path.write_bytes(_legacy_bytes())
  assert released.load_state_dict(str(path))['w'].tolist() == [1.0] * 4


@pytest.mark.parametrize('obj', [[1, 2, 3], {'a': 1, 'b': torch.zeros(2)}, {}])
def test_error_not_a_state_dict(tmp_path, obj):
  path = str(tmp_path / 'x.pth')
  torch.save(obj, path)
  with pytest.raises(pretrained.CheckpointError, match='not a state dict'):
    pretrained.load(path)


def test_pickled_objects_need_allow_pickle(tiny, tmp_path):
  """Files with Python objects beyond tensors are refused unless the caller trusts them."""
  path = str(tmp_path / 'objects.pyth')
  torch.save({'model_state': tiny['sd'], 'cfg': argparse.Namespace(depth=50)}, path)
  with pytest.raises(pretrained.CheckpointError) as e:
    pretrained.load(path)
  assert str(e.value) == (
    f"{path}: a torch checkpoint holding Python objects besides tensors ('argparse.Namespace'); "
    'unpickling them can run code, so they are not read. If you trust the file, convert it '
    f'once with `python -m dolg_jax.convert --input {path} --output DIR --allow_pickle` and '
    'load DIR'
  )
  assert (
    convert.main(['convert', '--input', path, '--output', str(tmp_path / 'conv'), '--allow_pickle'])
    == 0
  )
  model, variables = pretrained.load(path, allow_pickle=True, dtype='bfloat16')
  assert model.dtype == jax.numpy.bfloat16
  assert variables['params']['fc']['kernel'].dtype == np.float32
  converted = pretrained.load(str(tmp_path / 'conv'))[1]
  np.testing.assert_array_equal(
    converted['params']['fc']['kernel'], variables['params']['fc']['kernel']
  )


class _RemovesAFile:
  """Unpickling this calls os.remove(path): the diagnosis of a refused file must not run it."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.remove, (self.path,)


def test_diagnosis_runs_nothing_from_the_file(tmp_path):
  sentinel = tmp_path / 'keep.txt'
  sentinel.write_text('x')
  path = str(tmp_path / 'hostile.pth')
  torch.save({'w': torch.ones(2), 'x': _RemovesAFile(str(sentinel))}, path)
  with pytest.raises(pretrained.CheckpointError, match=r"objects besides tensors \('posix.remove'"):
    pretrained.load(path)
  assert sentinel.exists()


def test_error_backbone_given_to_load(tmp_path):
  path = str(tmp_path / 'bb.pth')
  torch.save(ref_lib.ResNetBackbone(width=WIDTH, stage_depths=TINY_DEPTHS).state_dict(), path)
  with pytest.raises(pretrained.CheckpointError, match='load_backbone'):
    pretrained.load(path)


def test_error_unknown_keys_are_listed(tiny, tmp_path):
  sd = dict(tiny['sd'])
  sd['localmodel.extra.weight'] = torch.zeros(3, 3)
  sd['globalmodel.s1.b1.f.d.weight'] = torch.zeros(3, 3, 1, 1)
  path = str(tmp_path / 'extra.pth')
  torch.save(sd, path)
  with pytest.raises(pretrained.UnknownKeysError) as e:
    pretrained.load(path)
  assert e.value.keys == ['globalmodel.s1.b1.f.d.weight', 'localmodel.extra.weight']
  assert 'extra.pth' in str(e.value) and "'localmodel.extra.weight'" in str(e.value)
  assert isinstance(e.value, ValueError)


def test_error_missing_keys(tiny, tmp_path):
  sd = {
    k: v
    for k, v in tiny['sd'].items()
    if k not in ('fc.bias', 'globalmodel.s2.b1.f.b_bn.running_var')
  }
  path = str(tmp_path / 'missing.pth')
  torch.save(sd, path)
  with pytest.raises(pretrained.MissingKeysError) as e:
    pretrained.load(path)
  assert e.value.keys == ['fc.bias', 'globalmodel.s2.b1.f.b_bn.running_var']
  assert 'missing.pth' in str(e.value)


def test_error_shape_mismatch_names_key_and_shapes(tiny, tmp_path):
  sd = dict(tiny['sd'])
  sd['localmodel.conv2.weight'] = torch.zeros(1, 64, 1, 1)
  path = str(tmp_path / 'shape.pth')
  torch.save(sd, path)
  with pytest.raises(pretrained.ShapeMismatchError) as e:
    pretrained.load(path)
  msg = str(e.value)
  assert 'shape.pth' in msg
  assert 'localmodel.conv2.weight: expected (1, 128, 1, 1), got (1, 64, 1, 1)' in msg


def test_error_head_shape_mismatch(tiny, tmp_path):
  sd = dict(tiny['sd'])
  sd['desc_cls.weight'] = torch.zeros(7, 100)
  path = str(tmp_path / 'head.pth')
  torch.save(sd, path)
  with pytest.raises(pretrained.ShapeMismatchError, match='desc_cls.weight'):
    pretrained.load_head(path)


# -------------------------------------------------------------------------------------- convert
def test_convert_round_trip_without_torch(tiny, tmp_path):
  out = str(tmp_path / 'converted')
  assert convert.main(['convert', '--input', tiny['pyth'], '--output', out]) == 0
  meta = json.load(open(os.path.join(out, 'config.json')))
  assert meta['model']['width'] == WIDTH and meta['has_head']
  # Same model and variables as reading the torch file directly.
  model_a, from_torch = pretrained.load(tiny['pyth'])
  model_b, from_dir = pretrained.load(out)
  assert model_a == model_b
  leaves_a, leaves_b = jax.tree.leaves_with_path(from_torch), jax.tree.leaves_with_path(from_dir)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  for (p, a), (_, b) in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(a, b, err_msg=str(p))
  # A fresh interpreter loads the directory (model, head, backbone) without importing torch.
  script = f"""
import sys
import numpy as np
from dolg_jax import pretrained
model, variables = pretrained.load({out!r})
head = pretrained.load_head({out!r})
backbone = pretrained.load_backbone({out!r})
assert model.use_multi_atrous and variables['params']['pool_g']['p'].shape == (1,)
assert head['weight'].shape == (7, 512), head['weight'].shape
assert 'globalmodel' in backbone['params']
assert 'torch' not in sys.modules, 'torch was imported'
print('ok')
"""
  proc = subprocess.run(
    [sys.executable, '-c', script],
    cwd=REPO,
    capture_output=True,
    text=True,
    env={**os.environ, 'PYTHONPATH': REPO},
    timeout=120,
  )
  assert proc.returncode == 0 and 'ok' in proc.stdout, proc.stderr[-3000:]


def test_convert_no_head_and_overwrite(tiny, tmp_path):
  out = str(tmp_path / 'c')
  assert convert.main(['convert', '--input', tiny['pth'], '--output', out, '--nohead']) == 0
  assert pretrained.load_head(out) is None
  assert not os.path.exists(os.path.join(out, pretrained.HEAD_FILE))
  # The output exists and --overwrite is not given.
  assert convert.main(['convert', '--input', tiny['pth'], '--output', out]) == 1
  assert convert.main(['convert', '--input', tiny['pth'], '--output', out, '--overwrite']) == 0
  assert pretrained.load_head(out)['weight'].shape == (7, 512)
  assert (
    convert.main(['convert', '--input', tiny['pth'], '--output', out, '--overwrite', '--nohead'])
    == 0
  )
  assert not os.path.exists(os.path.join(out, pretrained.HEAD_FILE))


def test_convert_bad_input_exit_code(tmp_path, capsys):
  bad = tmp_path / 'bad.pyth'
  bad.write_bytes(b'\x00' * 100)
  assert convert.main(['convert', '--input', str(bad), '--output', str(tmp_path / 'o')]) == 1
  assert 'bad.pyth' in capsys.readouterr().err


def test_converted_dir_errors(tiny, tmp_path):
  out = tmp_path / 'c'
  released.convert_file(tiny['pth'], str(out), include_head=False)
  with pytest.raises(pretrained.CheckpointError, match='config.json'):
    pretrained.load(str(tmp_path))  # a directory, but not a conversion
  data = (out / pretrained.VARIABLES_FILE).read_bytes()
  (out / pretrained.VARIABLES_FILE).write_bytes(data[: len(data) // 3])
  with pytest.raises(pretrained.CheckpointError, match='variables.msgpack'):
    pretrained.load(str(out))
  meta = json.loads((out / 'config.json').read_text())
  meta['model']['use_multi_atrous'] = False  # config disagrees with the variables
  (out / pretrained.VARIABLES_FILE).write_bytes(data)
  (out / 'config.json').write_text(json.dumps(meta))
  with pytest.raises(pretrained.UnknownKeysError, match='localmodel/aspp'):
    pretrained.load(str(out))


# ------------------------------------------------------------------------------ ImageNet backbones
@pytest.fixture(scope='module')
def backbone():
  """A small pycls ResNet backbone with random weights, torch features of an image (BGR/pycls and
  RGB/torchvision preprocessing), and a DOLG model of the same width with one jitted forward."""
  torch.manual_seed(2)
  net = ref_lib.randomize_(
    ref_lib.ResNetBackbone(width=16, stage_depths=TINY_DEPTHS), seed=4, calib_size=64
  )
  images = _images(77, 101, seed=5)
  with torch.no_grad():
    bgr = [t.numpy().transpose(0, 2, 3, 1) for t in net(ref_lib.preprocess_rgb(images))]
    rgb = [t.numpy().transpose(0, 2, 3, 1) for t in net(ref_lib.preprocess_rgb_torchvision(images))]
  model, variables = _fresh_model(16)
  apply = jax.jit(functools.partial(model.apply, return_features=True))
  return {
    'net': net,
    'images': images,
    'pycls_feats': bgr,
    'tv_feats': rgb,
    'variables': variables,
    'apply': apply,
  }


def _fresh_model(width: int):
  """A DOLG model of the test backbone's shape and random variables (no init run: eval_shape)."""
  cfg = pretrained.default_model_config()
  cfg.width, cfg.stage_depths = width, TINY_DEPTHS
  cfg.local_dim = cfg.global_dim = 16 * width
  model = models.build_model(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
  rng = np.random.RandomState(0)
  variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(s.dtype), shapes)
  return model, variables


def _check_backbone(fixture, backbone_vars, expected_feats):
  variables = fixture['variables']
  merged = pretrained.merge_backbone(variables, backbone_vars)
  # Everything outside the backbone is untouched.
  np.testing.assert_array_equal(
    merged['params']['fc']['kernel'], variables['params']['fc']['kernel']
  )
  _, feats = fixture['apply'](merged, fixture['images'])
  for name, exp in zip(('res3', 'res4'), expected_feats):
    err = _rel_err(feats[name], exp)
    assert err < 1e-4, (name, err)


def test_load_backbone_pycls(backbone, tmp_path):
  """pycls R-50-1x64d-style container: BGR input, `head.fc` ignored."""
  sd = dict(backbone['net'].state_dict())
  sd['head.fc.weight'] = torch.zeros(1000, 16 * 32)
  sd['head.fc.bias'] = torch.zeros(1000)
  path = str(tmp_path / 'R-50-1x16d.pyth')
  torch.save({'epoch': 99, 'model_state': sd}, path)
  bb = pretrained.load_backbone(path)
  assert set(bb) == {'params', 'batch_stats'} and set(bb['params']) == {'globalmodel'}
  assert len(bb['params']['globalmodel']['s3']) == TINY_DEPTHS[2]
  _check_backbone(backbone, bb, backbone['pycls_feats'])


def test_load_backbone_torchvision(backbone, tmp_path):
  """torchvision keys, RGB input: no channel reversal; features equal torchvision's."""
  sd = ref_lib.to_torchvision_state_dict(backbone['net'].state_dict())
  assert 'layer3.1.downsample.1.running_var' not in sd and 'layer3.0.downsample.0.weight' in sd
  path = str(tmp_path / 'resnet50.pth')
  torch.save(sd, path)
  bb = pretrained.load_backbone(path)
  np.testing.assert_array_equal(
    bb['params']['globalmodel']['stem']['conv']['kernel'],
    sd['conv1.weight'].numpy().transpose(2, 3, 1, 0),
  )
  _check_backbone(backbone, bb, backbone['tv_feats'])


def test_load_backbone_from_dolg_checkpoint(tiny):
  bb = pretrained.load_backbone(tiny['pth'])
  _, variables = pretrained.load(tiny['pth'])
  np.testing.assert_array_equal(
    bb['params']['globalmodel']['s4']['b1']['proj']['kernel'],
    variables['params']['globalmodel']['s4']['b1']['proj']['kernel'],
  )
  assert set(bb['params']) == {'globalmodel'}


def test_load_backbone_errors(backbone, tmp_path):
  sd = ref_lib.to_torchvision_state_dict(backbone['net'].state_dict())
  sd['layer1.0.conv4.weight'] = torch.zeros(1)
  path = str(tmp_path / 'tv_extra.pth')
  torch.save(sd, path)
  with pytest.raises(pretrained.UnknownKeysError, match='layer1.0.conv4.weight'):
    pretrained.load_backbone(path)
  del sd['layer1.0.conv4.weight']
  del sd['layer3.1.bn2.running_mean']
  sd['layer2.0.downsample.0.weight'] = torch.zeros(1, 1, 1, 1)
  torch.save(sd, path)
  with pytest.raises(pretrained.MissingKeysError, match=r"'layer3.1.bn2.running_mean'"):
    pretrained.load_backbone(path)
  sd['layer3.1.bn2.running_mean'] = torch.zeros(64)
  torch.save(sd, path)
  with pytest.raises(
    pretrained.ShapeMismatchError,
    match=r'layer2.0.downsample.0.weight: expected \(128, 64, 1, 1\), '
    r'got \(1, 1, 1, 1\)',
  ):
    pretrained.load_backbone(path)
  path = str(tmp_path / 'other.pth')
  torch.save({'encoder.weight': torch.zeros(2)}, path)
  with pytest.raises(pretrained.CheckpointError, match='not a ResNet backbone'):
    pretrained.load_backbone(path)


def test_merge_backbone_width_mismatch(backbone, tmp_path):
  path = str(tmp_path / 'bb.pth')
  torch.save(backbone['net'].state_dict(), path)
  bb = pretrained.load_backbone(path)
  _, variables = _fresh_model(8)
  with pytest.raises(pretrained.ShapeMismatchError, match='globalmodel/stem/conv/kernel'):
    pretrained.merge_backbone(variables, bb)
