"""Numerical parity: official DOLG forward (tests/helpers/torch_reference.py) vs our Flax model.

Random weights (fixed seeds) with randomised eval-mode BN statistics are saved as torch files,
imported with `dolg_jax.pretrained.load` and run on float32 RGB images of odd sizes. The torch side
gets the official input (BGR, /255, BGR mean/std); ours the RGB images. Relative error =
max |ours - torch| / max |torch|, over the (N, 512) descriptors (the contract: < 1e-4) and, because
a descriptor dominated by f_g could hide a wrong local branch, also over f_g, f_o and the res3 map.
Run with `-s` to see the measured errors.
"""

import functools
import os

import jax
import numpy as np
import pytest
import torch

from dolg_jax import pretrained

from tests.helpers import torch_reference as ref_lib

TOL = 1e-4
SIZES = ((200, 264), (333, 250))


def _images(h: int, w: int, n: int, seed: int) -> np.ndarray:
  """Smooth-ish RGB images in [0, 255]: random noise plus a gradient, float32."""
  rng = np.random.RandomState(seed)
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
  base = np.stack([yy, xx, 1 - yy * xx], -1)[None] * 160
  return np.clip(base + rng.uniform(0, 95, (n, h, w, 3)), 0, 255).astype(np.float32)


def _rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _torch_forward(model: torch.nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
  with torch.no_grad():
    feats = model.forward_features(ref_lib.preprocess_rgb(images))
  return {
    'descriptor': feats['descriptor'].numpy(),
    'f_g': feats['f_g'].numpy(),
    'f_o': feats['f_o'].numpy(),
    'res3': feats['res3'].numpy().transpose(0, 2, 3, 1),
  }


VARIANTS = {
  # name: (reference kwargs, image sizes and batch, file kind)
  'r50_released': (
    dict(depth=50, with_aspp=False, gem_p=3.4, gem_p_learnable=True),
    ((200, 264, 2), (333, 250, 1)),
    'pyth',
  ),
  'r50_multi_atrous': (
    dict(depth=50, with_aspp=True, gem_p=3.0, gem_p_learnable=False),
    ((200, 264, 1), (333, 250, 1)),
    'pth',
  ),
  'r101': (
    dict(depth=101, with_aspp=False, gem_p=3.1, gem_p_learnable=True),
    ((200, 264, 1),),
    'pth_module',
  ),
}


def _save(model: torch.nn.Module, path: str, kind: str) -> None:
  sd = model.state_dict()
  if kind == 'pyth':  # the pycls container
    torch.save(
      {
        'epoch': 7,
        'model_state': sd,
        'optimizer_state': {'state': {}, 'param_groups': []},
        'cfg': 'MODEL:\n  TYPE: dolg\n',
      },
      path,
    )
  elif kind == 'pth_module':  # DataParallel-prefixed raw state dict
    torch.save({'module.' + k: v for k, v in sd.items()}, path)
  else:
    torch.save(sd, path)


def _make_variant(name: str, directory) -> tuple:
  kwargs, sizes, kind = VARIANTS[name]
  torch.manual_seed(0)
  model = ref_lib.randomize_(ref_lib.DOLGReference(num_classes=10, **kwargs), seed=len(name))
  path = str(directory / f'{name}.{"pyth" if kind == "pyth" else "pth"}')
  _save(model, path, kind)
  cases = {}
  for i, (h, w, n) in enumerate(sizes):
    images = _images(h, w, n, seed=i)
    cases[(h, w)] = (images, _torch_forward(model, images))
  return name, model, path, cases, pretrained.load(path)


@pytest.fixture(scope='module', params=[n for n in VARIANTS if n != 'r50_released'])
def variant(request, tmp_path_factory):
  """(name, torch model, checkpoint path, {size: (images, torch features)}, (model, vars))."""
  return _make_variant(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope='module')
def released(tmp_path_factory):
  """The released variant: R50, no multi-atrous, learnable p (set to 3.4), pycls .pyth container."""
  return _make_variant('r50_released', tmp_path_factory.mktemp('released'))


def _check_parity(name, path, cases, loaded):
  flax_model, variables = loaded
  kwargs = VARIANTS[name][0]
  assert flax_model.depth == kwargs['depth']
  assert flax_model.use_multi_atrous == kwargs['with_aspp']
  assert flax_model.gem_p_learnable == kwargs['gem_p_learnable']
  if kwargs['gem_p_learnable']:
    np.testing.assert_allclose(variables['params']['pool_g']['p'], [kwargs['gem_p']], rtol=1e-6)
  else:
    assert 'pool_g' not in variables['params'] and flax_model.gem_p == 3.0
  apply = jax.jit(functools.partial(flax_model.apply, return_features=True))
  for (h, w), (images, expected) in cases.items():
    desc, feats = apply(variables, images)
    ours = {
      'descriptor': desc,
      'f_g': feats['f_g'],
      'f_o': feats['local_vec'],
      'res3': feats['res3'],
    }
    assert ours['descriptor'].shape == (images.shape[0], 512)
    errs = {k: _rel_err(np.asarray(ours[k]), expected[k]) for k in expected}
    print(
      f'\n[parity] {name} {h}x{w} batch {images.shape[0]}: max rel. error '
      + ', '.join(f'{k} {v:.2e}' for k, v in errs.items())
    )
    for k, err in errs.items():
      assert err < TOL, (name, h, w, k, err)


def test_descriptor_parity_released_variant(released):
  _check_parity(released[0], *released[2:])


def test_descriptor_parity(variant):
  _check_parity(variant[0], *variant[2:])


def test_pyth_and_raw_state_dict_give_identical_variables(released, tmp_path):
  """The pycls container, a raw state dict and a `module.`-prefixed one load the same numbers."""
  _, model, _, _, (_, reference_vars) = released
  for kind in ('pth', 'pth_module'):
    other = str(tmp_path / f'{kind}.pth')
    _save(model, other, kind)
    _, variables = pretrained.load(other)
    flat_a, flat_b = jax.tree.leaves_with_path(reference_vars), jax.tree.leaves_with_path(variables)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (p, a), (_, b) in zip(flat_a, flat_b):
      np.testing.assert_array_equal(a, b, err_msg=str(p))
    os.remove(other)


def test_stem_channels_reversed_and_layouts(released):
  """BGR->RGB on the stem's input channels; OIHW->HWIO; Linear (out, in)->(in, out); BN stats."""
  _, model, _, _, (_, variables) = released
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  p, bs = variables['params'], variables['batch_stats']
  stem = np.asarray(p['globalmodel']['stem']['conv']['kernel'])
  np.testing.assert_array_equal(
    stem, sd['globalmodel.stem.conv.weight'].transpose(2, 3, 1, 0)[:, :, ::-1]
  )
  np.testing.assert_array_equal(
    p['globalmodel']['s2']['b1']['b']['kernel'],
    sd['globalmodel.s2.b1.f.b.weight'].transpose(2, 3, 1, 0),
  )
  np.testing.assert_array_equal(p['fc_t']['kernel'], sd['fc_t.weight'].T)
  np.testing.assert_array_equal(p['fc']['bias'], sd['fc.bias'])
  np.testing.assert_array_equal(bs['localmodel']['bn']['var'], sd['localmodel.bn.running_var'])
  np.testing.assert_array_equal(
    bs['globalmodel']['s3']['b1']['bn']['mean'], sd['globalmodel.s3.b1.bn.running_mean']
  )
  np.testing.assert_array_equal(
    p['globalmodel']['s3']['b1']['bn']['scale'], sd['globalmodel.s3.b1.bn.weight']
  )
