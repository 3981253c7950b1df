"""End-to-end training runs of `python -m dolg_jax.main` on the tiny config (CPU, subprocesses).

- a straight 4-step run: metrics.jsonl, manifest.json, TensorBoard events, keep-N checkpoints,
  load_variables for the eval binary;
- exact resume: killed (SIGKILL) after step 3 with a checkpoint at step 2, then rerun: the
  losses of all 4 steps equal the straight run's exactly;
- SIGTERM: saves a checkpoint and exits 75 (preempted); the rerun resumes from it, matching
  exactly;
- a NaN/inf loss stops with a clear message and leaves the last good checkpoint intact.
"""

import json
import os
import signal

import numpy as np
import pytest

from dolg_jax.training import failures
from dolg_jax.weights import checkpoint as ckpt_lib
from tests.helpers import train_testlib as tl

STEPS = tl.STEPS


@pytest.fixture(scope='module')
def straight():
  return tl.reference_run(), tl.reference_stdout()


def test_straight_run_outputs(straight):
  workdir, stdout = straight
  records = tl.read_metrics(workdir)
  # The public contract: one object per logged step, each with step, loss and learning_rate
  # (validation results join the line of their step).
  assert all('loss' in r and 'learning_rate' in r for r in records), records
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  val = [r for r in tl.read_metrics(workdir) if 'val_accuracy' in r]
  assert len(val) == 1 and val[0]['step'] == 4 and val[0]['val_examples'] == 7  # fixture split
  assert 0.0 <= val[0]['val_accuracy'] <= 1.0 and np.isfinite(val[0]['val_loss'])
  for key in (
    'loss',
    'accuracy',
    'learning_rate',
    'grad_norm',
    'images_per_sec',
    'epoch',
    'step_time_s',
    'eta_s',
    'param_norm',
  ):
    assert all(np.isfinite(r[key]) for r in records), key
  # Schedule: tiny = 44 examples / batch 8 = 5 steps per epoch, 1 warm-up epoch capped at
  # total - 1 = 3 steps in this 4-step run, peak 0.05 * 8 / 128, from warmup_factor 0.1 x peak.
  peak, f = 0.05 * 8 / 128, 0.1
  lrs = [r['learning_rate'] for r in records]
  np.testing.assert_allclose(
    lrs[:3], [peak * (f + (1 - f) * k / 3) for k in range(1, 4)], rtol=1e-6
  )
  assert lrs[3] == pytest.approx(peak, rel=1e-6)  # First cosine step (t = 0).
  assert 'step 4/4' in stdout and 'ETA' in stdout
  assert tl.checkpoint_steps(workdir) == [2, 4]  # every 2 steps, keep 2
  assert any(n.startswith('events.out.tfevents') for n in os.listdir(f'{workdir}/tensorboard'))

  with open(f'{workdir}/manifest.json') as f:
    manifest = json.load(f)
  assert manifest['config']['train']['num_train_steps'] == 4
  assert manifest['devices']['device_count'] == 1 and manifest['devices']['process_count'] == 1
  assert {'commit', 'dirty'} <= set(manifest['git'])
  assert manifest['packages']['jax'] and manifest['seeds']['seed'] == 0
  ds = manifest['dataset']
  assert ds['name'] == 'gldv2/clean' and ds['version'] == '1.0.0'
  assert ds['splits'] == {'train': 44, 'validation': 7} and len(ds['fingerprint']['sha256']) == 64


def test_load_variables_for_eval(straight):
  workdir, _ = straight
  latest = ckpt_lib.load_variables(workdir)
  step2 = ckpt_lib.load_variables(os.path.join(workdir, 'checkpoints', '2'))
  assert set(latest) == {'params', 'batch_stats'}
  assert 'globalmodel' in latest['params'] and 'fc' in latest['params']
  assert 'head' not in latest['params']
  k4 = latest['params']['fc']['kernel']
  k2 = step2['params']['fc']['kernel']
  assert isinstance(k4, np.ndarray) and k4.shape == (64, 16)
  assert not np.array_equal(k2, k4)


def test_exact_resume_after_kill(straight, tmp_path):
  ref = tl.train_losses(straight[0])
  workdir = str(tmp_path)
  # Synchronous saves: the step-2 checkpoint is complete when the kill comes (an async save cut
  # short would be discarded on restart, and the rerun would start from scratch).
  killed = tl.run_main(
    workdir, STEPS, '--config.train.async_checkpointing=False', wrapped=True, DOLG_TEST_KILL_AT=4
  )
  assert killed.returncode == -signal.SIGKILL, tl.explain(killed)
  assert sorted(tl.train_losses(workdir)) == [1, 2, 3]
  assert tl.checkpoint_steps(workdir) == [2]
  resumed = tl.run_main(workdir, STEPS)
  assert resumed.returncode == 0, tl.explain(resumed)
  assert 'Resumed from step 2' in resumed.stderr
  assert tl.train_losses(workdir) == ref  # Identical floats, step for step.


def test_sigterm_saves_and_resumes(straight, tmp_path):
  ref = tl.train_losses(straight[0])
  workdir = str(tmp_path)
  proc = tl.start_main(
    workdir,
    STEPS,
    '--config.train.checkpoint_every_steps=100',
    wrapped=True,
    DOLG_TEST_SLOW_AFTER=1,
  )
  tl.sigterm_when_logged(proc, workdir, 1)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == failures.EXIT_PREEMPTED == 75, f'{out}\n{err}'  # scheduler: requeue
  assert 'Preempted: checkpoint of step' in out
  saved = tl.checkpoint_steps(workdir)
  assert len(saved) == 1 and 1 <= saved[0] < 4, saved
  assert max(tl.train_losses(workdir)) == saved[0]
  resumed = tl.run_main(workdir, STEPS)
  assert resumed.returncode == 0, tl.explain(resumed)
  assert f'Resumed from step {saved[0]}' in resumed.stderr
  assert tl.train_losses(workdir) == ref


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  tl.ensure_fixture()
  workdir = str(tmp_path)
  proc = tl.run_main(
    workdir,
    STEPS,
    '--config.train.checkpoint_every_steps=1',
    '--config.train.base_learning_rate=1e10',
  )
  assert proc.returncode != 0
  assert 'Non-finite training values at step' in proc.stderr, tl.explain(proc)
  steps = tl.checkpoint_steps(workdir)
  assert steps and max(steps) < 4
  assert f'last good checkpoint: step {max(steps)}' in proc.stderr
  variables = ckpt_lib.load_variables(workdir)
  leaves = [np.asarray(x) for x in _leaves(variables)]
  assert all(np.all(np.isfinite(x)) for x in leaves)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree
