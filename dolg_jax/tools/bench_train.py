"""Train-step benchmark: images/s, step time, achieved TFLOP/s and (GPU/TPU) fraction of peak.

  python -m dolg_jax.tools.bench_train --config=configs/r50.py --batch=128 [--steps=20] [--warmup=3]
      [--config.compute_dtype=bfloat16] [--config.train.grad_accum_steps=1] [--config.mesh.model=1]

Times the real jitted train step (sharded on the config's mesh, donation, gradient accumulation,
margin head over `config.head.num_classes` classes) on a fixed random batch already on the devices
(no input pipeline). FLOPs: XLA's cost analysis of the compiled step (per device, times the device
count). Peak: the device kind's dense FLOP/s in the compute dtype (training/peaks.py;
--peak_tflops overrides).
"""

import time

from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from dolg_jax import cli
from dolg_jax import sharding as shd
from dolg_jax.training import determinism
from dolg_jax.training import peaks
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', 'configs/r50.py', 'Training config.', lock_config=True)
  flags.DEFINE_integer('batch', None, 'Global batch (default: config.train.global_batch_size).')
  flags.DEFINE_integer('steps', 20, 'Timed steps.')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device (default: table).')


def benchmark(
  config, batch: int, steps: int, warmup: int, peak_override: float | None = None
) -> dict:
  """Compiles and times the train step; returns the figures."""
  config.train.global_batch_size = batch
  mesh = shd.make_mesh(config.mesh)
  setup = state_lib.make_setup(config, mesh)
  n_classes = setup.num_classes
  state, sh = state_lib.create_train_state(setup, jax.random.key(0))
  train_step = step_lib.make_train_step(setup, sh)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  local = batch // jax.process_count()
  images = shd.global_batch(
    mesh,
    {
      'image': rng.integers(0, 256, (local, size, size, 3), dtype=np.uint8),
      'label': rng.integers(0, n_classes, (local,), dtype=np.int32),
    },
  )
  lr = np.float32(1e-4)

  t0 = time.perf_counter()
  compiled = train_step.lower(state, images, lr).compile()
  compile_s = time.perf_counter() - t0
  flops = step_lib.train_flops_per_step(compiled)
  for _ in range(warmup):
    state, metrics = compiled(state, images, lr)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, images, lr)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  n_dev = jax.device_count()
  out = {
    'device_kind': jax.devices()[0].device_kind,
    'devices': n_dev,
    'batch': batch,
    'image_size': size,
    'compute_dtype': config.compute_dtype,
    'grad_accum_steps': config.train.grad_accum_steps,
    'compile_s': compile_s,
    'step_time_s': step_s,
    'step_time_min_s': float(np.min(times)),
    'images_per_sec': batch / step_s,
    'loss': float(metrics['loss']),
  }
  if flops:
    total = flops * n_dev
    out.update({'gflop_per_step': total / 1e9, 'tflops_per_sec': total / step_s / 1e12})
    peak = peak_override or peaks.peak_tflops(out['device_kind'], config.compute_dtype)
    if peak and jax.devices()[0].platform != 'cpu':
      out['peak_tflops_per_device'] = peak
      out['fraction_of_peak'] = out['tflops_per_sec'] / (peak * n_dev)
  return out


def main(argv):
  del argv
  config = FLAGS.config
  determinism.apply(config.train.deterministic, at_entry=True)  # Before the XLA backend starts.
  res = benchmark(
    config,
    FLAGS.batch or config.train.global_batch_size,
    FLAGS.steps,
    FLAGS.warmup,
    FLAGS.peak_tflops,
  )
  print(
    f"{res['device_kind']} x{res['devices']}  batch {res['batch']}  {res['image_size']}px  "
    f"{res['compute_dtype']}  accum {res['grad_accum_steps']}"
  )
  print(f"compile {res['compile_s']:.1f} s")
  print(
    f"train: {res['images_per_sec']:.2f} images/s, step {1e3 * res['step_time_s']:.1f} ms "
    f"(median of {FLAGS.steps}; min {1e3 * res['step_time_min_s']:.1f} ms)"
  )
  if 'tflops_per_sec' in res:
    line = (
      f"XLA cost analysis: {res['gflop_per_step']:.1f} GFLOP/step -> "
      f"{res['tflops_per_sec']:.3f} TFLOP/s achieved"
    )
    if 'fraction_of_peak' in res:
      line += (
        f", {100 * res['fraction_of_peak']:.1f}% of peak "
        f"({res['peak_tflops_per_device']:.0f} TFLOP/s/device)"
      )
    print(line)
  else:
    print('XLA cost analysis unavailable on this backend.')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
