"""One run per workdir (dolg_jax.training.workdir_lock), with real runs of the tiny config:

- a second `python -m dolg_jax.main` on a workdir in use stops at once (exit 1) with a last line
  naming the holder (host, pid, start time); the holder's log and checkpoints are untouched;
- `kill -9` of the holder, then the same command at once: not refused (the kernel dropped the
  lock), it resumes from the last checkpoint and finishes.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from dolg_jax.training import workdir_lock
from tests.helpers import train_testlib as tl


# dolg_jax.main whose batch 3 waits (the run holding its workdir) until the file $DOLG_TEST_GO
# exists, after creating $DOLG_TEST_PAUSED: the test acts while the holder is known to be alive.
_HOLDING = r'''
import os, sys, time
from dolg_jax.training import inputs
_make = inputs.train_iterator

class _Holding:
  def __init__(self, it):
    self.it, self.n = it, 0
  def __iter__(self):
    return self
  def __next__(self):
    self.n += 1
    if self.n == 3:
      open(os.environ['DOLG_TEST_PAUSED'], 'w').close()
      while not os.path.exists(os.environ['DOLG_TEST_GO']):
        time.sleep(0.05)
    return next(self.it)
  def get_state(self):
    return self.it.get_state()
  def set_state(self, s):
    self.it.set_state(s)

inputs.train_iterator = lambda *a, **k: _Holding(_make(*a, **k))
from dolg_jax import main
sys.argv = ['dolg_jax.main'] + sys.argv[1:]
main.run()
'''


def _wait(predicate, proc, what, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert proc.poll() is None, f'{what}: the run ended (rc={proc.returncode})'
    assert time.time() < deadline, f'{what}: timed out'
    time.sleep(0.05)


def test_second_run_refused_then_kill_9_and_immediate_rerun(tmp_path):
  tl.ensure_fixture()
  workdir = str(tmp_path / 'w')
  log = str(tmp_path / 'holder.log')
  paused, go = str(tmp_path / 'paused'), str(tmp_path / 'go')
  cmd = [sys.executable, '-c', _HOLDING, f'--workdir={workdir}', *tl.BASE_FLAGS, tl.STEPS]
  with open(log, 'w') as out:
    holder = subprocess.Popen(
      cmd,
      cwd=tl.REPO,
      env=tl.env(DOLG_TEST_PAUSED=paused, DOLG_TEST_GO=go),
      stdout=out,
      stderr=subprocess.STDOUT,
    )
  try:
    _wait(lambda: os.path.exists(paused), holder, 'batch 3')
    second = tl.run_main(workdir, tl.STEPS)
    assert second.returncode == 1, tl.explain(second)
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(
      f'FAILED: workdir {workdir} is in use by host {socket.gethostname()} '
      f'pid {holder.pid} (started 20'
    ), last
    assert 'one run per workdir' in last
    print(f'\n[workdir lock] second run: {last}')
    info = workdir_lock.holder(workdir)
    assert info['pid'] == holder.pid and info['host'] == socket.gethostname()
    # The holder's log and checkpoints are intact: checkpoint 2 committed, steps 1, 2 logged once.
    _wait(lambda: 2 in tl.checkpoint_steps(workdir), holder, 'checkpoint 2')
    assert [r['step'] for r in tl.read_metrics(workdir) if 'loss' in r] == [1, 2]
    assert tl.checkpoint_steps(workdir) == [2]
    os.kill(holder.pid, signal.SIGKILL)  # kill -9 of the holder, mid-run
    holder.wait(timeout=60)
  finally:
    if holder.poll() is None:
      holder.kill()
  assert holder.returncode == -signal.SIGKILL
  again = tl.run_main(workdir, tl.STEPS)  # at once: no stale lock
  assert again.returncode == 0, tl.explain(again)
  assert 'Resumed from step' in again.stdout + again.stderr
  assert tl.checkpoint_steps(workdir)[-1] == 4
  assert sorted(tl.train_losses(workdir)) == [1, 2, 3, 4]
  assert workdir_lock.holder(workdir)['pid'] != holder.pid


def test_lock_in_this_process(tmp_path):
  """Re-acquiring in the holding process succeeds (POSIX locks are per process); release frees
  it; a filesystem-independent check of the recorded holder."""
  workdir = str(tmp_path)
  workdir_lock.acquire(workdir)
  try:
    workdir_lock.acquire(workdir)
    assert workdir_lock.holder(workdir)['pid'] == os.getpid()
  finally:
    workdir_lock.release(workdir)
  workdir_lock.release(workdir)  # no-op
