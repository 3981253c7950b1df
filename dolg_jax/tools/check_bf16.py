"""Measures bf16-compute vs float32 agreement of DOLG descriptors (random weights).

  python -m dolg_jax.tools.check_bf16 [--config=configs/default.py] [--size=512] [--batch=2]
      [--config.model.depth=101] [--config.model.use_multi_atrous=False]

Prints the per-image cosine between the float32 and the bfloat16 descriptors (before L2
normalisation) of smooth random RGB images, for the model's own initialisation and after
calibrating the BN statistics on the batch (one float32 train-mode pass with momentum 0).
Design notes: docs/design_notes.md.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from dolg_jax import cli
from dolg_jax.models import build_model

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
    'config', 'configs/default.py', 'Config whose c.model is measured.', lock_config=True
  )
  flags.DEFINE_integer('size', 512, 'Image side.')
  flags.DEFINE_integer('batch', 2, 'Images.')
  flags.DEFINE_integer('seed', 0, 'Weights and images seed.')


def cosine(a: jax.Array, b: jax.Array) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def smooth_images(batch: int, size: int, seed: int = 0) -> jax.Array:
  low = np.random.default_rng(seed).uniform(0, 255, (batch, 16, 16, 3)).astype(np.float32)
  return jax.image.resize(jnp.asarray(low), (batch, size, size, 3), 'bilinear')


def check(cfg, size: int, batch: int, seed: int) -> dict:
  """Cosines between float32 and bfloat16 descriptors of the model `cfg` (a c.model section)."""
  images = smooth_images(batch, size, seed)
  m32 = build_model(cfg, jnp.float32)
  m16 = build_model(cfg, jnp.bfloat16)
  t0 = time.time()
  variables = jax.jit(m32.init)(jax.random.PRNGKey(seed), images[:1])
  print(f'init {time.time() - t0:.1f}s on {jax.devices()[0].platform}')

  fwd32 = jax.jit(m32.apply)
  fwd16 = jax.jit(m16.apply)
  results = {}
  for label in ('init', 'calibrated'):
    if label == 'calibrated':
      calib = build_model({**dict(cfg), 'bn_momentum': 0.0}, jnp.float32)
      _, upd = jax.jit(lambda v, x: calib.apply(v, x, train=True, mutable=['batch_stats']))(
        variables, images
      )
      variables = {'params': variables['params'], 'batch_stats': upd['batch_stats']}
    t0 = time.time()
    d32 = jax.block_until_ready(fwd32(variables, images))
    t1 = time.time()
    d16 = jax.block_until_ready(fwd16(variables, images))
    t2 = time.time()
    cos = cosine(d32, d16)
    rel = float(np.linalg.norm(np.asarray(d32) - np.asarray(d16)) / np.linalg.norm(np.asarray(d32)))
    results[label] = cos
    # For scale: how similar the float32 descriptors of different images are.
    cross = cosine(d32[:-1], d32[1:]) if batch > 1 else np.array([np.nan])
    print(
      f'R{cfg.depth} {"with" if cfg.use_multi_atrous else "without"} multi-atrous '
      f'{size}x{size} batch {batch} [{label} BN stats]: bf16 vs float32 '
      f'descriptor cosine {np.array2string(cos, precision=6)} (min {cos.min():.6f}), '
      f'relative L2 error {rel:.4f}; float32 cosine between different images '
      f'{np.array2string(cross, precision=4)}  '
      f'(f32 {t1 - t0:.1f}s, bf16 {t2 - t1:.1f}s incl. compile)'
    )
  return results


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  check(FLAGS.config.model, FLAGS.size, FLAGS.batch, FLAGS.seed)


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
