"""`--help` (and `-h`) on every script in launch/: prints the usage and the arguments, exits 0 and
starts nothing (no python, pip, srun, gcloud, nvidia-smi; no file written). Scripts are found, not
listed, so one added later is covered."""

import os
import stat
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = sorted(f for f in os.listdir(LAUNCH) if f.endswith(('.sh', '.sbatch', '.py')))
# Commands a launcher could start: each a stand-in on PATH that records its call.
COMMANDS = (
  'python',
  'python3',
  'pip',
  'pip3',
  'nvidia-smi',
  'gcloud',
  'srun',
  'sbatch',
  'scontrol',
)


@pytest.fixture
def stand_ins(tmp_path):
  bin_dir, calls = tmp_path / 'bin', tmp_path / 'calls'
  bin_dir.mkdir()
  for name in COMMANDS:
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return bin_dir, calls


def test_the_known_scripts_are_found():
  assert {
    'local_multiprocess.sh',
    'tpu_pod.sh',
    'accelerator_check.sh',
    'slurm_gpu.sbatch',
    'torch_reference_bench.py',
    'torch_export_bench.py',
  } <= set(SCRIPTS)


@pytest.mark.parametrize('flag', ['--help', '-h'])
@pytest.mark.parametrize('script', [s for s in SCRIPTS if not s.endswith('.py')])
def test_shell_launcher_help(script, flag, stand_ins, tmp_path):
  bin_dir, calls = stand_ins
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  env = dict(
    os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', PYTHON=str(bin_dir / 'python')
  )
  proc = subprocess.run(
    ['bash', os.path.join(LAUNCH, script), flag],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.startswith(
    next(l[2:] for l in open(os.path.join(LAUNCH, script)) if l.startswith('# '))
  )  # the script's own description
  assert 'Usage: ' in proc.stdout and 'Arguments:' in proc.stdout and '--help' in proc.stdout
  assert not proc.stderr
  assert not calls.exists(), calls.read_text()
  assert not os.listdir(cwd)


@pytest.mark.parametrize('script', [s for s in SCRIPTS if s.endswith('.py')])
def test_python_launcher_help(script, tmp_path):
  proc = subprocess.run(
    [sys.executable, os.path.join(LAUNCH, script), '--help'],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.startswith('usage: ') and '--output' in proc.stdout
  assert not os.listdir(tmp_path)
