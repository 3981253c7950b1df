"""dolg_jax.main: locked config (typos are errors naming the field), cluster detection."""

import os
import subprocess
import sys

import pytest

from dolg_jax import cli

from tests.helpers.paths import REPO


def _run(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  return subprocess.run(
    [sys.executable, '-m', 'dolg_jax.main', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


@pytest.mark.parametrize(
  'override, expected',
  [
    ('--config.train.log_evry_steps=3', "unknown config field 'train.log_evry_steps'"),
    ('--config.trian.num_epochs=3', "unknown config field 'trian.num_epochs'"),
    ('--config.train.no_such_field=1', "unknown config field 'train.no_such_field'"),
  ],
)
def test_config_typo_is_an_error_naming_the_field(tmp_path, override, expected):
  proc = _run('--config=configs/tiny.py', f'--workdir={tmp_path}', override)
  assert proc.returncode != 0
  assert expected in proc.stderr, proc.stderr[-2000:]
  assert not os.listdir(tmp_path)  # Nothing started.


def test_typo_hint_suggests_the_field(tmp_path):
  proc = _run('--config=configs/r50.py', f'--workdir={tmp_path}', '--config.train.log_evry_steps=3')
  assert 'Did you mean "log_every_steps"' in proc.stderr


def test_cluster_detection():
  assert not cli.cluster_detected({})
  assert not cli.cluster_detected({'SLURM_NTASKS': '1', 'SLURM_STEP_ID': '0'})
  assert not cli.cluster_detected({'SLURM_NTASKS': '4'})  # sbatch shell, not an srun step
  assert cli.cluster_detected({'SLURM_NTASKS': '4', 'SLURM_STEP_ID': '0'})
  assert cli.cluster_detected({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'})
  assert not cli.cluster_detected({'TPU_WORKER_HOSTNAMES': 'localhost'})
