"""Quiet by default (cli.run_app): a run prints its own lines and none of the libraries' INFO lines
(orbax, TFDS, JAX's backend probe) nor their harmless warnings; `--verbosity=1` shows everything."""

import logging
import os
import re

from absl import logging as absl_logging
import pytest

from dolg_jax import cli
from tests.helpers import train_testlib as tl

LIBRARY_LINES = (
  'orbax',
  'checkpoint_manager.py',
  'tensorflow_datasets',
  'dataset_info.py',
  'xla_bridge.py',
  "Unable to initialize backend",
  'Metadata file does not exist',
  'has no dataset_info.json',
)


def test_a_tiny_run_prints_its_own_lines_only(tmp_path):
  tl.ensure_fixture()
  proc = tl.run_main(
    str(tmp_path / 'run'),
    '--config.train.num_train_steps=2',
    '--config.train.eval_every_steps=2',
    JAX_PLATFORMS='',  # unset: JAX probes its platforms (the TPU probe logs at INFO)
  )
  assert proc.returncode == 0, tl.explain(proc)
  output = proc.stdout + proc.stderr
  noise = [l for l in output.splitlines() if any(s in l for s in LIBRARY_LINES)]
  assert not noise, '\n'.join(noise[:20])
  # The progress line, with the validation accuracy at a validation step.
  assert re.search(
    r'^step 2/2 \(100\.0%\) loss .* \| val_accuracy [01]\.\d{3}$', proc.stdout, re.M
  ), proc.stdout
  assert 'loop.py' in proc.stderr and 'Mesh ' in proc.stderr  # our INFO lines
  assert len(output.splitlines()) < 20, output


def _record(path_parts, level, msg, *args):
  path = os.path.join(os.sep, 'site-packages', *path_parts)
  return logging.LogRecord('absl', level, path, 1, msg, args, None)


@pytest.fixture
def verbosity():
  before = absl_logging.get_verbosity()
  yield absl_logging.set_verbosity
  absl_logging.set_verbosity(before)


def test_the_filter_keeps_ours_and_library_warnings_that_mean_something(verbosity):
  keep = cli._QuietLibraries().filter
  verbosity(0)
  ours = logging.LogRecord(
    'absl',
    logging.INFO,
    os.path.join(cli.PACKAGE_DIR, 'training', 'loop.py'),
    1,
    'Mesh %s',
    ({'data': 1},),
    None,
  )
  assert keep(ours)
  assert not keep(_record(('orbax', 'checkpoint', 'checkpoint_manager.py'), logging.INFO, 'Saving'))
  assert not keep(
    _record(
      ('jax', '_src', 'xla_bridge.py'),
      logging.INFO,
      "Unable to initialize backend 'tpu': no libtpu",
    )
  )
  assert not keep(
    _record(
      ('orbax', 'checkpoint', '_src', 'metadata', 'checkpoint.py'),
      logging.WARNING,
      'Metadata file does not exist: %s',
      '/w/1/state',
    )
  )
  assert not keep(
    _record(
      ('tensorflow_datasets', 'core', 'utils', 'file_utils.py'),
      logging.WARNING,
      'Variant folder %s has no %s',
      '/d/1.0.0',
      'dataset_info.json',
    )
  )
  assert keep(_record(('orbax', 'checkpoint', 'x.py'), logging.WARNING, 'Something else'))
  assert keep(
    _record(
      ('jax', '_src', 'xla_bridge.py'),
      logging.WARNING,
      'An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib '
      'is not installed. Falling back to cpu.',
    )
  )
  verbosity(1)
  assert keep(_record(('orbax', 'checkpoint', 'checkpoint_manager.py'), logging.INFO, 'Saving'))
  assert keep(
    _record(
      ('orbax', 'checkpoint', '_src', 'metadata', 'checkpoint.py'),
      logging.WARNING,
      'Metadata file does not exist: %s',
      '/w/1/state',
    )
  )
