"""The embedded demo: python -m dolg_jax.demo [--workdir=/tmp/dolg_demo] [--config=configs/demo.py]

Writes procedural landmark data in the official layouts, converts it with the real builders,
evaluates the untrained model, trains with the real training loop, evaluates the checkpoint and
prints both rows in one table (see dolg_jax.training.demo_run for the steps).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import tensorflow_datasets as tfds

from dolg_jax import cli
from dolg_jax.training import demo_run

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Demo config.', lock_config=True)
  flags.DEFINE_string('workdir', '/tmp/dolg_demo', 'Training workdir of the demo.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS['verbosity'].present:  # quiet unless asked (--verbosity=1 shows everything)
    logging.set_verbosity(logging.WARNING)
    tfds.display_progress_bar(False)  # the demo's own lines say what is being built
  demo_run.run_demo(FLAGS.config, FLAGS.workdir)


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
