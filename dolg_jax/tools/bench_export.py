"""Exported-model latency on the CPU: onnxruntime vs JAX vs jax.export vs the official torch model.

  python -m dolg_jax.tools.bench_export                       # R50 (configs/r50.py), 512x512
  python -m dolg_jax.tools.bench_export --config=configs/tiny.py --image_size=128 --runs=3
  [--checkpoint=PATH]   # real weights (torch then times its own random model of the same shape)
  [--torch=False] [--threads=N] [--out=DIR]

Runs launch/torch_export_bench.py in its own process (the official torch model, random weights;
saves and times it), exports that .pth as `python -m dolg_jax.export` does, then times one
(1, S, S, 3) image through onnxruntime (CPU), the jitted JAX function and the deserialized
jax.export artifact: the median of --runs calls after a warm-up call (compilation apart), with
each runtime's relative error to JAX. Without torch (or launch/) the JAX model is randomly
initialised. onnxruntime and torch use --threads (0: all cores), XLA all cores. Writes
OUT/bench_export.json and prints a table. Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import onnxruntime

from dolg_jax import cli
from dolg_jax import models
from dolg_jax.retrieval import evaluate
from dolg_jax.retrieval import export as export_lib

FLAGS = flags.FLAGS
TORCH_SCRIPT = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  'launch',
  'torch_export_bench.py',
)


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
    'config', 'configs/r50.py', 'Model (and c.eval overrides).', lock_config=True
  )
  flags.DEFINE_string('checkpoint', None, 'Weights to export (default: the torch model\'s).')
  flags.DEFINE_integer('image_size', 512, 'Side of the square test image.')
  flags.DEFINE_integer('runs', 5, 'Timed calls per runtime (after one warm-up call).')
  flags.DEFINE_integer('threads', 0, 'onnxruntime / torch threads (0: all cores).')
  flags.DEFINE_bool('torch', True, 'Time the official torch model (launch/torch_export_bench.py).')
  flags.DEFINE_string(
    'out', None, 'Directory for the export and bench_export.json (default: a temporary one).'
  )


def _time(call, x, runs):
  t = time.perf_counter()
  out = np.asarray(call(x))
  warm = time.perf_counter() - t
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    out = np.asarray(call(x))
    times.append(1000 * (time.perf_counter() - t))
  return {
    'first_call_s': round(warm, 3),
    'ms_per_image': times,
    'median_ms': float(np.median(times)),
  }, out


def _torch(workdir, config, images, threads, runs):
  """Runs the torch script (saves workdir/official.pth); its result dict, or None."""
  m = config.model
  cmd = [
    sys.executable,
    TORCH_SCRIPT,
    f'--images={images}',
    f'--output={workdir}/torch.json',
    f'--save_checkpoint={workdir}/official.pth',
    f'--depth={m.depth}',
    f'--width={m.width}',
    f'--with_aspp={int(m.use_multi_atrous)}',
    f'--runs={runs}',
    f'--threads={threads}',
  ]
  res = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if res.returncode != 0:
    print(f'torch benchmark failed (skipped): {res.stderr.strip().splitlines()[-1:]}')
    return None
  with open(f'{workdir}/torch.json') as f:
    out = json.load(f)
  out['descriptor'] = np.load(f'{workdir}/torch.npy')
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = export_lib.export_config(FLAGS.config)
  threads = FLAGS.threads or os.cpu_count()
  workdir = FLAGS.out or tempfile.mkdtemp(prefix='bench_export_')
  os.makedirs(workdir, exist_ok=True)
  s = FLAGS.image_size
  image = np.random.RandomState(0).randint(0, 256, (1, s, s, 3)).astype(np.float32)
  np.save(os.path.join(workdir, 'image.npy'), image)

  torch_result = None
  checkpoint = FLAGS.checkpoint
  if FLAGS.torch and os.path.isfile(TORCH_SCRIPT):
    torch_result = _torch(workdir, config, os.path.join(workdir, 'image.npy'), threads, FLAGS.runs)
    if torch_result is not None and not checkpoint:
      checkpoint = os.path.join(workdir, 'official.pth')
  if checkpoint:
    apply_fn, variables, source = evaluate.load_model(config, checkpoint=checkpoint)
  else:
    model = models.build_model(config.model)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
    apply_fn, source = evaluate.model_apply_fn(model), 'random init'
  fn = export_lib.descriptor_fn(apply_fn, variables)

  export_dir = os.path.join(workdir, 'export')
  t = time.perf_counter()
  export_lib.export_model(fn, export_dir, verify_shapes=((1, 64, 64),), info={'source': source})
  export_s = time.perf_counter() - t

  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = threads
  options.log_severity_level = 3
  session = onnxruntime.InferenceSession(
    os.path.join(export_dir, export_lib.ONNX_FILE), options, providers=['CPUExecutionProvider']
  )
  exported = export_lib.load_jax_export(os.path.join(export_dir, export_lib.JAX_EXPORT_FILE))
  jitted = jax.jit(fn)
  exported_call = jax.jit(exported.call)
  runtimes = {
    'onnxruntime': lambda x: session.run([export_lib.OUTPUT_NAME], {export_lib.INPUT_NAME: x})[0],
    'jax': lambda x: jitted(x).block_until_ready(),
    'jax_export': lambda x: exported_call(x).block_until_ready(),
  }
  results, descs = {}, {}
  for name, call in runtimes.items():
    results[name], descs[name] = _time(call, image, FLAGS.runs)
  if torch_result is not None:
    descs['torch'] = torch_result.pop('descriptor')
    results['torch'] = dict(torch_result, median_ms=float(np.median(torch_result['ms_per_image'])))
  for name in results:
    results[name]['relative_error_vs_jax'] = export_lib.relative_error(descs[name], descs['jax'])

  summary = {
    'source': source,
    'image_shape': list(image.shape),
    'threads': threads,
    'cpu_count': os.cpu_count(),
    'load_average': os.getloadavg(),
    'export_s': round(export_s, 1),
    'runs': FLAGS.runs,
    'results': results,
    'versions': {'jax': jax.__version__, 'onnxruntime': onnxruntime.__version__},
  }
  with open(os.path.join(workdir, 'bench_export.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  print(
    f'\n{source}; image {s}x{s}, batch 1; {threads} threads (onnxruntime, torch), '
    f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; export {export_s:.0f} s'
  )
  print(
    f'{"runtime":<12} {"median ms/image":>16} {"min ms":>8} {"first call s":>13} '
    f'{"rel. err vs jax":>16}'
  )
  for name, r in results.items():
    first = r.get('first_call_s', float('nan'))
    print(
      f'{name:<12} {r["median_ms"]:>16.1f} {min(r["ms_per_image"]):>8.1f} {first:>13.2f} '
      f'{r["relative_error_vs_jax"]:>16.2e}'
    )
  print(f'written: {os.path.join(workdir, "bench_export.json")}')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
