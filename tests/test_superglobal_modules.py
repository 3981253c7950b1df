"""SuperGlobal extraction modules on DOLG (GeM+, regional-GeM, ReLU+, scale-GeM) vs references."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs import default
from dolg_jax.models import build_model, dolg, resnet
from dolg_jax.retrieval import extract as ex
from tests.helpers.eval_config import extract_config


def _tiny(**superglobal):
  """A tiny DOLG (learnable p, like the released weights) with SuperGlobal fields set."""
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
      use_multi_atrous=False,
      gem_p_learnable=True,
    )
  )
  model = build_model(c).clone(**superglobal)
  model.check()
  return model


def _fill(model, x, seed=0):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1] == 'kernel':
      return rng.normal(0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if path[-1] in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if path[-1] == 'p':
      return np.full(leaf.shape, 3.3, np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(fill(k, v)) for k, v in flat.items()})


def _images(n=2, h=96, w=96, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3)), jnp.float32)


def _run(model, variables, x, **kw):
  return jax.jit(model.apply, static_argnames=('return_features',))(
    variables, x, return_features=True, **kw
  )


def _np_rgem(x, p=2.5, size=5):
  """numpy: reflection pad (numpy repeats the reflection for long pads), window mean of x^p."""
  r = (size - 1) // 2
  y = np.pad(np.asarray(x, np.float64) ** p, ((0, 0), (r, r), (r, r), (0, 0)), mode='reflect')
  h, w = x.shape[1:3]
  acc = sum(y[:, i : i + h, j : j + w] for i in range(size) for j in range(size))
  return 0.5 * (acc / size**2) ** (1 / p) + 0.5 * x


def test_regional_gem_matches_torch_lppool_with_reflection_padding():
  x = np.random.default_rng(0).uniform(0, 2, (2, 7, 6, 3)).astype(np.float32)
  t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).double()
  pooled = torch.nn.LPPool2d(2.5, 5, stride=1)(torch.nn.ReflectionPad2d(2)(t / 25 ** (1 / 2.5)))
  ref = (0.5 * pooled + 0.5 * t).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(dolg.regional_gem(jnp.asarray(x)), ref, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(_np_rgem(x), ref, rtol=1e-10)


def test_regional_gem_masked_canvas_equals_each_image_alone():
  rng = np.random.default_rng(1)
  canvas = rng.uniform(0, 2, (3, 9, 10, 2)).astype(np.float32)  # padding holds garbage
  valid = [(7, 6), (2, 10), (1, 3)]  # small maps: repeated reflection
  mask = np.zeros((3, 9, 10, 1), np.float32)
  for k, (h, w) in enumerate(valid):
    mask[k, :h, :w] = 1
  got = np.asarray(dolg.regional_gem(jnp.asarray(canvas), mask=jnp.asarray(mask)))
  for k, (h, w) in enumerate(valid):
    alone = canvas[k : k + 1, :h, :w]
    np.testing.assert_allclose(got[k, :h, :w], _np_rgem(alone)[0], rtol=2e-5, atol=1e-6)


def test_gem_plus_and_regional_gem_in_the_global_branch():
  x = _images(2, 64, 64)
  base = _tiny()
  variables = _fill(base, x)
  _, f0 = _run(base, variables, x)
  plus = base.clone(gem_plus_p=4.6)
  assert jax.tree_util.tree_structure(
    jax.eval_shape(lambda: plus.init(jax.random.PRNGKey(0), x, train=False))
  ) == jax.tree_util.tree_structure(variables)  # the learnable p stays in the tree
  res4 = np.asarray(f0['res4'], np.float64)
  np.testing.assert_allclose(
    f0['pooled_g'], np.mean(np.maximum(res4, 1e-6) ** 3.3, axis=(1, 2)) ** (1 / 3.3), rtol=1e-4
  )
  both = base.clone(gem_plus_p=4.6, regional_gem=True)
  _, f2 = _run(both, variables, x)
  rg = _np_rgem(res4)
  np.testing.assert_allclose(
    f2['pooled_g'], np.mean(np.maximum(rg, 1e-8) ** 4.6, axis=(1, 2)) ** (1 / 4.6), rtol=1e-4
  )
  np.testing.assert_array_equal(f2['res3'], f0['res3'])  # the local branch input is unchanged


def test_relu_plus_where_the_superglobal_resnet_clamps():
  x = _images(1, 64, 64)
  model = resnet.ResNet(width=4, stage_depths=(1, 1, 1, 1), relu_plus=0.2)
  v = _fill(model, x)
  (res3, res4), state = jax.jit(
    lambda v, x: model.apply(v, x, False, capture_intermediates=True, mutable=['intermediates'])
  )(v, dolg.normalize_images(x))
  inter = state['intermediates']
  assert float(jnp.min(res3)) == np.float32(0.2)  # stage 1-3 outputs: clamp(min=0.2)
  assert float(jnp.min(res4)) == 0.0  # stage 4 keeps ReLU
  # Each block re-run alone with the floors we claim reproduces its captured output.
  prev = inter['stem']['__call__'][0]
  for i in range(4):
    name = f's{i + 1}'
    block_vars = {c: v[c][name]['b1'] for c in v}
    stride = 1 if i == 0 else 2
    blk = resnet.ResBottleneckBlock(
      4 * 2**i,
      16 * 2**i,
      stride,
      inner_floor=0.2 if i == 0 else 0.0,
      out_floor=0.2 if i < 3 else 0.0,
    )
    out = inter[name]['b1']['__call__'][0]
    np.testing.assert_allclose(
      jax.jit(blk.apply, static_argnums=2)(block_vars, prev, False), out, rtol=1e-6, atol=1e-6
    )
    if i == 0:  # the stage-1 inner floors matter: without them the output differs
      wrong = blk.clone(inner_floor=0.0)
      assert not np.allclose(
        jax.jit(wrong.apply, static_argnums=2)(block_vars, prev, False), out, rtol=1e-6, atol=1e-6
      )
    prev = out


def test_invalid_fields_name_the_field():
  for kw, field in (
    ({'gem_plus_p': -1.0}, 'gem_plus_p'),
    ({'relu_plus': -0.1}, 'relu_plus'),
    ({'regional_gem': True, 'regional_gem_p': 0.0}, 'regional_gem_p'),
  ):
    try:
      _tiny(**kw)
    except ValueError as e:
      assert f'model.{field}' in str(e)
    else:
      raise AssertionError(f'{kw} accepted')


def test_padded_canvases_still_equal_exact_sizes_with_all_modules():
  model = _tiny(gem_plus_p=4.6, regional_gem=True, relu_plus=0.014)
  variables = _fill(model, _images(1, 64, 64))

  def apply(v, images, valid_hw=None):
    return model.apply(v, images, valid_hw=valid_hw)

  rng = np.random.default_rng(0)
  imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(70, 130), (100, 77)]]
  examples = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
  exact = ex.Extractor(apply, variables, extract_config(bucket=0, batch_size=2, scales=(1.0,)))
  padded = ex.Extractor(apply, variables, extract_config(pad=True, batch_size=2, scales=(1.0,)))
  cos = np.sum(exact.extract(examples, 2) * padded.extract(examples, 2), axis=1)
  assert cos.min() > 0.99999, cos


def test_scale_gem_is_max_of_normalised_scale_descriptors():
  w = np.random.default_rng(3).standard_normal((7, 5)).astype(np.float32)

  def apply(v, images):  # colour means, an x-ramp mean and the width: scale-dependent
    x = images.astype(jnp.float32) / 255.0
    ramp = jnp.linspace(-1.0, 1.0, images.shape[2])[None, None, :, None]
    size = jnp.full((images.shape[0], 1), images.shape[2] / 100.0)
    return jnp.concatenate([x.mean((1, 2)), (x * ramp).mean((1, 2)), size], -1) @ v

  def numpy_desc(img):
    x = img.astype(np.float64) / 255.0
    ramp = np.linspace(-1.0, 1.0, img.shape[1])[None, :, None]
    return np.concatenate([x.mean((0, 1)), (x * ramp).mean((0, 1)), [img.shape[1] / 100]]) @ w

  rng = np.random.default_rng(4)
  imgs = [rng.integers(0, 256, (h, wd, 3), dtype=np.uint8) for h, wd in [(90, 120), (100, 70)]]
  scales = (0.7071, 1.0, 1.4142)
  cfg = extract_config(bucket=0, batch_size=2, scales=scales, scale_pool='max')
  got = ex.Extractor(apply, jnp.asarray(w), cfg).extract(
    [{'index': i, 'image': im} for i, im in enumerate(imgs)], 2
  )
  for i, im in enumerate(imgs):
    per = []
    for s in scales:
      h, wd = max(64, round(im.shape[0] * s)), max(64, round(im.shape[1] * s))
      d = numpy_desc(ex.resize_bilinear(im, h, wd))
      per.append(d / np.linalg.norm(d))
    m = np.max(per, axis=0)
    np.testing.assert_allclose(got[i], m / np.linalg.norm(m), atol=2e-6)
    mean = np.mean(per, axis=0)
    assert not np.allclose(got[i], mean / np.linalg.norm(mean), atol=1e-3)
  assert 'scale_pool' not in extract_config().key()  # old caches keep their keys
  assert extract_config(scale_pool='max').key()['scale_pool'] == 'max'
