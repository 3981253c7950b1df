"""Tests of the DOLG model family (dolg_jax/models/{resnet,dolg}.py, build_model).

Fast by construction: tiny widths, one block per stage, 64x64 images, variables filled from numpy
(jax.random init compiles one kernel per shape, which is slow on CPU), jitted applies,
and jax.eval_shape (no compute) for the full-size parameter counts.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from dolg_jax.models import build_model, dolg, resnet

HEAD_CLASSES = 81313


def tiny_cfg(**overrides):
  c = default.get_config().model
  c.update(
    dict(
      width=4,
      stage_depths=(1, 1, 1, 1),
      local_dim=16,
      global_dim=16,
      atrous_dim=8,
      embedding_dim=8,
      atrous_rates=(1, 2, 3),
    )
  )
  c.update(overrides)
  return c


def fill_variables(model, images, seed=0):
  """Variables of `model` with random but well-scaled values (no jax.random compile cost)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1]
    shape = leaf.shape
    if name == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if name == 'p':
      return np.full(shape, 3.0, np.float32)
    return rng.normal(0.0, 0.1, shape).astype(np.float32)  # bias, mean

  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(fill(k, v)) for k, v in flat.items()})


def images(n=2, h=64, w=64, seed=0):
  """Integer-valued float32 RGB images (so a uint8 copy holds the same values)."""
  x = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3)).astype(np.float32)
  return jnp.asarray(x)


def apply(model, variables, x, **kwargs):
  """Jitted apply: one XLA compile is much cheaper on CPU than eager per-op dispatch."""
  return jax.jit(model.apply, static_argnames=('train', 'return_features', 'mutable'))(
    variables, x, **kwargs
  )


def run(cfg, x=None, dtype=jnp.float32, seed=0):
  model = build_model(cfg, dtype)
  x = images() if x is None else x
  variables = fill_variables(model, x, seed)
  desc, feats = apply(model, variables, x, return_features=True)
  return model, variables, desc, feats


@functools.lru_cache(maxsize=None)
def _run_cached(overrides):
  return run(tiny_cfg(**dict(overrides)))


def run_tiny(**overrides):
  """`run(tiny_cfg(**overrides))`, memoised: several tests share a configuration's compile."""
  return _run_cached(tuple(sorted(overrides.items())))


def flat_params(variables):
  return flax.traverse_util.flatten_dict(variables['params'], sep='/')


def np_conv(x, w, stride=1, pad=0, dilation=1, bias=None):
  """Direct NHWC x HWIO convolution in numpy with torch semantics (zero pad on both sides)."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  w = np.asarray(w, np.float64)
  kh, kw, _, cout = w.shape
  n, h, wd, _ = x.shape
  oh = (h - dilation * (kh - 1) - 1) // stride + 1
  ow = (wd - dilation * (kw - 1) - 1) // stride + 1
  out = np.zeros((n, oh, ow, cout))
  for i in range(kh):
    for j in range(kw):
      patch = x[
        :,
        i * dilation : i * dilation + stride * (oh - 1) + 1 : stride,
        j * dilation : j * dilation + stride * (ow - 1) + 1 : stride,
        :,
      ]
      out += patch @ w[i, j]
  return out if bias is None else out + np.asarray(bias)


def assert_close(a, b, rtol=1e-5, atol=1e-5):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol
  )


# ------------------------------------------------------------------ parameter counts and naming
def count_params(**overrides):
  c = default.get_config().model
  c.update(overrides)
  model = build_model(c)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)), train=False)
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params'])), shapes


def _torch_reference_sizes(depth, with_aspp, num_classes=1):
  """Element counts of the official model's parameters, built by the PyTorch reference
  (tests/helpers/torch_reference.py) on the meta device (shapes only, no memory); the margin
  head's weight separately."""
  import torch  # test-only dependency
  from tests.helpers import torch_reference as ref_lib

  with torch.device('meta'):
    model = ref_lib.DOLGReference(
      depth=depth, with_aspp=with_aspp, gem_p_learnable=True, num_classes=num_classes
    )
  sizes = {n: p.numel() for n, p in model.named_parameters()}
  head = sizes.pop('desc_cls.weight')
  return sorted(sizes.values()), head


@pytest.mark.parametrize(
  'depth, multi_atrous, official_m', [(50, False, 27.708), (50, True, 45.537), (101, False, 46.700)]
)
def test_parameter_counts_equal_the_official_model(depth, multi_atrous, official_m):
  """Every tensor's size equals the PyTorch reference's (a model built by other code), and the
  totals round to the official counts (DESIGN.md section 3)."""
  total, shapes = count_params(depth=depth, use_multi_atrous=multi_atrous, gem_p_learnable=True)
  ours = sorted(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))
  theirs, _ = _torch_reference_sizes(depth, multi_atrous)
  assert len(ours) == len(theirs) and ours == theirs
  assert round(total / 1e6, 3) == official_m


def test_parameter_count_with_the_official_head():
  """R50 with the 81,313 x 512 margin head: 69.340M (DESIGN.md section 3), as the reference."""
  total, _ = count_params(use_multi_atrous=False, gem_p_learnable=True)
  c = default.get_config()
  theirs, head = _torch_reference_sizes(50, False, num_classes=c.head.num_classes)
  head_ours = c.head.num_classes * c.model.embedding_dim
  assert c.head.num_classes == HEAD_CLASSES and head == head_ours
  assert total + head_ours == sum(theirs) + head and round((total + head_ours) / 1e6, 3) == 69.340


def test_param_tree_naming_and_layouts():
  _, shapes = count_params(use_multi_atrous=True, gem_p_learnable=True)
  p = flat_params(shapes)
  expected = {
    'globalmodel/stem/conv/kernel': (7, 7, 3, 64),
    'globalmodel/stem/bn/scale': (64,),
    'globalmodel/s1/b1/a/kernel': (1, 1, 64, 64),
    'globalmodel/s1/b1/proj/kernel': (1, 1, 64, 256),
    'globalmodel/s1/b1/bn/bias': (256,),
    'globalmodel/s2/b1/b/kernel': (3, 3, 128, 128),
    'globalmodel/s3/b6/c/kernel': (1, 1, 256, 1024),
    'globalmodel/s4/b3/c_bn/scale': (2048,),
    'pool_g/p': (1,),
    'fc_t/kernel': (2048, 1024),
    'fc/kernel': (2048, 512),
    'localmodel/aspp/im_pool/kernel': (1, 1, 1024, 512),
    'localmodel/aspp/aspp_0/kernel': (1, 1, 1024, 512),
    'localmodel/aspp/aspp_3/kernel': (3, 3, 1024, 512),
    'localmodel/aspp/conv_after/kernel': (1, 1, 2560, 1024),
    'localmodel/conv1/kernel': (1, 1, 1024, 1024),
    'localmodel/bn/scale': (1024,),
    'localmodel/conv2/kernel': (1, 1, 1024, 1),
  }
  for k, shape in expected.items():
    assert p[k].shape == shape, k
  assert 'globalmodel/s1/b2/proj/kernel' not in p  # projection only on the first block
  assert 'globalmodel/s4/b4/a/kernel' not in p
  stats = flax.traverse_util.flatten_dict(shapes['batch_stats'], sep='/')
  assert stats['localmodel/bn/mean'].shape == (1024,)
  assert stats['globalmodel/s2/b1/bn/var'].shape == (512,)
  assert all(v.dtype == jnp.float32 for v in p.values())


# ------------------------------------------------------------------ padding / backbone
@pytest.mark.parametrize(
  'hw,res3,res4',
  [((200, 264), (13, 17), (7, 9)), ((333, 250), (21, 16), (11, 8)), ((64, 64), (4, 4), (2, 2))],
)
def test_feature_map_sizes_follow_torch_padding(hw, res3, res4):
  model = build_model(tiny_cfg())
  x = jnp.zeros((1,) + hw + (3,))
  out = jax.eval_shape(
    lambda: model.init_with_output(jax.random.PRNGKey(0), x, return_features=True)[0]
  )
  _, feats = out
  assert feats['res3'].shape[1:3] == res3
  assert feats['res4'].shape[1:3] == res4


@pytest.mark.parametrize(
  'k,stride,hw,dilation',
  [(3, 2, (8, 10), 1), (7, 2, (10, 12), 1), (1, 2, (6, 8), 1), (3, 1, (9, 8), 2)],
)
def test_conv_matches_torch_padding_reference(k, stride, hw, dilation):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1,) + hw + (3,)).astype(np.float32)
  w = rng.normal(size=(k, k, 3, 4)).astype(np.float32)
  layer = resnet.conv(4, k, stride=stride, dilation=dilation)
  y = layer.apply({'params': {'kernel': jnp.asarray(w)}}, jnp.asarray(x))
  ref = np_conv(x, w, stride, dilation * (k // 2), dilation)
  assert y.shape == ref.shape
  assert_close(y, ref, 1e-4, 1e-4)
  if stride == 2 and k > 1:  # Flax 'SAME' would differ on these even sizes.
    same = jax.lax.conv_general_dilated(
      jnp.asarray(x),
      jnp.asarray(w),
      (stride, stride),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    assert not np.allclose(same, ref, atol=1e-3)


def test_max_pool_pads_with_minus_infinity():
  x = -1.0 - np.random.default_rng(0).uniform(size=(1, 6, 8, 2)).astype(np.float32)
  y = np.asarray(resnet.max_pool_torch(jnp.asarray(x)))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ref = np.stack(
    [
      np.stack([xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].max(axis=(1, 2)) for j in range(4)], 1)
      for i in range(3)
    ],
    1,
  )
  assert y.shape == (1, 3, 4, 2)
  assert_close(y, ref, 0, 0)
  assert (y < -1).all()  # zero padding would leak 0 into the border windows


def test_bottleneck_block_matches_numpy():
  """One projection block (stride 2) vs a numpy pycls ResBlock with inference BN."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 8, 6, 4)).astype(np.float32)
  block = resnet.ResBottleneckBlock(3, 12, stride=2)
  shapes = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), x, False))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  vals = {
    k: rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    if k[-1] in ('scale', 'var')
    else rng.normal(0, 0.5, v.shape).astype(np.float32)
    for k, v in flat.items()
  }
  variables = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in vals.items()})
  y = block.apply(variables, jnp.asarray(x), False)

  def bn(h, name):
    return (h - vals[('batch_stats', name, 'mean')]) / np.sqrt(
      vals[('batch_stats', name, 'var')] + 1e-5
    ) * vals[('params', name, 'scale')] + vals[('params', name, 'bias')]

  def kern(name):
    return vals[('params', name, 'kernel')]

  h = np.maximum(bn(np_conv(x, kern('a')), 'a_bn'), 0)
  h = np.maximum(bn(np_conv(h, kern('b'), 2, 1), 'b_bn'), 0)
  h = bn(np_conv(h, kern('c')), 'c_bn')
  ref = np.maximum(bn(np_conv(x, kern('proj'), 2), 'bn') + h, 0)
  assert y.shape == (1, 4, 3, 12)
  assert_close(y, ref, 1e-4, 1e-4)


def test_images_normalised_like_official_bgr_pipeline():
  rgb = np.random.default_rng(0).uniform(0, 255, (1, 4, 5, 3)).astype(np.float32)
  bgr = rgb[..., ::-1] / 255.0
  official = (bgr - np.array([0.406, 0.456, 0.485])) / np.array([0.225, 0.224, 0.229])
  assert_close(dolg.normalize_images(jnp.asarray(rgb)), official[..., ::-1], 1e-5, 1e-5)
  assert_close(
    dolg.normalize_images(jnp.asarray(rgb.astype(np.uint8))),
    dolg.normalize_images(jnp.asarray(rgb.astype(np.uint8).astype(np.float32))),
    0,
    0,
  )


# ------------------------------------------------------------------ pure fusion functions
def test_orthogonal_component_is_orthogonal_to_global():
  rng = np.random.default_rng(0)
  f_l = jnp.asarray(rng.normal(size=(3, 5, 4, 16)).astype(np.float32))
  f_g = jnp.asarray(rng.normal(size=(3, 16)).astype(np.float32) * 7)
  comp = dolg.orthogonal_component(f_l, f_g, 0.0)
  cos = jnp.sum(comp * f_g[:, None, None], -1) / (
    jnp.linalg.norm(comp, axis=-1) * jnp.linalg.norm(f_g, axis=-1)[:, None, None]
  )
  assert float(jnp.max(jnp.abs(cos))) < 1e-5
  fused = dolg.orthogonal_fusion(f_l, f_g, 0.0)
  f_o = fused[:, 16:]
  assert_close(fused[:, :16], f_g, 0, 0)
  assert float(jnp.max(jnp.abs(jnp.sum(f_o * f_g, -1)))) < 1e-4 * float(jnp.max(jnp.abs(f_g)))
  # f_l = parallel part + orthogonal part: the component of f_g * a is removed exactly.
  parallel = f_g[:, None, None] * 2.5
  assert_close(dolg.orthogonal_component(parallel + comp, f_g, 0.0), comp, 1e-4, 1e-4)


def test_orthogonal_projection_eps_and_zero_global():
  f_l = jnp.ones((1, 4))
  f_g = jnp.zeros((1, 4))
  assert_close(dolg.orthogonal_component(f_l, f_g, 1e-6), f_l, 0, 0)  # no NaN at f_g = 0
  f_g = jnp.asarray([[1e-3, 0, 0, 0]])  # |f_g|^2 = 1e-6 = eps: half of the projection is removed
  assert_close(dolg.orthogonal_component(f_l, f_g, 1e-6), [[0.5, 1, 1, 1]], 1e-5, 1e-6)


def test_pool_then_project_equals_project_then_pool():
  rng = np.random.default_rng(1)
  f_l = jnp.asarray(rng.normal(size=(2, 6, 7, 32)).astype(np.float32))
  f_g = jnp.asarray(rng.normal(size=(2, 32)).astype(np.float32))
  a = dolg.orthogonal_fusion(f_l, f_g, 1e-6)
  b = dolg.orthogonal_fusion_pooled(dolg.avg_pool(f_l), f_g, 1e-6)
  assert_close(a, b, 1e-5, 1e-6)


def test_gem_p1_is_average_pooling_and_large_p_approaches_max():
  x = jnp.asarray(np.random.default_rng(0).uniform(0.1, 2, (2, 5, 6, 8)).astype(np.float32))
  assert_close(dolg.gem_pool(x, 1.0), jnp.mean(x, (1, 2)), 1e-6, 1e-6)
  assert_close(dolg.gem_pool(x, 3.0), jnp.mean(x**3, (1, 2)) ** (1 / 3), 1e-5, 1e-6)
  big_p = dolg.gem_pool(x, 100.0)
  assert_close(big_p, jnp.max(x, (1, 2)), 0.05, 0)
  assert bool(jnp.all(big_p <= jnp.max(x, (1, 2)) * (1 + 1e-5)))
  # Negative activations are clamped at eps before the power.
  neg = -jnp.ones((1, 2, 2, 1))
  assert_close(dolg.gem_pool(neg, 3.0), [[1e-6]], 1e-4, 0)
  gem = dolg.GeM(3.0, learnable=True)
  variables = gem.init(jax.random.PRNGKey(0), x)
  assert variables['params']['p'].shape == (1,) and float(variables['params']['p'][0]) == 3.0
  assert_close(gem.apply({'params': {'p': jnp.ones((1,))}}, x), jnp.mean(x, (1, 2)), 1e-6, 1e-6)


# ------------------------------------------------------------------ full forward + ablations
def test_default_forward_contract():
  model, variables, desc, feats = run_tiny()
  assert desc.shape == (2, 8) and desc.dtype == jnp.float32
  assert set(variables) == {'params', 'batch_stats'}
  # Orthogonal fusion: fc(concat[f_g, f_o]) with f_o = avgpool(f_l) minus its projection.
  f_g, f_l = feats['f_g'], feats['f_l/localmodel']
  f_o = feats['local_vec']
  assert_close(feats['fused'], dolg.orthogonal_fusion(f_l, f_g, 1e-6), 1e-4, 1e-5)
  assert float(jnp.max(jnp.abs(jnp.sum(f_o * f_g, -1)))) < 1e-4 * float(jnp.sum(f_g**2))
  p = variables['params']
  assert_close(desc, feats['fused'] @ p['fc']['kernel'] + p['fc']['bias'], 1e-5, 1e-5)
  assert_close(
    feats['f_g'], feats['pooled_g'] @ p['fc_t']['kernel'] + p['fc_t']['bias'], 1e-5, 1e-5
  )
  assert_close(feats['pooled_g'], dolg.gem_pool(feats['res4'], 3.0), 1e-5, 1e-6)
  # uint8 input gives the same descriptor.
  assert_close(apply(model, variables, images().astype(jnp.uint8)), desc, 1e-5, 1e-5)


def test_self_attention_matches_formula():
  _, variables, _, feats = run_tiny(use_multi_atrous=False)
  p = variables['params']['localmodel']
  s = variables['batch_stats']['localmodel']['bn']
  x = np.asarray(feats['res3'])
  h = np_conv(x, p['conv1']['kernel'], bias=p['conv1']['bias'])
  h = (h - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['bn']['scale'] + p['bn']['bias']
  feat = h / np.maximum(np.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
  att = np.logaddexp(0, np_conv(np.maximum(h, 0), p['conv2']['kernel'], bias=p['conv2']['bias']))
  assert_close(feats['f_l/localmodel'], att * feat, 1e-4, 1e-5)
  assert set(p) == {'conv1', 'bn', 'conv2'}


def test_multi_atrous_matches_formula_with_image_pool_first():
  _, variables, _, feats = run_tiny(use_self_attention=False)
  p = variables['params']['localmodel']['aspp']
  assert set(variables['params']['localmodel']) == {'aspp'}  # no attention layers
  assert set(p) == {'im_pool', 'aspp_0', 'aspp_1', 'aspp_2', 'aspp_3', 'conv_after'}
  x = np.asarray(feats['res3'])
  n, h, w, _ = x.shape
  im = np.maximum(
    np_conv(x.mean((1, 2), keepdims=True), p['im_pool']['kernel'], bias=p['im_pool']['bias']), 0
  )
  outs = [
    np.broadcast_to(im, (n, h, w, 8)),
    np_conv(x, p['aspp_0']['kernel'], bias=p['aspp_0']['bias']),
  ]
  for j, r in enumerate((1, 2, 3)):
    q = p[f'aspp_{j + 1}']
    assert q['kernel'].shape[:2] == (3, 3)
    outs.append(np_conv(x, q['kernel'], pad=r, dilation=r, bias=q['bias']))
  ref = np.maximum(
    np_conv(np.concatenate(outs, -1), p['conv_after']['kernel'], bias=p['conv_after']['bias']), 0
  )
  # Without self-attention f_l is the multi-atrous output.
  assert_close(feats['f_l/localmodel'], ref, 1e-4, 1e-5)


def test_atrous_rates_are_configurable():
  _, shapes = count_params_tiny(atrous_rates=(2, 4))
  p = shapes['params']['localmodel']['aspp']
  assert set(p) == {'im_pool', 'aspp_0', 'aspp_1', 'aspp_2', 'conv_after'}
  assert p['conv_after']['kernel'].shape == (1, 1, 8 * 4, 16)


def count_params_tiny(**overrides):
  model = build_model(tiny_cfg(**overrides))
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1), train=False))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params'])), shapes


def test_without_local_branch_descriptor_is_fc_of_global():
  _, variables, desc, feats = run_tiny(use_local_branch=False)
  p = variables['params']
  assert 'localmodel' not in p and 'localmodel' not in variables['batch_stats']
  assert p['fc']['kernel'].shape == (16, 8)
  assert_close(desc, feats['f_g'] @ p['fc']['kernel'] + p['fc']['bias'], 1e-5, 1e-5)


def test_without_multi_atrous_local_branch_reads_backbone_directly():
  _, variables, _, _ = run_tiny(use_multi_atrous=False)
  p = variables['params']['localmodel']
  assert 'aspp' not in p
  assert p['conv1']['kernel'].shape == (1, 1, 64, 16)  # res3 has 4 * 4 * 4 = 64 channels


@pytest.mark.parametrize('fusion', ['concat', 'hadamard'])
def test_fusion_ablations(fusion):
  _, variables, desc, feats = run_tiny(fusion=fusion)
  _, ref_vars, ref_desc, ref_feats = run_tiny()
  f_g, f_l = feats['f_g'], feats['f_l/localmodel']
  pooled = dolg.avg_pool(f_l)
  assert_close(feats['local_vec'], pooled, 1e-6, 1e-6)  # no projection
  p = variables['params']
  if fusion == 'concat':
    assert p['fc']['kernel'].shape == (32, 8)
    assert_close(feats['fused'], jnp.concatenate([f_g, pooled], -1), 1e-6, 1e-6)
    # Same weights as the orthogonal model (same tree), different descriptor.
    assert jax.tree_util.tree_structure(ref_vars) == jax.tree_util.tree_structure(variables)
    assert_close(ref_feats['f_l/localmodel'], f_l, 1e-6, 1e-6)
    assert not np.allclose(ref_desc, desc, atol=1e-3)
  else:
    assert p['fc']['kernel'].shape == (16, 8)
    assert_close(feats['fused'], f_g * pooled, 1e-6, 1e-6)
  assert_close(desc, feats['fused'] @ p['fc']['kernel'] + p['fc']['bias'], 1e-5, 1e-5)


def test_global_pool_gap_and_gem_p():
  _, variables, _, feats = run_tiny(global_pool='gap')
  assert 'pool_g' not in variables['params']
  assert_close(feats['pooled_g'], jnp.mean(feats['res4'], (1, 2)), 1e-6, 1e-6)
  # Fixed p: no param, p = gem_p.
  _, variables, _, feats = run_tiny(gem_p=4.0)
  assert 'pool_g' not in variables['params']
  assert_close(feats['pooled_g'], dolg.gem_pool(feats['res4'], 4.0), 1e-5, 1e-6)
  # Learnable p: param pool_g/p init gem_p, and it is used.
  model, variables, desc, feats = run_tiny(gem_p_learnable=True)
  assert variables['params']['pool_g']['p'].shape == (1,)
  changed = {
    'params': {**variables['params'], 'pool_g': {'p': jnp.asarray([2.0])}},
    'batch_stats': variables['batch_stats'],
  }  # a copy: run_tiny's results are shared
  _, feats2 = apply(model, changed, images(), return_features=True)
  assert_close(feats2['pooled_g'], dolg.gem_pool(feats['res4'], 2.0), 1e-5, 1e-6)
  assert not np.allclose(feats2['pooled_g'], feats['pooled_g'], atol=1e-4)


def test_local_stage_res4_and_both():
  _, variables, desc, feats = run_tiny(local_stage='res4')
  p = variables['params']
  assert 'localmodel_res4' not in p
  assert p['localmodel']['aspp']['aspp_0']['kernel'].shape == (1, 1, 128, 8)  # res4: 128 ch
  assert feats['f_l/localmodel'].shape[1:3] == feats['res4'].shape[1:3]

  _, variables, desc, feats = run_tiny(local_stage='both')
  p = variables['params']
  assert p['localmodel']['aspp']['aspp_0']['kernel'].shape == (1, 1, 64, 8)
  assert p['localmodel_res4']['aspp']['aspp_0']['kernel'].shape == (1, 1, 128, 8)
  assert p['fc']['kernel'].shape == (32, 8)
  f_g = feats['f_g']
  vecs = [
    dolg.orthogonal_component(dolg.avg_pool(feats[f'f_l/{n}']), f_g, 1e-6)
    for n in ('localmodel', 'localmodel_res4')
  ]
  assert_close(feats['local_vec'], (vecs[0] + vecs[1]) / 2, 1e-5, 1e-6)


def test_invalid_configs_name_the_field():
  with pytest.raises(ValueError, match='model.fusion'):
    build_model(tiny_cfg(fusion='sum'))
  with pytest.raises(ValueError, match='model.global_pool'):
    build_model(tiny_cfg(global_pool='max'))
  with pytest.raises(ValueError, match='model.local_stage'):
    build_model(tiny_cfg(local_stage='res2'))
  with pytest.raises(ValueError, match='local_dim'):
    build_model(tiny_cfg(local_dim=32))
  with pytest.raises(ValueError, match='unknown model config'):
    cfg = dict(tiny_cfg())
    cfg['dropout'] = 0.1
    build_model(cfg)
  with pytest.raises(ValueError, match='depth'):
    cfg = tiny_cfg(depth=34, stage_depths=())
    model = build_model(cfg)
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1)))
  with pytest.raises(ValueError, match='use_self_attention'):
    model = build_model(
      tiny_cfg(local_stage='res4', use_multi_atrous=False, use_self_attention=False)
    )
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images(1)))


def test_train_mode_updates_batch_stats():
  model = build_model(tiny_cfg())
  x = images()
  variables = fill_variables(model, x)
  desc, updates = apply(model, variables, x, train=True, mutable=('batch_stats',))
  assert desc.shape == (2, 8)
  old = flat_params({'params': variables['batch_stats']})
  new = flat_params({'params': updates['batch_stats']})
  assert old.keys() == new.keys()
  # mean <- 0.9 mean + 0.1 batch mean (torch momentum 0.1).
  res_in = np.asarray(dolg.normalize_images(x))
  w = np.asarray(variables['params']['globalmodel']['stem']['conv']['kernel'])
  batch_mean = np_conv(res_in, w, 2, 3).mean((0, 1, 2))
  assert_close(
    new['globalmodel/stem/bn/mean'],
    0.9 * old['globalmodel/stem/bn/mean'] + 0.1 * batch_mean,
    1e-4,
    1e-4,
  )


def test_bf16_compute_agrees_with_float32():
  cfg = tiny_cfg()
  x = images()
  model32 = build_model(cfg, jnp.float32)
  model16 = build_model(cfg, 'bfloat16')
  variables = fill_variables(model32, x)
  d32 = apply(model32, variables, x)
  d16, feats16 = apply(model16, variables, x, return_features=True)
  assert d16.dtype == jnp.float32 and feats16['res3'].dtype == jnp.bfloat16
  cos = jnp.sum(d32 * d16, -1) / (jnp.linalg.norm(d32, axis=-1) * jnp.linalg.norm(d16, axis=-1))
  print('tiny model bf16 vs float32 descriptor cosine', np.asarray(cos))
  assert float(jnp.min(cos)) > 0.99
  _, updates = apply(model16, variables, x, train=True, mutable=('batch_stats',))
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(updates))


@pytest.mark.parametrize('name', ['default', 'r50', 'r101', 'tiny'])
def test_repository_configs_build(name):
  """Every model config shipped in configs/ builds and traces (eval_shape only)."""
  import importlib

  cfg = importlib.import_module(f'configs.{name}').get_config()
  model = build_model(cfg.model, cfg.compute_dtype)
  out = jax.eval_shape(
    lambda: model.init_with_output(jax.random.PRNGKey(0), jnp.zeros((1, 96, 128, 3), jnp.uint8))[0]
  )
  assert out.shape == (1, cfg.model.embedding_dim) and out.dtype == jnp.float32


def test_gradients_flow_through_every_parameter_in_train_mode():
  """The whole model is differentiable (max-pool included) and every parameter gets a gradient."""
  model = build_model(tiny_cfg(gem_p_learnable=True))
  x = images(2)
  variables = fill_variables(model, x)

  def loss(params):
    desc, _ = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      mutable=['batch_stats'],
    )
    return jnp.sum(desc**2)

  grads = jax.jit(jax.grad(loss))(variables['params'])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(grads))
  assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
  zero = ['/'.join(k) for k, g in flat.items() if not np.any(np.asarray(g))]
  assert not zero, f'parameters without gradient: {zero}'


@pytest.mark.parametrize(
  'overrides',
  [
    {},  # multi-atrous + self-attention, orthogonal, GeM on res3
    {'use_multi_atrous': False, 'gem_p_learnable': True, 'local_dim': 64, 'global_dim': 64},
    {'local_stage': 'both', 'global_pool': 'gap'},
  ],
)
def test_padded_canvas_with_valid_hw_equals_each_image_alone(overrides):
  """valid_hw masks the padding: a batch of padded canvases gives each unpadded image's result."""
  model = build_model(tiny_cfg(**overrides))
  sizes = [(67, 93), (96, 64), (81, 81)]
  canvas = (128, 128)
  rng = np.random.default_rng(3)
  singles = [rng.integers(0, 256, (1, h, w, 3)).astype(np.float32) for h, w in sizes]
  variables = fill_variables(model, jnp.asarray(singles[0]))
  batch = rng.integers(0, 256, (len(sizes),) + canvas + (3,)).astype(np.float32)  # junk padding
  for k, img in enumerate(singles):
    batch[k, : img.shape[1], : img.shape[2]] = img[0]
  valid = jnp.asarray(sizes, jnp.int32)
  padded = jax.jit(lambda v, x, hw: model.apply(v, x, valid_hw=hw))(variables, batch, valid)
  for k, img in enumerate(singles):
    alone = apply(model, variables, jnp.asarray(img))
    assert_close(np.asarray(padded[k : k + 1]), np.asarray(alone), 1e-4, 1e-5)
  unmasked = apply(model, variables, jnp.asarray(batch))  # what the mask protects against
  assert not np.allclose(np.asarray(unmasked), np.asarray(padded), rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match='inference'):
    model.apply(variables, batch, train=True, valid_hw=valid, mutable=['batch_stats'])
