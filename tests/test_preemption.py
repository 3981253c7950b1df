"""SIGTERM before the training loop starts (imports, restore, compilation) is not lost: the loop's
handler sees it and the run stops after its first step with a checkpoint (exit code 75).
With two processes the stopping step is agreed through JAX's coordination service (preemption sync
point), without a device collective, also when only one process gets the signal."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from dolg_jax.training import preemption
from tests.helpers import train_testlib as tl


def test_sigterm_while_starting_reaches_the_loop():
  previous = signal.getsignal(signal.SIGTERM)
  try:
    with preemption.PreemptionHandler() as fresh:
      assert not fresh.should_stop(1)  # No signal yet: training goes on.
    preemption.catch_early_sigterm()
    os.kill(os.getpid(), signal.SIGTERM)  # Arrives while the run is still starting.
    with preemption.PreemptionHandler() as handler:
      assert handler.should_stop(1)
  finally:
    preemption._EARLY.clear()
    signal.signal(signal.SIGTERM, previous)


# Two processes (jax.distributed on 127.0.0.1, CPU) run PreemptionHandler's loop without a model:
# a step is a short wait. process_allgather is replaced by an error, so agreement through a
# device collective would fail the run.
_TWO_PROCESS_SCRIPT = r'''
import os, signal, sys, time
import jax
from jax.experimental import multihost_utils
from dolg_jax.training import preemption
pid, address, marker = int(sys.argv[1]), sys.argv[2], sys.argv[3]
preemption.catch_early_sigterm()
if os.environ.get('EARLY_SIGTERM') == str(pid):   # while the run is starting
  os.kill(os.getpid(), signal.SIGTERM)
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(address, 2, pid)
def no_collective(*a, **k):
  raise AssertionError('preemption agreement used a device collective')
multihost_utils.process_allgather = no_collective
with preemption.PreemptionHandler(sync_every=1) as handler:
  assert preemption.coordination_service_agreement()
  open(marker, 'w').close()
  for step in range(1, 3000):
    if handler.should_stop(step):
      print(f'stopped at {step}', flush=True)
      break
    time.sleep(0.01)
  else:
    print('never stopped', flush=True)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _run_two(tmp_path, early=None):
  script = tmp_path / 'loop.py'
  script.write_text(_TWO_PROCESS_SCRIPT)
  address = f'127.0.0.1:{_free_port()}'
  markers = [str(tmp_path / f'ready_{i}') for i in range(2)]
  env = tl.env(**({'EARLY_SIGTERM': early} if early is not None else {}))
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(i), address, markers[i]],
      cwd=tl.REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(2)
  ]
  try:
    if early is None:
      deadline = time.time() + 120
      while not all(os.path.exists(m) for m in markers):  # both in the loop
        assert time.time() < deadline and all(p.poll() is None for p in procs), 'not started'
        time.sleep(0.05)
      procs[1].send_signal(signal.SIGTERM)  # one process only
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  stops = [re.findall(r'^stopped at (\d+)$', out, re.M) for out in outs]
  assert all(len(s) == 1 for s in stops), outs
  return [int(s[0]) for s in stops]


@pytest.mark.multiprocess
def test_two_processes_agree_through_the_coordination_service(tmp_path):
  """SIGTERM to process 1 only: both stop at the same step, with no device collective."""
  first, second = _run_two(tmp_path)
  assert first == second > 1


@pytest.mark.multiprocess
def test_two_processes_early_sigterm_reaches_the_other_process(tmp_path):
  """SIGTERM to process 1 before jax.distributed.initialize: handed to the notifier on entering
  the loop, so both processes stop at the same step."""
  first, second = _run_two(tmp_path, early='1')
  assert first == second >= 1
