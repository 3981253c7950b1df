"""The real launch/slurm_gpu.sbatch on a throwaway single-node SLURM cluster (2 CPU tasks, tiny).

One cluster per test session (tests/helpers/slurm_cluster.py); each test submits the unmodified
script with `sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1` (no GPUs here) and
checks what a user on a GPU pod relies on:
- a run to the end: both tasks train one program (one metrics.jsonl, one checkpoint per interval,
  the loss trajectory of the single-process run), job COMPLETED 0:0;
- preemption (`scancel --signal=TERM`: SIGTERM to every task): checkpoint saved, every task exits
  75, the script requeues the job, the requeued job resumes and ends with the uninterrupted run's
  losses;
- a dead task (`kill -9` of one task's Python): srun's --kill-on-bad-exit ends the job FAILED
  within DEAD_TASK_BOUND_S, the last checkpoint is intact and resubmitting resumes from it;
- a time limit (`--time=2 --signal=TERM@60`): SIGTERM before the limit, checkpoint saved, the job
  requeues itself (the documented way to continue) and the requeued job resumes from that step
  (then the test cancels it).

The job finds `python` on PATH: the tests put tests/helpers/python_shim.py's shim first, which
runs dolg_jax.main under the training tests' wrapper (train_testlib.WRAPPER: DOLG_TEST_SLOW_AFTER
slows batches to leave a window for signals) with this interpreter. Skipped, with the reason,
where SLURM/munge are not installed or the tests do not run as root.
"""

import json
import os
import signal
import tempfile
import time

import numpy as np
import pytest

from tests.helpers import train_testlib as tl
from tests.helpers import python_shim
from tests.helpers import slurm_cluster

pytestmark = [pytest.mark.multiprocess, pytest.mark.slurm]

SCRIPT = os.path.join(tl.REPO, 'launch', 'slurm_gpu.sbatch')
STEPS = int(tl.STEPS.split('=')[1])  # 4: checkpoints at steps 2 and 4.
# kill -9 of one task -> job in a final state: srun's --kill-on-bad-exit stops the other task at
# once; the bound leaves room for a loaded 2-core machine.
DEAD_TASK_BOUND_S = 30
# The run's flags after CONFIG and WORKDIR (BASE_FLAGS less its --config).
FLAGS = tuple(f for f in tl.BASE_FLAGS if not f.startswith('--config='))
# Every task checks for SIGTERM after every step (the default 10 is longer than these runs).
SYNC = '--config.train.preemption_sync_every_steps=1'

_reason = slurm_cluster.unavailable_reason()
if _reason:
  pytestmark.append(pytest.mark.skip(reason=f'no local SLURM cluster: {_reason}'))


@pytest.fixture(scope='session')
def cluster():
  tl.ensure_fixture()
  os.makedirs(tl.ROOT, exist_ok=True)
  c = slurm_cluster.Cluster(tempfile.mkdtemp(prefix='slurm_', dir=tl.ROOT))
  try:
    c.start()
    yield c
  finally:
    c.stop()


@pytest.fixture(scope='session')
def job_env(cluster):
  """The submit environment (sbatch exports it to the job): CPU JAX, the shared compilation
  cache, and `python` = the shim running this interpreter."""
  shim_dir = os.path.dirname(python_shim.write(os.path.join(cluster.root, 'bin'), tl.WRAPPER))
  e = tl.env()
  e['PATH'] = shim_dir + os.pathsep + e.get('PATH', '')
  return e


def submit(cluster, job_env, workdir, *sbatch_args, steps=STEPS, flags=(), **env_extra) -> str:
  """sbatch of the real script: 2 CPU tasks on the node, no GPU request (the script's
  `#SBATCH --gpus-per-node=8` overridden on the command line, as its header documents)."""
  os.makedirs(workdir, exist_ok=True)
  env = dict(job_env, **{k: str(v) for k, v in env_extra.items()})
  return cluster.sbatch(
    '--gpus-per-node=0',
    '--ntasks-per-node=2',
    '--cpus-per-task=1',
    '--time=10',
    f'--output={workdir}/slurm-%j.out',
    *sbatch_args,
    SCRIPT,
    'configs/tiny.py',
    workdir,
    *FLAGS,
    f'--config.train.num_train_steps={steps}',
    SYNC,
    *flags,
    env=env,
    cwd=tl.REPO,
  )


def job_log(workdir, job_id) -> str:
  path = os.path.join(workdir, f'slurm-{job_id}.out')
  with open(path, errors='replace') as f:
    return f.read()


def explain(cluster, workdir, job_id) -> str:
  try:
    log = job_log(workdir, job_id)[-8000:]
  except OSError as e:
    log = str(e)
  return f'{cluster.job(job_id)}\n--- job log ---\n{log}\n{cluster.logs()}'


def wait_for_step(cluster, job_id, workdir, step, timeout=400):
  deadline = time.time() + timeout
  while not any(r['step'] >= step for r in tl.read_metrics(workdir)):
    if time.time() > deadline or cluster.job(job_id).state in slurm_cluster.FINAL_STATES:
      raise AssertionError(f'step {step} not logged\n{explain(cluster, workdir, job_id)}')
    time.sleep(0.2)


def assert_same_losses(losses, reference, rtol=0.0):
  """Same steps and losses (default: bit for bit)."""
  assert sorted(losses) == sorted(reference)
  np.testing.assert_allclose(
    [losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)], rtol=rtol
  )


TIMES: dict[str, float] = {}


@pytest.fixture(scope='session')
def uninterrupted(cluster, job_env):
  """A 2-task job run to the end (scenario 1 and the reference of the interrupted ones)."""
  workdir = os.path.join(cluster.root, 'to_the_end')
  t0 = time.time()
  job_id = submit(cluster, job_env, workdir)
  job = cluster.wait_final(job_id, 600)
  TIMES['to_the_end'] = time.time() - t0
  return workdir, job_id, job


def test_run_to_the_end(cluster, uninterrupted):
  workdir, job_id, job = uninterrupted
  assert (job.state, job.exit_code, job.restarts) == ('COMPLETED', '0:0', 0), explain(
    cluster, workdir, job_id
  )
  records = tl.read_metrics(workdir)
  # One metrics.jsonl written once per step (by process 0 only), both tasks in one program: the
  # single-process run's trajectory with the same global batch, up to float summation order.
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))
  assert_same_losses(tl.train_losses(workdir), tl.train_losses(tl.reference_run()), rtol=2e-4)
  assert tl.checkpoint_steps(workdir) == [2, 4]  # Every 2 steps.
  iter_files = sorted(os.listdir(os.path.join(workdir, 'checkpoints', str(STEPS), 'data_iter')))
  assert [n for n in iter_files if n.endswith('.json')] == [
    'process_0-of-2.json',
    'process_1-of-2.json',
  ]
  with open(os.path.join(workdir, 'manifest.json')) as f:
    assert json.load(f)['devices']['process_count'] == 2
  print(f'\n[slurm] run to the end: {TIMES["to_the_end"]:.1f} s, {job.state} {job.exit_code}')


def test_preemption_requeues_and_resumes_exactly(cluster, job_env, uninterrupted):
  reference = tl.train_losses(uninterrupted[0])
  workdir = os.path.join(cluster.root, 'preempted')
  t0 = time.time()
  job_id = submit(cluster, job_env, workdir, DOLG_TEST_SLOW_AFTER=1)
  wait_for_step(cluster, job_id, workdir, 1)
  # SIGTERM to every task of the job's steps (not to the batch script), as a preemption does.
  cluster.cmd('scancel', '--signal=TERM', job_id)
  requeued = cluster.wait(job_id, lambda j: j.restarts >= 1, 300, 'a requeue')
  job = cluster.wait_final(job_id, 600)
  TIMES['preemption'] = time.time() - t0
  log = job_log(workdir, job_id)
  assert (job.state, job.exit_code, job.restarts) == ('COMPLETED', '0:0', 1), explain(
    cluster, workdir, job_id
  )
  # Both tasks stopped at the same step (printed by each).
  saved = sorted(
    {
      int(l.split('checkpoint of step ')[1].split()[0])
      for l in log.splitlines()
      if l.startswith('Preempted: checkpoint of step')
    }
  )
  assert len(saved) == 1 and 1 < saved[0] < STEPS, log[-6000:]
  assert f'requeueing job {job_id}' in log
  assert f'Resumed from step {saved[0]}' in log
  # Every step logged once (the stop step was saved and logged, the requeued job went on from
  # there) and the trajectory is the uninterrupted run's, bit for bit.
  assert [r['step'] for r in tl.read_metrics(workdir)] == list(range(1, STEPS + 1))
  assert_same_losses(tl.train_losses(workdir), reference)
  print(
    f'\n[slurm] preemption: {TIMES["preemption"]:.1f} s, saved step {saved[0]}, requeued '
    f'({requeued.state}), final {job.state} {job.exit_code} restarts {job.restarts}'
  )


def test_dead_task_ends_the_job_and_a_rerun_resumes(cluster, job_env, uninterrupted):
  reference = tl.train_losses(uninterrupted[0])
  workdir = os.path.join(cluster.root, 'dead_task')
  t0 = time.time()
  job_id = submit(cluster, job_env, workdir, DOLG_TEST_SLOW_AFTER=2)
  # Checkpoint 2 written (committed: its directory renamed), 4 not yet.
  wait_for_step(cluster, job_id, workdir, 3)
  deadline = time.time() + 60
  while tl.checkpoint_steps(workdir) != [2]:
    assert time.time() < deadline, tl.checkpoint_steps(workdir)
    time.sleep(0.1)
  pids = cluster.task_pids(job_id)
  assert sorted(pids) == [0, 1], pids
  os.kill(pids[1], signal.SIGKILL)
  killed = time.time()
  job = cluster.wait_final(job_id, DEAD_TASK_BOUND_S + 60)
  down = time.time() - killed
  assert job.state == 'FAILED' and job.exit_code != '0:0', explain(cluster, workdir, job_id)
  assert down <= DEAD_TASK_BOUND_S, f'job took {down:.1f} s to end after a task died'
  assert cluster.task_pids(job_id) == {}, 'a task outlived its job'
  assert tl.checkpoint_steps(workdir) == [2]
  # Resubmitting the same command resumes from the intact checkpoint and ends on the
  # uninterrupted trajectory.
  rerun = submit(cluster, job_env, workdir)
  rejob = cluster.wait_final(rerun, 600)
  TIMES['dead_task'] = time.time() - t0
  assert (rejob.state, rejob.exit_code) == ('COMPLETED', '0:0'), explain(cluster, workdir, rerun)
  assert 'Resumed from step 2' in job_log(workdir, rerun)
  assert_same_losses(tl.train_losses(workdir), reference)
  print(
    f'\n[slurm] dead task: job {job.state} {job.exit_code} {down:.1f} s after kill -9; '
    f'rerun {rejob.state} {rejob.exit_code}; {TIMES["dead_task"]:.1f} s in all'
  )


def test_time_limit_saves_and_requeues(cluster, job_env):
  workdir = os.path.join(cluster.root, 'time_limit')
  t0 = time.time()
  # 2 minutes with SIGTERM 60 s ahead (slurmctld checks every 30 s: it comes 60-90 s in); the
  # slowed run could not finish in time. Only the stop step is checkpointed.
  job_id = submit(
    cluster,
    job_env,
    workdir,
    '--time=2',
    '--signal=TERM@60',
    steps=1000,
    flags=('--config.train.checkpoint_every_steps=1000',),
    DOLG_TEST_SLOW_AFTER=0,
  )
  requeued = cluster.wait(job_id, lambda j: j.restarts >= 1, 240, 'a requeue')
  saved = tl.checkpoint_steps(workdir)
  assert len(saved) == 1, (saved, explain(cluster, workdir, job_id))
  # The requeued job (same command, a fresh time limit) resumes from the saved step.
  deadline = time.time() + 300
  while not any(r['step'] > saved[0] for r in tl.read_metrics(workdir)):
    assert time.time() < deadline, explain(cluster, workdir, job_id)
    assert cluster.job(job_id).state not in slurm_cluster.FINAL_STATES, explain(
      cluster, workdir, job_id
    )
    time.sleep(0.5)
  TIMES['time_limit'] = time.time() - t0
  log = job_log(workdir, job_id)
  assert f'Preempted: checkpoint of step {saved[0]} saved' in log
  assert f'requeueing job {job_id}' in log
  assert f'Resumed from step {saved[0]}' in log
  steps = [r['step'] for r in tl.read_metrics(workdir)]
  assert steps == list(range(1, len(steps) + 1)), 'a step was lost or repeated'
  cluster.cmd('scancel', job_id)
  job = cluster.wait_final(job_id, 120)
  print(
    f'\n[slurm] time limit: requeued after saving step {saved[0]} ({requeued.state}), '
    f'resumed in {TIMES["time_limit"]:.1f} s; cancelled: {job.state} {job.exit_code}'
  )
