"""Shared helpers of the training tests: run `dolg_jax.main` on the tiny config in subprocesses.

Every run uses one persistent XLA compilation cache so that the tiny model compiles once per
distinct device layout per test session (and across sessions), and one GLDv2 fixture dataset.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from dolg_jax.data.synthetic import gldv2_fixture
from dolg_jax.weights import checkpoint as ckpt_layout
from tests.helpers.paths import REPO

ROOT = os.path.join(tempfile.gettempdir(), 'dolg_jax_train_tests')
CACHE_DIR = os.path.join(ROOT, 'xla_cache')
DATA_DIR = os.path.join(ROOT, 'tiny_gldv2')

# Flags shared by the runs compared with each other (same program => one compilation).
BASE_FLAGS = (
  '--config=configs/tiny.py',
  f'--config.data.data_dir={DATA_DIR}',
  '--config.train.log_every_steps=1',
  '--config.train.eval_every_steps=0',
  '--config.train.checkpoint_every_steps=2',
  '--config.train.keep_checkpoints=2',
)

# Runs dolg_jax.main with a wrapped training iterator: DOLG_TEST_KILL_AT=k SIGKILLs the process
# when batch k is requested; DOLG_TEST_SLOW_AFTER=k sleeps 0.5 s before each batch after the k-th
# (a window for the test to send SIGTERM).
WRAPPER = r'''
import os, signal, sys, time
from dolg_jax.training import inputs
_make = inputs.train_iterator

class _Wrapped:
  def __init__(self, it):
    self.it, self.n = it, 0
  def __iter__(self):
    return self
  def __next__(self):
    self.n += 1
    if self.n == int(os.environ.get('DOLG_TEST_KILL_AT', 0)):
      os.kill(os.getpid(), signal.SIGKILL)
    if self.n > int(os.environ.get('DOLG_TEST_SLOW_AFTER', 10**9)):
      time.sleep(0.5)
    return next(self.it)
  def get_state(self):
    return self.it.get_state()
  def set_state(self, s):
    self.it.set_state(s)

inputs.train_iterator = lambda *a, **k: _Wrapped(_make(*a, **k))
from dolg_jax import main
sys.argv = ['dolg_jax.main'] + sys.argv[1:]
main.run()
'''


def env(**extra) -> dict:
  e = dict(os.environ)
  e.update(
    {
      'PYTHONPATH': REPO + os.pathsep + e.get('PYTHONPATH', ''),
      'JAX_PLATFORMS': 'cpu',
      'JAX_COMPILATION_CACHE_DIR': CACHE_DIR,
      'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
      'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0',
      'TF_CPP_MIN_LOG_LEVEL': '2',
    }
  )
  e.pop('XLA_FLAGS', None)
  e.update({k: str(v) for k, v in extra.items()})
  return e


def ensure_fixture() -> str:
  """Builds the tiny GLDv2 fixture dataset once (shared by all training tests)."""
  gldv2_fixture.ensure_fixture_dataset(DATA_DIR)
  return DATA_DIR


def main_cmd(workdir: str, *flags: str, wrapped: bool = False) -> list[str]:
  head = [sys.executable, '-c', WRAPPER] if wrapped else [sys.executable, '-m', 'dolg_jax.main']
  return head + [f'--workdir={workdir}', *BASE_FLAGS, *flags]


def run_main(
  workdir: str, *flags: str, wrapped: bool = False, timeout: float = 600, **env_extra
) -> subprocess.CompletedProcess:
  return subprocess.run(
    main_cmd(workdir, *flags, wrapped=wrapped),
    cwd=REPO,
    env=env(**env_extra),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def start_main(
  workdir: str, *flags: str, wrapped: bool = False, log_file: str | None = None, **env_extra
) -> subprocess.Popen:
  """Starts a run; output goes to pipes, or to `log_file` (use it when several processes run at
  once: a process blocked on a full pipe would stall the others in their collectives)."""
  out = open(log_file, 'w') if log_file else subprocess.PIPE
  return subprocess.Popen(
    main_cmd(workdir, *flags, wrapped=wrapped),
    cwd=REPO,
    env=env(**env_extra),
    stdout=out,
    stderr=subprocess.STDOUT if log_file else subprocess.PIPE,
    text=True,
  )


def sigterm_when_logged(
  proc: subprocess.Popen, workdir: str, step: int, timeout: float = 400
) -> None:
  """Sends SIGTERM to `proc` once metrics.jsonl holds `step`."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if any(r['step'] >= step for r in read_metrics(workdir)):
      proc.send_signal(signal.SIGTERM)
      return
    time.sleep(0.1)
  raise AssertionError(f'step {step} never logged (rc={proc.poll()})')


STEPS = '--config.train.num_train_steps=4'
_REFERENCE: dict[str, str] = {}


def reference_run() -> str:
  """Workdir of the straight single-device 4-step run (made once per test session)."""
  if 'workdir' not in _REFERENCE:
    ensure_fixture()
    os.makedirs(ROOT, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix='straight_', dir=ROOT)
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    # Validation at the last step (host-side setting: the train step's program is unchanged).
    proc = run_main(workdir, STEPS, '--config.train.eval_every_steps=4')
    assert proc.returncode == 0, explain(proc)
    _REFERENCE.update(workdir=workdir, stdout=proc.stdout)
  return _REFERENCE['workdir']


def reference_stdout() -> str:
  reference_run()
  return _REFERENCE['stdout']


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def train_losses(workdir: str) -> dict[int, float]:
  """{step: loss} of the training records (validation records have no 'loss')."""
  return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def checkpoint_steps(workdir: str) -> list[int]:
  return ckpt_layout.list_steps(ckpt_layout.checkpoint_dir(workdir))


def explain(proc) -> str:
  return f'rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}'
