"""launch/local_multiprocess.sh with real training (2 processes, tiny config, CPU).

- SIGTERM to the launcher mid-run: forwarded to both processes, which save the same step and exit
  75 (failures.EXIT_PREEMPTED); the launcher waits for them (none outlives it) and exits 75;
  running the same command again resumes and ends on the single-process run's trajectory;
- kill -9 of one process: the launcher ends with a failure code within DEAD_CHILD_BOUND_S and
  leaves no process behind.

The launcher runs `$PYTHON -m dolg_jax.main`: PYTHON is the tests' shim
(tests/helpers/python_shim.py) so that batches can be slowed to leave a window for the signal.
"""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.helpers import train_testlib as tl
from dolg_jax.training import failures
from tests.helpers import python_shim

pytestmark = pytest.mark.multiprocess

LAUNCHER = os.path.join(tl.REPO, 'launch', 'local_multiprocess.sh')
FLAGS = tuple(f for f in tl.BASE_FLAGS if not f.startswith('--config=')) + (
  tl.STEPS,
  '--config.train.preemption_sync_every_steps=1',
)


@pytest.fixture(scope='module')
def shim(tmp_path_factory):
  return python_shim.write(str(tmp_path_factory.mktemp('shim')), tl.WRAPPER)


def launch(shim, workdir, log, **env_extra) -> subprocess.Popen:
  out = open(log, 'a')
  return subprocess.Popen(
    ['bash', LAUNCHER, '2', 'configs/tiny.py', workdir, *FLAGS],
    env=tl.env(PYTHON=shim, **env_extra),
    cwd=tl.REPO,
    stdout=out,
    stderr=subprocess.STDOUT,
    start_new_session=True,
  )


def workdir_processes(workdir) -> list[int]:
  """PIDs of the processes whose command line names `workdir` (the launched Python processes)."""
  found = []
  for d in os.listdir('/proc'):
    if d.isdigit() and int(d) != os.getpid():
      try:
        with open(f'/proc/{d}/cmdline', 'rb') as f:
          if f'--workdir={workdir}'.encode() in f.read():
            found.append(int(d))
      except OSError:
        pass
  return found


def wait_for_step(proc, workdir, step, timeout=400):
  deadline = time.time() + timeout
  while not any(r['step'] >= step for r in tl.read_metrics(workdir)):
    assert proc.poll() is None and time.time() < deadline, f'step {step} not logged'
    time.sleep(0.1)


def read(log):
  with open(log, errors='replace') as f:
    return f.read()


def test_sigterm_is_forwarded_saved_and_resumed(shim, tmp_path):
  reference = tl.train_losses(tl.reference_run())
  workdir, log = str(tmp_path / 'w'), str(tmp_path / 'launcher.log')
  proc = launch(shim, workdir, log, DOLG_TEST_SLOW_AFTER=1)
  try:
    wait_for_step(proc, workdir, 1)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert rc == failures.EXIT_PREEMPTED, read(log)[-6000:]
  assert workdir_processes(workdir) == [], 'a process outlived the launcher'
  saved = tl.checkpoint_steps(workdir)
  assert saved and 1 < saved[-1] < int(tl.STEPS.split('=')[1]), (saved, read(log)[-6000:])
  text = read(log)
  for p in (0, 1):  # Both processes stopped at the saved step.
    assert f'[p{p}] Preempted: checkpoint of step {saved[-1]} saved' in text, text[-6000:]
  # The same command again resumes from the saved step.
  again = launch(shim, workdir, log)
  assert again.wait(timeout=600) == 0, read(log)[-6000:]
  assert f'Resumed from step {saved[-1]}' in read(log)
  losses = tl.train_losses(workdir)
  assert sorted(losses) == sorted(reference)
  np.testing.assert_allclose(
    [losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)], rtol=2e-4
  )


# kill -9 of one process -> launcher exit: the survivor's next collective fails at once (gloo's
# connection to the dead peer closes; measured 2.4 s on a loaded 2-core machine).
DEAD_CHILD_BOUND_S = 60


def test_dead_process_ends_the_launch(shim, tmp_path):
  workdir, log = str(tmp_path / 'w'), str(tmp_path / 'launcher.log')
  proc = launch(shim, workdir, log, DOLG_TEST_SLOW_AFTER=2)
  try:
    wait_for_step(proc, workdir, 3)
    deadline = time.time() + 60  # Checkpoint 2 committed (its directory renamed), 4 not yet.
    while 2 not in tl.checkpoint_steps(workdir):
      assert time.time() < deadline, tl.checkpoint_steps(workdir)
      time.sleep(0.1)
    victim = [p for p in workdir_processes(workdir) if _is_process(p, 1)]
    assert len(victim) == 1, workdir_processes(workdir)
    os.kill(victim[0], signal.SIGKILL)
    killed = time.time()
    rc = proc.wait(timeout=DEAD_CHILD_BOUND_S + 120)
    down = time.time() - killed
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert rc not in (0, failures.EXIT_PREEMPTED), (rc, read(log)[-6000:])
  assert down <= DEAD_CHILD_BOUND_S, f'launcher took {down:.1f} s to end after a process died'
  assert workdir_processes(workdir) == [], 'a process outlived the launcher'
  assert 2 in tl.checkpoint_steps(workdir)  # The last completed checkpoint is kept.
  print(f'\n[local launcher] kill -9 of process 1: launcher exit {rc} after {down:.1f} s')


def _is_process(pid, process_id) -> bool:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      return f'--process_id={process_id}'.encode() in f.read().split(b'\0')
  except OSError:
    return False
