"""One prepared accelerator run: training, extraction and input-pipeline speed in ONE JSON file.

  launch/accelerator_check.sh [--smoke] [OUT_DIR]   # on a machine with one NVIDIA GPU (see there)
  python -m dolg_jax.tools.accelerator_check --output=OUT/accelerator_check.json
      [--torch_result=OUT/torch_reference.json] [--budget_s=480] [--smoke]

Parts (each records its own errors; all share --budget_s; the file is rewritten after every
measurement, so a killed run keeps what it measured):
  train        tools.bench_train.benchmark for every --depths x --batches (per device) at
               --image_size: images/s (also per device), TFLOP/s, fraction of peak
  extraction   retrieval.extract.Extractor over --extract_images JPEGs of --extract_hw (decoding
               timed), random weights of the config's model, per --extract_dtypes: images/s
  pipeline     tools.bench_data.run_pipeline with --pipeline_workers processes: images/s, and
               host cores per 1,000 images/s
  torch        read from --torch_result (launch/torch_reference_bench.py, run first in its own
               process) and the JAX / PyTorch ratio for each (depth, batch) both measured
`--smoke`: every part at tiny sizes (64 px, meant for CPU); the launcher's --smoke also sets
JAX_PLATFORMS=cpu and --config=configs/tiny.py. Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from typing import Any, Callable

from absl import app
from absl import flags
import cv2
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from dolg_jax import atomic
from dolg_jax import cli
from dolg_jax import models
from dolg_jax.retrieval import extract as ex
from dolg_jax.tools import bench_data
from dolg_jax.tools import bench_eval
from dolg_jax.tools import bench_train

FLAGS = flags.FLAGS

# --smoke replaces these flags' values (tiny sizes for CPU).
SMOKE = {
  'batches': ['2'],
  'image_size': 64,
  'extract_hw': ['72', '96'],
  'extract_images': 4,
  'extract_dtypes': ['float32'],
  'pipeline_workers': 0,
  'pipeline_seconds': 1.0,
  'steps': 2,
  'warmup': 1,
}


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
    'config',
    'configs/default.py',
    'Base config (model, head, compute dtype, c.eval).',
    lock_config=True,
  )
  flags.DEFINE_string('output', 'accelerator_check.json', 'The JSON file written.')
  flags.DEFINE_string('torch_result', '', 'JSON of launch/torch_reference_bench.py to merge.')
  flags.DEFINE_float('budget_s', 480.0, 'Time for all the parts together (seconds).')
  flags.DEFINE_bool('smoke', False, 'Every part at tiny sizes (CPU).')
  flags.DEFINE_list('depths', ['50', '101'], 'ResNet depths trained.')
  flags.DEFINE_list('batches', ['32', '64'], 'Per-device batches trained.')
  flags.DEFINE_integer('image_size', 512, 'Training crop side.')
  flags.DEFINE_integer('steps', 10, 'Timed train steps per measurement.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_list('extract_hw', ['768', '1024'], 'H,W of the extraction images.')
  flags.DEFINE_integer(
    'extract_images',
    64,
    'Images extracted (timed on a second pass; a '
    'multiple of config.eval.batch_size fills every batch).',
  )
  flags.DEFINE_list('extract_dtypes', ['bfloat16', 'float32'], 'Extraction compute dtypes.')
  flags.DEFINE_integer('pipeline_workers', -1, 'Input pipeline workers (-1: one per core).')
  flags.DEFINE_float('pipeline_seconds', 10.0, 'Input pipeline timing window.')


class Budget:
  """The deadline shared by the parts."""

  def __init__(self, seconds: float):
    self.deadline = time.monotonic() + seconds

  def left(self) -> float:
    return self.deadline - time.monotonic()


def _error(e: BaseException) -> dict:
  return {
    'error': f'{type(e).__name__}: {e}'.splitlines()[0][:500],
    'traceback': traceback.format_exc(limit=4)[-2000:],
  }


def train_part(
  config: ml_collections.ConfigDict,
  depths: list[int],
  batches: list[int],
  image_size: int,
  steps: int,
  warmup: int,
  budget: Budget,
  save: Callable,
) -> list:
  """bench_train.benchmark for each (depth, per-device batch); errors recorded per measurement."""
  out: list[dict] = []
  for depth in depths:
    for per_device in batches:
      entry: dict[str, Any] = {'depth': depth, 'batch_per_device': per_device}
      if budget.left() <= 0:
        entry['skipped'] = 'time budget spent'
      else:
        try:
          c = config.copy_and_resolve_references()
          c.model.depth = depth
          c.data.image_size = image_size
          res = bench_train.benchmark(c, per_device * jax.device_count(), steps, warmup)
          res['images_per_sec_per_device'] = res['images_per_sec'] / res['devices']
          entry.update(res)
        except Exception as e:  # noqa: BLE001  # Recorded; the others go on.
          entry.update(_error(e))
      out.append(entry)
      save()
  return out


def _jpegs(n: int, hw: tuple[int, int], seed: int = 1) -> list[bytes]:
  """JPEG files (quality 90) of smooth colour fields with noise (natural-image-like statistics for
  the model and the decoder)."""
  rng = np.random.default_rng(seed)
  h, w = hw
  out = []
  for _ in range(n):
    small = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
    img = ex.resize_bilinear(small, h, w).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode('.jpg', rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    out.append(buf.tobytes())
  return out


def extraction_part(
  config: ml_collections.ConfigDict,
  hw: tuple[int, int],
  n_images: int,
  dtypes: list[str],
  budget: Budget,
  save: Callable,
) -> list:
  """Extraction images/s of JPEG files (second pass; the first compiles) per compute dtype."""
  out: list[dict] = []
  cfg = ex.from_config(config.eval, pad=True)
  files = _jpegs(n_images, hw)
  examples = [{'index': i, 'image': b} for i, b in enumerate(files)]
  for dtype in dtypes:
    entry: dict[str, Any] = {
      'compute_dtype': dtype,
      'image_hw': list(hw),
      'images': n_images,
      'input': 'jpeg',
      'jpeg_bytes_mean': float(np.mean([len(b) for b in files])),
      'scales': list(cfg.scales),
      'batch_size': cfg.batch_size,
      'depth': int(config.model.depth),
    }
    if budget.left() <= 0:
      entry['skipped'] = 'time budget spent'
    else:
      try:
        model = models.build_model(config.model, dtype=dtype)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
        apply = lambda v, x, valid_hw=None, m=model: m.apply(v, x, train=False, valid_hw=valid_hw)
        entry.update(bench_eval.time_extraction(ex.Extractor(apply, variables, cfg), examples))
      except Exception as e:  # noqa: BLE001
        entry.update(_error(e))
    out.append(entry)
    save()
  return out


def pipeline_part(
  config: ml_collections.ConfigDict, image_size: int, workers: int, seconds: float, budget: Budget
) -> dict:
  """The training input pipeline's images/s with `workers` processes on this host (config.data's
  augmentation and decode settings)."""
  entry: dict[str, Any] = {
    'workers': workers,
    'image_size': image_size,
    'host_cores': os.cpu_count(),
  }
  if budget.left() <= 0:
    entry['skipped'] = 'time budget spent'
    return entry
  try:
    ips = bench_data.run_pipeline(config.data, [workers], size=image_size, seconds=seconds)[workers]
    cores = max(workers, 1)
    entry.update(
      {
        'images_per_sec': ips,
        'images_per_sec_per_core': ips / cores,
        'cores_per_1000_images_per_sec': 1000.0 * cores / ips,
      }
    )
  except Exception as e:  # noqa: BLE001
    entry.update(_error(e))
  return entry


def torch_ratios(train: list[dict], torch_result: dict) -> list[dict]:
  """JAX / PyTorch images/s for each (depth, per-device batch) both measured."""
  theirs = {
    (r.get('depth'), r.get('batch')): r
    for r in torch_result.get('train', [])
    if 'images_per_sec' in r
  }
  out = []
  for r in train:
    t = theirs.get((r['depth'], r['batch_per_device']))
    if t and 'images_per_sec' in r:
      out.append(
        {
          'depth': r['depth'],
          'batch_per_device': r['batch_per_device'],
          'jax_images_per_sec': r['images_per_sec'],
          'torch_images_per_sec': t['images_per_sec'],
          'jax_over_torch': r['images_per_sec'] / t['images_per_sec'],
        }
      )
  return out


def run_check(
  config: ml_collections.ConfigDict,
  output: str,
  *,
  torch_result: str,
  budget_s: float,
  depths: list[int],
  batches: list[int],
  image_size: int,
  steps: int,
  warmup: int,
  extract_hw: tuple[int, int],
  extract_images: int,
  extract_dtypes: list[str],
  pipeline_workers: int,
  pipeline_seconds: float,
  smoke: bool,
) -> dict:
  """Runs the parts in order (train, extraction, pipeline) and writes `output` after each."""
  budget = Budget(budget_s)
  dev = jax.devices()[0]
  result: dict[str, Any] = {
    'smoke': smoke,
    'device_kind': dev.device_kind,
    'platform': dev.platform,
    'devices': jax.device_count(),
    'jax_version': jax.__version__,
    'host': platform.node(),
    'host_cores': os.cpu_count(),
    'compute_dtype': config.compute_dtype,
    'num_classes': int(config.head.num_classes),
    'budget_s': budget_s,
  }
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

  def save():
    result['elapsed_s'] = budget_s - budget.left()
    atomic.write_json(output, result, indent=1, default=str)

  if torch_result:
    try:
      with open(torch_result) as f:
        result['torch'] = json.load(f)
    except Exception as e:  # noqa: BLE001
      result['torch'] = _error(e)
  # No measurement starts after its part's deadline: training's is at 65% of the budget,
  # extraction's at 90%; the pipeline takes the rest.
  result['train'] = []
  part_budget = Budget(budget.left() - 0.35 * budget_s)
  result['train'] = train_part(
    config, depths, batches, image_size, steps, warmup, part_budget, save
  )
  part_budget = Budget(budget.left() - 0.10 * budget_s)
  result['extraction'] = extraction_part(
    config, extract_hw, extract_images, extract_dtypes, part_budget, save
  )
  result['pipeline'] = pipeline_part(config, image_size, pipeline_workers, pipeline_seconds, budget)
  if isinstance(result.get('torch'), dict) and 'train' in result['torch']:
    result['jax_over_torch'] = torch_ratios(result['train'], result['torch'])
  save()
  return result


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if FLAGS.smoke:
    for name, value in SMOKE.items():
      if not FLAGS[name].present:
        FLAGS[name].value = value
  workers = FLAGS.pipeline_workers if FLAGS.pipeline_workers >= 0 else (os.cpu_count() or 1)
  res = run_check(
    FLAGS.config,
    FLAGS.output,
    torch_result=FLAGS.torch_result,
    budget_s=FLAGS.budget_s,
    depths=[int(d) for d in FLAGS.depths],
    batches=[int(b) for b in FLAGS.batches],
    image_size=FLAGS.image_size,
    steps=FLAGS.steps,
    warmup=FLAGS.warmup,
    extract_hw=tuple(int(v) for v in FLAGS.extract_hw),
    extract_images=FLAGS.extract_images,
    extract_dtypes=list(FLAGS.extract_dtypes),
    pipeline_workers=workers,
    pipeline_seconds=FLAGS.pipeline_seconds,
    smoke=FLAGS.smoke,
  )
  for r in res['train']:
    print(
      f"train R{r['depth']} batch {r['batch_per_device']}/device: "
      f"{r.get('images_per_sec', float('nan')):.1f} images/s, fraction of peak "
      f"{r.get('fraction_of_peak', 'n/a')} {r.get('error', r.get('skipped', ''))}"
    )
  print(f'wrote {FLAGS.output} ({res["elapsed_s"]:.0f} s)')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
