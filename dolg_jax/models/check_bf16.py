"""Measures bf16-compute vs float32 agreement of DOLG descriptors (random weights).

  python -m dolg_jax.models.check_bf16 [--depth 50] [--size 512] [--batch 2] [--multi_atrous]

Prints the per-image cosine between the float32 and the bfloat16 descriptors (before L2
normalisation), for the model's own initialisation and after calibrating the BN statistics on the
batch (one float32 train-mode pass with momentum 0, so every BN normalises its input as in a
trained network; with the init statistics mean 0 / var 1 activations grow through the stages).
Images are smooth random RGB images (bilinearly upsampled 16x16 noise) in [0, 255].
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from dolg_jax.models import build_model


def cosine(a: jax.Array, b: jax.Array) -> np.ndarray:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def smooth_images(batch: int, size: int, seed: int = 0) -> jax.Array:
  low = np.random.default_rng(seed).uniform(0, 255, (batch, 16, 16, 3)).astype(np.float32)
  return jax.image.resize(jnp.asarray(low), (batch, size, size, 3), 'bilinear')


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--multi_atrous', action='store_true',
                      help='paper model (default: released variant, no multi-atrous)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)

  cfg = default.get_config().model
  cfg.depth = args.depth
  cfg.use_multi_atrous = args.multi_atrous
  cfg.gem_p_learnable = True
  images = smooth_images(args.batch, args.size, args.seed)
  m32 = build_model(cfg, jnp.float32)
  m16 = build_model(cfg, jnp.bfloat16)
  t0 = time.time()
  variables = jax.jit(m32.init)(jax.random.PRNGKey(args.seed), images[:1])
  print(f'init {time.time() - t0:.1f}s on {jax.devices()[0].platform}')

  fwd32 = jax.jit(m32.apply)
  fwd16 = jax.jit(m16.apply)
  results = {}
  for label in ('init', 'calibrated'):
    if label == 'calibrated':
      calib = build_model({**dict(cfg), 'bn_momentum': 0.0}, jnp.float32)
      _, upd = jax.jit(lambda v, x: calib.apply(v, x, train=True, mutable=['batch_stats']))(
          variables, images)
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
    cross = cosine(d32[:-1], d32[1:]) if args.batch > 1 else np.array([np.nan])
    print(f'R{args.depth} {"with" if args.multi_atrous else "without"} multi-atrous '
          f'{args.size}x{args.size} batch {args.batch} [{label} BN stats]: bf16 vs float32 '
          f'descriptor cosine {np.array2string(cos, precision=6)} (min {cos.min():.6f}), '
          f'relative L2 error {rel:.4f}; float32 cosine between different images '
          f'{np.array2string(cross, precision=4)}  '
          f'(f32 {t1 - t0:.1f}s, bf16 {t2 - t1:.1f}s incl. compile)')
  return results


if __name__ == '__main__':
  main()
