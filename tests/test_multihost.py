"""Distributed training equals single-device training (tiny config, CPU, subprocesses).

- one process with 8 fake CPU devices on a (data 4, model 2) mesh: the batch split over `data`,
  the margin head's classes over `model`;
- two processes (jax.distributed on 127.0.0.1, gloo collectives), one device each, each reading
  its half of every global batch;
both give the loss trajectory of the single-device run with the same global batch (global
BatchNorm statistics), up to float summation order.
"""

import json
import os
import socket

import numpy as np
import pytest

from tests.helpers import train_testlib as tl

STEPS = tl.STEPS


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope='module')
def reference():
  losses = tl.train_losses(tl.reference_run())
  assert sorted(losses) == [1, 2, 3, 4]
  return losses


def _assert_same_trajectory(losses, reference):
  assert sorted(losses) == sorted(reference)
  np.testing.assert_allclose(
    [losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)], rtol=2e-4
  )


def test_eight_devices_data_and_model_axes(reference, tmp_path):
  workdir = str(tmp_path)
  proc = tl.run_main(
    workdir,
    STEPS,
    '--config.mesh.data=4',
    '--config.mesh.model=2',
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
  )
  assert proc.returncode == 0, tl.explain(proc)
  with open(os.path.join(workdir, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['devices']['device_count'] == 8
  assert manifest['mesh'] == {'data': 4, 'model': 2}
  _assert_same_trajectory(tl.train_losses(workdir), reference)


def test_two_processes_match_single_process(reference, tmp_path):
  workdir = str(tmp_path / 'workdir')
  address = f'127.0.0.1:{_free_port()}'
  logs = [str(tmp_path / f'process_{i}.log') for i in range(2)]
  procs = [
    tl.start_main(
      workdir,
      STEPS,
      f'--coordinator_address={address}',
      '--num_processes=2',
      f'--process_id={i}',
      log_file=logs[i],
    )
    for i in range(2)
  ]
  try:
    for p in procs:
      p.wait(timeout=500)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    with open(log) as f:
      assert p.returncode == 0, f'rc={p.returncode}\n{f.read()[-6000:]}'
  with open(os.path.join(workdir, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['devices']['process_count'] == 2
  assert tl.checkpoint_steps(workdir) == [2, 4]
  iter_files = sorted(
    n
    for n in os.listdir(os.path.join(workdir, 'checkpoints', '4', 'data_iter'))
    if n.endswith('.json')
  )
  assert iter_files == ['process_0-of-2.json', 'process_1-of-2.json']
  _assert_same_trajectory(tl.train_losses(workdir), reference)
