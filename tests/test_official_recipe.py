"""The official training recipe: augmentation, schedule, init and BN groups against references.

The references below re-implement the pycls/DOLG code (datasets/transforms.py, datasets/imagenet.py
`_prepare_im`, core/optimizer.py `get_epoch_lr`) in numpy in its own form (BGR, CHW, numpy's
global-RNG call signatures), fed the same scripted random draws as our implementation.
"""

import io
import math

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import official_r101
from dolg_jax import models
from dolg_jax import sharding as shd
from dolg_jax.data import decode
from dolg_jax.data import official_augment
from dolg_jax.data import grain_pipeline as pipeline
from dolg_jax.models import dolg as dolg_lib
from dolg_jax.models import resnet
from dolg_jax.training import schedule
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib

# ----------------------------------------------------------------------------- references (pycls)
_MEAN_BGR = [0.406, 0.456, 0.485]
_SD_BGR = [0.225, 0.224, 0.229]
_EIG_VALS = np.array([[0.2175, 0.0188, 0.0045]])
_EIG_VECS = np.array(
  [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)


def _ref_scale(size, im):
  h, w = im.shape[:2]
  if (w <= h and w == size) or (h <= w and h == size):
    return im
  h_new, w_new = size, size
  if w < h:
    h_new = int(math.floor((float(h) / w) * size))
  else:
    w_new = int(math.floor((float(w) / h) * size))
  return cv2.resize(im, (w_new, h_new), interpolation=cv2.INTER_LINEAR).astype(np.float32)


def _ref_center_crop(size, im):
  h, w = im.shape[:2]
  y = int(math.ceil((h - size) / 2))
  x = int(math.ceil((w - size) / 2))
  return im[y : y + size, x : x + size, :]


def _ref_random_sized_crop(npr, im, size, area_frac=0.08, max_iter=10):
  h, w = im.shape[:2]
  area = h * w
  for _ in range(max_iter):
    target_area = npr.uniform(area_frac, 1.0) * area
    aspect_ratio = npr.uniform(3.0 / 4.0, 4.0 / 3.0)
    w_crop = int(round(math.sqrt(float(target_area) * aspect_ratio)))
    h_crop = int(round(math.sqrt(float(target_area) / aspect_ratio)))
    if npr.uniform() < 0.5:
      w_crop, h_crop = h_crop, w_crop
    if h_crop <= h and w_crop <= w:
      y = 0 if h_crop == h else npr.randint(0, h - h_crop)
      x = 0 if w_crop == w else npr.randint(0, w - w_crop)
      im_crop = im[y : (y + h_crop), x : (x + w_crop), :]
      return cv2.resize(im_crop, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
  return _ref_center_crop(size, _ref_scale(size, im))


def _ref_prepare_train(npr, bgr_uint8, size):
  """pycls ImageNet `_prepare_im` (train) after `cv2.imread(...).astype(np.float32)`."""
  im = bgr_uint8.astype(np.float32, copy=False)
  im = _ref_random_sized_crop(npr, im, size, area_frac=0.08)
  if npr.uniform() < 0.5:  # horizontal_flip(p=0.5, order='HWC')
    im = im[:, ::-1, :]
  im = im.transpose([2, 0, 1])
  im = im / 255.0
  alpha = npr.normal(0, 0.1, size=(1, 3))  # lighting(im, 0.1, _EIG_VALS, _EIG_VECS)
  alpha = np.repeat(alpha, 3, axis=0)
  eig_val = np.repeat(_EIG_VALS, 3, axis=0)
  rgb = np.sum(_EIG_VECS * alpha * eig_val, axis=1)
  for i in range(im.shape[0]):
    im[i] = im[i] + rgb[2 - i]
  for i in range(im.shape[0]):  # color_norm
    im[i] = (im[i] - _MEAN_BGR[i]) / _SD_BGR[i]
  return im


def _ref_epoch_lr(cur_epoch, base_lr, max_epoch, warmup_epochs, warmup_factor):
  lr = 0.5 * (1.0 + np.cos(np.pi * cur_epoch / max_epoch)) * base_lr
  if cur_epoch < warmup_epochs:
    alpha = cur_epoch / warmup_epochs
    lr *= warmup_factor * (1.0 - alpha) + alpha
  return lr


class Scripted:
  """The same scripted draws behind numpy's RandomState names (reference) and Generator names
  (ours): uniform(low, high) = low + (high - low) u, randint/integers(lo, hi) = lo + floor(u (hi -
  lo)) (hi excluded), normal(loc, scale, size) = loc + scale z."""

  def __init__(self, us, zs=()):
    self.us, self.zs = list(us), list(zs)
    self.calls = []

  def uniform(self, low=0.0, high=1.0):
    self.calls.append('uniform')
    return low + (high - low) * self.us.pop(0)

  def randint(self, low, high):
    self.calls.append('int')
    return int(low + math.floor(self.us.pop(0) * (high - low)))

  integers = randint

  def normal(self, loc=0.0, scale=1.0, size=None):
    self.calls.append('normal')
    z = np.array([self.zs.pop(0) for _ in range(int(np.prod(size)))]).reshape(size)
    return loc + scale * z


class GeneratorAsRandomState:
  """numpy Generator draws under RandomState's `randint` name (same stream, same values)."""

  def __init__(self, gen):
    self.gen = gen

  def uniform(self, low=0.0, high=1.0):
    return self.gen.uniform(low, high)

  def randint(self, low, high):
    return self.gen.integers(low, high)

  def normal(self, loc, scale, size):
    return self.gen.normal(loc, scale, size=size)


def _ours_network_input(rgb, size, rng):
  """Our official augmentation followed by the model's normalisation, as BGR CHW."""
  im = official_augment.augment_rgb(rgb, size, rng, area_frac=0.08, flip=True, lighting_std=0.1)
  normed = np.asarray(dolg_lib.normalize_images(jnp.asarray(im)[None]))[0]
  return normed[..., ::-1].transpose(2, 0, 1)


_RGB = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
_Z = (0.7, -1.3, 0.4)

# Draw scripts: (area u, aspect u, swap u, [y u, x u]) x tries, flip u; then 3 normals.
CASES = {
  'first_try_no_swap': [0.5, 0.3, 0.9, 0.25, 0.75, 0.2],
  'first_try_swapped': [0.4, 0.9, 0.1, 0.6, 0.1, 0.8],
  'exact_fit_needs_no_corner_draw': [0.95, 1.0, 0.9, 0.3, 0.99],  # 49 x 37: only an x draw
  'two_misses_then_hit': [1.0, 1.0, 0.1, 1.0, 1.0, 0.1, 0.2, 0.5, 0.7, 0.5, 0.5, 0.4],
  'ten_misses_fallback': [1.0, 1.0, 0.1] * 10 + [0.3],
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_official_augmentation_equals_pycls_with_scripted_draws(case):
  size = 24
  image = _RGB if case != 'ten_misses_fallback' else _RGB[:20]
  ref_draws, our_draws = Scripted(CASES[case], _Z), Scripted(CASES[case], _Z)
  ref = _ref_prepare_train(ref_draws, np.ascontiguousarray(image[..., ::-1]), size)
  ours = _ours_network_input(image, size, our_draws)
  assert ref_draws.calls == our_draws.calls and not ref_draws.us and not our_draws.us
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize('case', sorted(CASES))
def test_uint8_form_makes_the_same_draws_within_one_grey_level(case):
  """`augment_rgb_uint8` (what training uses): the same draws and crop as pycls; the resized
  pixels rounded to uint8 (at most 1 level from pycls' float32 resize), the lighting offset
  exact."""
  size = 24
  image = _RGB if case != 'ten_misses_fallback' else _RGB[:20]
  ref_draws, our_draws = Scripted(CASES[case], _Z), Scripted(CASES[case], _Z)
  ref = _ref_prepare_train(ref_draws, np.ascontiguousarray(image[..., ::-1]), size)
  im, offset = official_augment.augment_rgb_uint8(
    image, size, our_draws, area_frac=0.08, flip=True, lighting_std=0.1
  )
  assert ref_draws.calls == our_draws.calls and not ref_draws.us and not our_draws.us
  assert im.dtype == np.uint8 and offset.dtype == np.float32 and offset.shape == (3,)
  float_form = official_augment.augment_rgb(
    image, size, Scripted(CASES[case], _Z), area_frac=0.08, flip=True, lighting_std=0.1
  )
  np.testing.assert_allclose(im + offset, float_form, rtol=0, atol=1.0)
  ours = np.asarray(dolg_lib.normalize_images(jnp.asarray(im + offset)[None]))[0]
  # 1 grey level in the network's input units: 1 / 255 / the smallest std (0.224).
  np.testing.assert_allclose(
    ours[..., ::-1].transpose(2, 0, 1), ref, rtol=0, atol=1.0 / 255 / 0.224 + 1e-5
  )


def test_official_transform_in_the_pipeline_equals_pycls_on_a_jpeg():
  """The grain transform: decode + the Philox stream of (seed, epoch, position) replayed; uint8
  images + the lighting offsets, added on the device by training.inputs.device_batch: the float
  form (pycls' own order, float32 resize) at float rounding up to the uint8 rounding of the
  resized pixels (at most 1 grey level), and pycls' network input within that level."""
  from dolg_jax.training import inputs

  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (90, 70, 3), np.uint8)).save(
    buf, 'JPEG', quality=95
  )
  data = buf.getvalue()
  transform = pipeline.TrainTransform(
    image_size=32,
    scale=(0.08, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip=True,
    seed=5,
    epoch_length=10,
    augmentation='official',
    lighting_std=0.1,
    fast_decode=False,
  )
  outs = [transform(index, {'image': data, 'label': 4}) for index in (0, 3, 17)]
  mesh = shd.make_mesh(official_r101.get_config().mesh, jax.devices()[:1])
  batch = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
  assert batch['image'].dtype == np.uint8 and batch['lighting'].dtype == np.float32
  on_device = inputs.device_batch(mesh, batch)
  assert set(on_device) == {'image', 'label'} and on_device['image'].dtype == jnp.float32
  for i, index in enumerate((0, 3, 17)):
    out = outs[i]
    assert out['image'].shape == (32, 32, 3) and out['lighting'].shape == (3,)
    float_form = official_augment.official_train_image(
      data, 32, transform.rng(index), area_frac=0.08, flip=True, lighting_std=0.1
    )
    got = np.asarray(on_device['image'][i])
    np.testing.assert_allclose(got, out['image'] + out['lighting'], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, float_form, rtol=0, atol=1.0)
    ref = _ref_prepare_train(
      GeneratorAsRandomState(transform.rng(index)),
      np.ascontiguousarray(decode.decode_rgb(data)[..., ::-1]),
      32,
    )
    ours = np.asarray(dolg_lib.normalize_images(jnp.asarray(got)[None]))[0]
    np.testing.assert_allclose(
      ours[..., ::-1].transpose(2, 0, 1), ref, rtol=0, atol=1.0 / 255 / 0.224 + 1e-5
    )
    # The float form stays pycls' own at float rounding.
    ours_float = np.asarray(dolg_lib.normalize_images(jnp.asarray(float_form)[None]))[0]
    np.testing.assert_allclose(ours_float[..., ::-1].transpose(2, 0, 1), ref, rtol=0, atol=2e-5)


def test_augmentation_field_errors():
  kw = dict(
    image_size=8, ratio=(3 / 4, 4 / 3), flip=True, seed=0, epoch_length=1, fast_decode=False
  )
  with pytest.raises(ValueError, match='config.data.augmentation'):
    pipeline.TrainTransform(scale=(0.08, 1.0), augmentation='pycls', lighting_std=0.0, **kw)
  with pytest.raises(ValueError, match='crop_scale'):
    pipeline.TrainTransform(scale=(0.08, 0.9), augmentation='official', lighting_std=0.0, **kw)
  with pytest.raises(ValueError, match='lighting_std'):
    pipeline.TrainTransform(scale=(0.25, 1.0), augmentation='paper', lighting_std=0.1, **kw)


def test_lighting_noise_statistics():
  """Offsets follow N(0, V diag(lambda^2 0.01) V^T) in RGB (pycls eigen decomposition)."""
  gen = np.random.default_rng(0)
  offsets = np.stack([official_augment.lighting_offset(gen, 0.1) for _ in range(20000)])
  cov = _EIG_VECS @ np.diag((0.1 * _EIG_VALS[0]) ** 2) @ _EIG_VECS.T
  np.testing.assert_allclose(np.cov(offsets.T), cov, atol=2e-5)
  assert not official_augment.lighting_offset(gen, 0.0).any()


# ----------------------------------------------------------------------------- schedule
def _train_cfg(**kw):
  c = official_r101.get_config().train
  c.update(kw)
  return c


@pytest.mark.parametrize('warmup_epochs, warmup_factor', [(5, 0.1), (3, 0.25), (0, 0.1)])
def test_per_epoch_schedule_equals_pycls_get_epoch_lr(warmup_epochs, warmup_factor):
  cfg = _train_cfg(
    num_epochs=12,
    warmup_epochs=warmup_epochs,
    warmup_factor=warmup_factor,
    global_batch_size=64,
    base_learning_rate=0.02,
  )
  n_examples = 64 * 7 + 13  # 7 steps per epoch, the partial batch dropped.
  spe = schedule.steps_per_epoch(n_examples, 64)
  total = schedule.num_train_steps(cfg, n_examples)
  assert (spe, total) == (7, 12 * 7)
  lr = schedule.create_learning_rate_fn(cfg, spe, total)
  got = lr(np.arange(total))
  want = np.repeat(
    [_ref_epoch_lr(e, 0.01, 12, warmup_epochs, warmup_factor) for e in range(12)], spe
  )
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(0.01 * (warmup_factor if warmup_epochs else 1.0), rel=1e-6)


def test_official_yaml_schedule_values():
  """100 epochs, BASE_LR 0.01 at batch 64: epoch 0 starts at 0.001, epoch 5 is the cosine."""
  cfg = _train_cfg()
  lr = schedule.create_learning_rate_fn(cfg, 10, schedule.num_train_steps(cfg, 640))
  assert float(lr(0)) == pytest.approx(0.001, rel=1e-6)
  assert float(lr(9)) == pytest.approx(0.001, rel=1e-6)  # constant within the epoch
  warm = 0.1 * 0.8 + 0.2  # epoch 1 of 5
  assert float(lr(10)) == pytest.approx(0.01 * warm * 0.5 * (1 + math.cos(math.pi / 100)), rel=1e-6)
  assert float(lr(50)) == pytest.approx(0.005 * (1 + math.cos(math.pi * 5 / 100)), rel=1e-6)
  assert float(lr(999)) == pytest.approx(0.005 * (1 + math.cos(math.pi * 99 / 100)), rel=1e-5)


def test_per_step_warmup_factor_and_errors():
  cfg = _train_cfg(
    lr_schedule='per_step', warmup_factor=0.1, global_batch_size=128, base_learning_rate=0.1
  )
  lr = schedule.create_learning_rate_fn(cfg, 10, 100)  # 50 warm-up steps
  assert float(lr(0)) == pytest.approx(0.1 * (0.1 + 0.9 / 50), rel=1e-6)
  assert float(lr(49)) == pytest.approx(0.1, rel=1e-6)
  with pytest.raises(ValueError, match='config.train.lr_schedule'):
    schedule.create_learning_rate_fn(_train_cfg(lr_schedule='epoch'), 10, 100)
  with pytest.raises(ValueError, match='config.train.warmup_factor'):
    schedule.create_learning_rate_fn(_train_cfg(warmup_factor=1.5), 10, 100)


# ----------------------------------------------------------------------------- model init
def test_zero_init_final_gamma_and_torch_dense_init():
  """Checked on a stage and on the head's Dense layers alone (a whole DOLG init is slow on CPU)."""
  x = jnp.zeros((1, 8, 8, 8))
  for zero in (True, False):
    stage = resnet.ResStage(4, 2, 2, zero_init_final_gamma=zero)
    params = jax.jit(lambda v, s=stage: s.init(jax.random.key(0), v, False))(x)['params']
    for block in ('b1', 'b2'):
      assert np.all(np.asarray(params[block]['c_bn']['scale']) == (0.0 if zero else 1.0))
      assert np.all(np.asarray(params[block]['a_bn']['scale']) == 1.0)
  fan_in = 2048
  for kind in ('torch', 'pycls'):
    dense = dolg_lib.head_dense(512, fan_in, kind)
    p = dense.init(jax.random.key(1), jnp.zeros((1, fan_in)))['params']
    w, b = np.asarray(p['kernel']), np.asarray(p['bias'])
    if kind == 'torch':  # torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both.
      bound = 1 / math.sqrt(fan_in)
      assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
      assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
      assert b.std() == pytest.approx(bound / math.sqrt(3), rel=0.2)
    else:  # pycls: normal(0, 0.01), zero bias.
      assert w.std() == pytest.approx(0.01, rel=0.02) and not b.any()
  cfg = official_r101.get_config().model
  assert cfg.zero_init_final_gamma and cfg.dense_init == 'torch'
  with pytest.raises(ValueError, match='model.dense_init'):
    models.build_model(dict(cfg, dense_init='kaiming'))


# ----------------------------------------------------------------------------- BN groups
class _BNEmbed(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = x.astype(jnp.float32).reshape(x.shape[0], -1) / 255.0
    return nn.BatchNorm(use_running_average=not train, momentum=0.0)(nn.Dense(16)(x))


def test_bn_group_size_gives_statistics_per_group():
  from configs import tiny

  config = tiny.get_config()
  config.data.image_size, config.head.num_classes, config.model.embedding_dim = 4, 6, 16
  config.train.global_batch_size = 8
  rng = np.random.default_rng(0)
  batch = {
    'image': rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8),
    'label': rng.integers(0, 6, (8,), dtype=np.int32),
  }
  mesh = shd.make_mesh(config.mesh)
  out = {}
  for group in (0, 4, 3):
    config.train.bn_group_size = group
    setup = state_lib.TrainSetup(config, _BNEmbed(), state_lib.create_optimizer(config.train), mesh)
    state, sh = state_lib.create_train_state(setup, jax.random.key(0))
    params = jax.device_get(state.params['model'])
    step = step_lib.make_train_step(setup, sh)
    if group == 3:
      with pytest.raises(ValueError, match='config.train.bn_group_size=3'):
        step(state, shd.global_batch(mesh, batch), np.float32(0.0))
      continue
    new, _ = step(state, shd.global_batch(mesh, batch), np.float32(0.0))
    out[group] = jax.device_get(new.batch_stats['BatchNorm_0'])
  h = batch['image'].astype(np.float32).reshape(8, -1) / 255.0 @ params['Dense_0']['kernel']
  h = h + params['Dense_0']['bias']
  np.testing.assert_allclose(out[0]['var'], h.var(0), rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(out[4]['var'], (h[:4].var(0) + h[4:].var(0)) / 2, rtol=1e-3, atol=1e-6)
  np.testing.assert_allclose(out[4]['mean'], h.mean(0), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- the config
@pytest.mark.parametrize('variant, size, batch', [('', 224, 64), ('paper_size', 512, 128)])
def test_official_config_sets_every_official_field(variant, size, batch):
  c = official_r101.get_config(variant)
  assert (c.data.image_size, c.train.global_batch_size) == (size, batch)
  assert c.train.base_learning_rate * 64 / 128 == pytest.approx(0.01)  # yaml BASE_LR at batch 64
  assert (c.data.augmentation, tuple(c.data.crop_scale), c.data.lighting_std) == (
    'official',
    (0.08, 1.0),
    0.1,
  )
  assert (
    c.train.lr_schedule,
    c.train.warmup_epochs,
    c.train.warmup_factor,
    c.train.num_epochs,
  ) == ('per_epoch', 5, 0.1, 100)
  assert c.train.nesterov and c.train.momentum == 0.9 and c.train.weight_decay == 1e-4
  assert c.train.weight_decay_mask == 'all' and c.train.bn_mode == 'per_device'
  assert c.train.bn_group_size == 8 and c.head.type == 'curricularface'
  assert (c.head.margin, c.head.scale) == (0.15, 30.0)
  assert c.model.zero_init_final_gamma and c.model.dense_init == 'torch'
  assert c.compute_dtype == 'float32' and c.data.dataset == 'gldv2/clean_all'
  with pytest.raises(ValueError, match='paper_sise'):
    official_r101.get_config('paper_sise')
