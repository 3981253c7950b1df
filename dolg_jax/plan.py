"""Ahead-of-time plan of a training run: python -m dolg_jax.plan --config=configs/r101.py
    [--config.train.global_batch_size=256 --config.data.image_size=512 ...] [--max_batch]
    [--topology=v5p:2x2x2] [--device_memory_bytes=N]

Compiles the train step for the configured mesh without running it or reading data and prints ONE
JSON object: flops_per_step, peak_memory_bytes_per_device, argument_bytes_per_device (params +
optimizer state), device_kind, device_memory_bytes, fits, ... (dolg_jax.training.plan).
--max_batch adds the largest per-device batch that fits (bisection; needs the device memory).
--topology compiles for a Cloud TPU topology's devices on this host (needs libtpu).
"""

import json
import sys

from absl import flags
from ml_collections import config_flags

from dolg_jax import cli
from dolg_jax.training import plan as plan_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP, lock_config=True)
  flags.DEFINE_bool('max_batch', False, 'Also find the largest per-device batch that fits.')
  flags.DEFINE_integer('max_batch_limit', 4096, 'Largest per-device batch tried by --max_batch.')
  flags.DEFINE_string(
    'topology',
    None,
    "Cloud TPU topology to compile for (libtpu names, e.g. "
    "'v5e:2x4', 'v5p:2x2x2'); default: this host's devices.",
  )
  flags.DEFINE_integer(
    'device_memory_bytes',
    None,
    'Device memory to plan for (default: the device\'s own; unknown on CPU).',
  )


def main(argv):
  config = cli.required_config(argv)
  try:
    devices = plan_lib.topology_devices(FLAGS.topology) if FLAGS.topology else None
    out = plan_lib.plan(config, devices, memory_bytes=FLAGS.device_memory_bytes)
    if FLAGS.max_batch:
      out.update(
        plan_lib.max_batch(
          config, devices, memory_bytes=FLAGS.device_memory_bytes, limit=FLAGS.max_batch_limit
        )
      )
  except plan_lib.PlanError as e:
    sys.exit(f'ERROR: {e}')
  print(json.dumps(out), flush=True)


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
