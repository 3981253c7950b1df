"""Multi-scale extraction: protocol steps vs a numpy re-implementation, crops, buckets, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dolg_jax.retrieval import extract as ex
from tests.helpers.eval_config import extract_config


def stand_in_apply(variables, images):
  """Tiny differentiable-free 'model': colour means and an x-weighted colour mean -> Dense."""
  x = images.astype(jnp.float32) / 255.0
  w = images.shape[2]
  ramp = jnp.linspace(-1.0, 1.0, w)[None, None, :, None]
  feats = jnp.concatenate([x.mean((1, 2)), (x * ramp).mean((1, 2))], axis=-1)
  return feats @ variables['w'] + variables['b']


def stand_in_numpy(variables, img):
  x = img.astype(np.float32) / 255.0
  ramp = np.linspace(-1.0, 1.0, img.shape[1], dtype=np.float32)[None, :, None]
  feats = np.concatenate([x.mean((0, 1)), (x * ramp).mean((0, 1))])
  return feats @ np.asarray(variables['w']) + np.asarray(variables['b'])


def _vars(seed=0, dim=8):
  rng = np.random.default_rng(seed)
  return {
    'w': jnp.asarray(rng.standard_normal((6, dim)), jnp.float32),
    'b': jnp.asarray(rng.standard_normal(dim) * 0.1, jnp.float32),
  }


def _images(rng, sizes):
  out = []
  for h, w in sizes:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
      [
        np.sin(xx / (5 + rng.random() * 20)),
        np.cos(yy / (5 + rng.random() * 20)),
        np.sin((xx + yy) / 17.0),
      ],
      -1,
    )
    out.append(np.clip(128 + 100 * base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))
  return out


def _l2(v):
  return v / np.linalg.norm(v)


def test_crop_rounding_and_geometry():
  assert ex.crop_box([10.7, 5.2, 40.9, 30.99], 50, 60) == (5, 30, 10, 40)  # official int()
  assert ex.crop_box([10.7, 5.2, 40.9, 30.99], 50, 60, 'round') == (5, 31, 11, 41)
  assert ex.crop_box([10.7, 5.2, 40.9, 30.99], 50, 60, 'expand') == (5, 31, 10, 41)
  assert ex.crop_box([-3, -1, 100, 100], 50, 60) == (0, 50, 0, 60)  # clipped to the image
  with pytest.raises(ValueError, match='empty'):
    ex.crop_box([10, 10, 10.5, 20], 50, 60)
  with pytest.raises(ValueError, match='crop_rounding'):
    ex.crop_box([0, 0, 5, 5], 50, 60, 'ceil')
  assert ex.capped_size(768, 1365, 1024) == (576, 1024)
  assert ex.capped_size(300, 200, 1024) == (300, 200)
  assert ex.scaled_size(768, 1024, 0.7071) == (543, 724)
  cfg = extract_config(geometric_from=512)
  sides = ex.allowed_sides(cfg)
  assert np.all(np.diff(sides) > 0) and np.all(sides % cfg.bucket == 0)
  for n in range(64, 2000, 7):
    b = ex.bucket_side(n, cfg, sides)
    assert abs(np.log(b / n)) <= np.log(2 ** (1 / cfg.steps_per_octave)) / 2 + 32 / n
  assert ex.bucket_side(100, extract_config(bucket=0)) == 100
  assert ex.bucket_side(1000, extract_config()) == 992  # default: nearest multiple of 32
  assert ex.bucket_side(20, extract_config(bucket=0)) == 64


def test_exact_extraction_matches_numpy_protocol():
  rng = np.random.default_rng(0)
  imgs = _images(rng, [(90, 120), (120, 90), (100, 100), (77, 130)])
  variables = _vars()
  cfg = extract_config(bucket=0, batch_size=2, scales=(0.7071, 1.0, 1.4142))
  boxes = [None, [10.6, 8.2, 80.9, 100.5], None, [3.0, 4.0, 120.0, 70.0]]
  examples = [
    {'index': i, 'image': im, **({'bbx': b} if b is not None else {})}
    for i, (im, b) in reversed(list(enumerate(zip(imgs, boxes))))
  ]
  got = ex.extract_descriptors(stand_in_apply, variables, examples, num=4, cfg=cfg)
  for i, (im, b) in enumerate(zip(imgs, boxes)):
    if b is not None:
      y0, y1, x0, x1 = int(b[1]), int(b[3]), int(b[0]), int(b[2])
      im = im[y0:y1, x0:x1]
    acc = np.zeros(8)
    for s in cfg.scales:
      h, w = max(64, round(im.shape[0] * s)), max(64, round(im.shape[1] * s))
      acc += _l2(stand_in_numpy(variables, ex.resize_bilinear(im, h, w)))
    np.testing.assert_allclose(got[i], _l2(acc / 3), atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
  # Bytes and arrays give the same result; missing indices are an error.
  from dolg_jax.data.synthetic import revisitop_fixture

  data = revisitop_fixture.jpeg_bytes(imgs[0])
  from dolg_jax.data import decode

  a = ex.extract_descriptors(
    stand_in_apply, variables, [{'index': 0, 'image': data}], num=1, cfg=cfg
  )
  b = ex.extract_descriptors(
    stand_in_apply, variables, [{'index': 0, 'image': decode.decode_rgb(data)}], num=1, cfg=cfg
  )
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='got no example'):
    ex.extract_descriptors(
      stand_in_apply, variables, [{'index': 1, 'image': imgs[0]}], num=3, cfg=cfg
    )


def test_buckets_bound_compiles_and_stay_close_to_exact():
  rng = np.random.default_rng(1)
  sizes = [(int(h), int(w)) for h, w in rng.integers(135, 170, size=(12, 2))]
  imgs = _images(rng, sizes)
  examples = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
  variables = _vars(1)
  exact = ex.Extractor(
    stand_in_apply, variables, extract_config(bucket=0, batch_size=4, scales=(1.0,))
  )
  d_exact = exact.extract(examples, len(imgs))
  bucketed = ex.Extractor(
    stand_in_apply, variables, extract_config(bucket=32, batch_size=4, scales=(1.0,))
  )
  d_b = bucketed.extract(examples, len(imgs))
  cos = (d_exact * d_b).sum(1)
  assert cos.min() > 0.999, cos.min()
  assert exact.compile_count == len(set(sizes))
  # Sides 135..169 snap to 128 or 160: at most 4 spatial shapes, times the batch paddings used.
  assert len({s[1:3] for s in bucketed.shapes_seen}) <= 4
  assert bucketed.compile_count < exact.compile_count
  # The planner used by the benchmark predicts the same shapes without running the model.
  for e in (exact, bucketed):
    assert ex.simulate_shapes(sizes, [None] * len(sizes), e.cfg) == {s[:3] for s in e.shapes_seen}


def test_sharded_over_several_devices_matches_one(tmp_path):
  code = textwrap.dedent('''
    import os, sys, numpy as np, jax
    sys.path.insert(0, os.getcwd())
    from tests.test_extract import stand_in_apply, _vars, _images
    from dolg_jax.retrieval import extract as ex
    from tests.helpers.eval_config import extract_config
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(3)
    imgs = _images(rng, [(90, 120)] * 5 + [(120, 90)] * 2)
    exs = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
    e = ex.Extractor(stand_in_apply, _vars(), extract_config(batch_size=4))
    assert e.n_dev == 4
    np.save(sys.argv[1], e.extract(exs, 7))
  ''')
  out = os.path.join(tmp_path, 'd.npy')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu')
  subprocess.run(
    [sys.executable, '-c', code, out],
    check=True,
    env=env,
    cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
  )
  rng = np.random.default_rng(3)
  imgs = _images(rng, [(90, 120)] * 5 + [(120, 90)] * 2)
  exs = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
  one = ex.Extractor(stand_in_apply, _vars(), extract_config(batch_size=4)).extract(exs, 7)
  np.testing.assert_allclose(np.load(out), one, atol=1e-6)


def test_pad_mode_matches_exact_sizes_with_the_real_model_and_bounds_compiles():
  """Padded canvases + valid_hw (eval default): same descriptors as exact sizes, few shapes."""
  from configs import tiny
  from dolg_jax import models

  cfg = tiny.get_config()
  model = models.build_model(cfg.model)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)

  def apply(v, images, valid_hw=None):
    return model.apply(v, images, valid_hw=valid_hw)

  rng = np.random.default_rng(0)
  sizes = [(70, 90), (77, 65), (100, 130), (66, 120), (131, 99)]
  imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
  examples = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
  scales = (1.0, 1.4142)
  exact = ex.Extractor(apply, variables, extract_config(bucket=0, batch_size=4, scales=scales))
  padded = ex.Extractor(apply, variables, extract_config(pad=True, batch_size=4, scales=scales))
  d_exact = exact.extract(examples, len(imgs))
  d_pad = padded.extract(examples, len(imgs))
  cos = np.sum(d_exact * d_pad, axis=1)
  assert cos.min() > 0.99999, cos
  assert padded.compile_count < exact.compile_count
  ladder = ex.canvas_sides(padded.cfg)
  assert all(s[1] in ladder and s[2] in ladder for s in padded.shapes_seen)
  assert {s[:3] for s in padded.shapes_seen} == ex.simulate_shapes(
    sizes, [None] * len(sizes), padded.cfg
  )
