"""Injected faults in real training runs (`python -m dolg_jax.main`, tiny config, CPU subprocesses).

One trained workdir (train_testlib's 4-step reference run, checkpoints at steps 2 and 4) is shared
by the module and copied per test. Each test injects the real fault and checks the outcome and the
last line printed:
- a flipped bit in the newest step's array file: the step is moved aside, the run falls back to
  step 2 and reproduces the straight run's losses exactly;
- a changed config on resume: model change refused, recipe change refused unless allowed, the
  allowed change recorded in manifest.json;
- bad config values (zero / negative sizes, keep_checkpoints=0, a wrong type): one FAILED line,
  nothing written;
- a full filesystem (a 1 MiB tmpfs; skipped where mounting is not permitted): the save that hit
  it is named, no temporary files remain;
- a damaged ArrayRecord file: the file and `prepare --verify` are named;
- launch/local_multiprocess.sh forwards SIGTERM, waits for its processes and exits 75.
"""

import glob
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from dolg_jax.training import failures
from dolg_jax.training import manifest as manifest_lib
from dolg_jax.weights import checkpoint as ckpt_lib
from tests.helpers import train_testlib as tl

STEPS = tl.STEPS


@pytest.fixture(scope='module')
def trained():
  return tl.reference_run()


@pytest.fixture
def workdir(trained, tmp_path):
  dst = str(tmp_path / 'w')
  shutil.copytree(trained, dst)
  return dst


def _last_line(proc) -> str:
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  return lines[-1] if lines else ''


def _no_cascade(proc):
  text = proc.stdout + proc.stderr
  assert 'Event loop is closed' not in text and 'sys.meta_path is None' not in text
  assert text.count('Traceback (most recent call last)') == 0, tl.explain(proc)


def _largest_array_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*'))
  return max(files, key=os.path.getsize)


def test_bit_flip_falls_back_to_the_previous_step(trained, workdir):
  path = _largest_array_file(os.path.join(workdir, 'checkpoints', '4'))
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0x04]))
  proc = tl.run_main(workdir, STEPS)
  assert proc.returncode == 0, tl.explain(proc)
  assert f'Checkpoint step 4: {workdir}/checkpoints/4/state: 1 of ' in proc.stdout
  assert 'Fell back to checkpoint step 2' in proc.stdout
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4.corrupt-checksum'))
  assert tl.checkpoint_steps(workdir) == [2, 4]
  assert tl.train_losses(workdir) == tl.train_losses(trained)  # an exact replay from step 2


def test_changed_config_on_resume(workdir):
  shape = tl.run_main(workdir, STEPS, '--config.model.width=16')
  assert shape.returncode == 1
  assert _last_line(shape).startswith('FAILED: checkpoint step 4 in ')
  assert 'different model or data stream: model.width 8 -> 16' in _last_line(shape)
  _no_cascade(shape)
  recipe = tl.run_main(workdir, STEPS, '--config.train.base_learning_rate=0.1')
  assert recipe.returncode == 1
  assert 'different recipe: train.base_learning_rate 0.05 -> 0.1' in _last_line(recipe)
  assert '--config.train.allow_recipe_change_on_resume=True' in _last_line(recipe)
  assert tl.checkpoint_steps(workdir) == [2, 4]
  assert not [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if 'corrupt' in n]
  allowed = tl.run_main(
    workdir,
    '--config.train.num_train_steps=6',
    '--config.train.base_learning_rate=0.1',
    '--config.train.allow_recipe_change_on_resume=True',
  )
  assert allowed.returncode == 0, tl.explain(allowed)
  with open(os.path.join(workdir, 'manifest.json')) as f:
    resume = json.load(f)['resumes'][-1]
  assert resume['start_step'] == 4
  assert resume['config_changes'] == {
    'train.base_learning_rate': [0.05, 0.1],
    'train.num_train_steps': [4, 6],
  }


@pytest.mark.parametrize(
  'flag, expected',
  [
    (
      '--config.train.global_batch_size=0',
      'FAILED: config.train.global_batch_size=0: must be an integer >= 1',
    ),
    (
      '--config.train.global_batch_size=-8',
      'FAILED: config.train.global_batch_size=-8: must be an integer >= 1',
    ),
    (
      '--config.train.checkpoint_every_steps=0',
      'FAILED: config.train.checkpoint_every_steps=0: must be an integer >= 1',
    ),
    (
      '--config.train.keep_checkpoints=0',
      'FAILED: config.train.keep_checkpoints=0: must be an integer >= 1',
    ),
    (
      '--config.train.global_batch_size=eight',
      'FAILED: flag --config.train.global_batch_size=eight: invalid literal for int()',
    ),
  ],
)
def test_bad_config_fails_before_writing(tmp_path, flag, expected):
  workdir = str(tmp_path / 'w')
  proc = tl.run_main(workdir, STEPS, flag, timeout=300)
  assert proc.returncode == 1 and _last_line(proc).startswith(expected), tl.explain(proc)
  _no_cascade(proc)
  assert not os.path.exists(workdir)  # no manifest, no checkpoints dir


def test_full_filesystem(tmp_path):
  tl.ensure_fixture()
  mount = str(tmp_path / 'tiny_fs')
  os.makedirs(mount)
  made = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', mount], capture_output=True, text=True
  )
  if made.returncode:
    pytest.skip(
      f'cannot mount a 1 MiB tmpfs to fill (needs root / CAP_SYS_ADMIN): {made.stderr.strip()}'
    )
  try:
    workdir = os.path.join(mount, 'w')
    proc = tl.run_main(workdir, STEPS)
    assert proc.returncode == 1
    last = _last_line(proc)
    assert last.startswith(
      f'FAILED: writing checkpoint step 2 to {workdir}/checkpoints failed: No space left on device'
    ), tl.explain(proc)
    assert 'Free space on the filesystem holding' in last
    _no_cascade(proc)
    leftovers = [
      os.path.join(r, n)
      for r, ds, fs in os.walk(workdir)
      for n in ds + fs
      if n.endswith('.tmp') or 'orbax-checkpoint-tmp' in n
    ]
    assert not leftovers
  finally:
    subprocess.run(['umount', mount], check=False)


def test_manifest_write_failure_leaves_no_temporary_file(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(json, 'dump', full)
  with pytest.raises(OSError, match='writing .*manifest.json failed: No space left') as e:
    manifest_lib.write_manifest(str(tmp_path), {'a': 1})
  assert failures.is_disk_full(e.value)
  assert os.listdir(tmp_path) == []


def test_damaged_array_record_during_training(tmp_path):
  data_dir = str(tmp_path / 'data')
  shutil.copytree(tl.ensure_fixture(), data_dir)
  path = glob.glob(os.path.join(data_dir, 'gldv2', 'clean', '*', 'gldv2-train.array_record-*'))[0]
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b'\0' * 64)
  proc = tl.run_main(str(tmp_path / 'w'), STEPS, f'--config.data.data_dir={data_dir}')
  assert proc.returncode == 1
  last = _last_line(proc)
  assert last.startswith('FAILED: reading example ') and path in last, tl.explain(proc)
  assert 'Corrupted Riegeli' in last
  assert (
    f'python -m dolg_jax.data.prepare --verify --dataset=gldv2/clean --data_dir={data_dir}' in last
  )
  _no_cascade(proc)


FAKE_PYTHON = r'''#!/usr/bin/env bash
for a in "$@"; do case $a in --process_id=*) id=${a#*=};; esac; done
trap 'sleep 1; echo "$id" >> "$FAKE_LOG"; exit 75' TERM
echo started >> "$FAKE_LOG.started"
sleep 60 & wait $!
exit 0
'''


def test_local_launcher_forwards_sigterm_and_waits(tmp_path):
  fake = tmp_path / 'python'
  fake.write_text(FAKE_PYTHON)
  fake.chmod(0o755)
  log = str(tmp_path / 'exited')
  env = dict(os.environ, PYTHON=str(fake), FAKE_LOG=log)
  proc = subprocess.Popen(
    [
      'bash',
      os.path.join(tl.REPO, 'launch', 'local_multiprocess.sh'),
      '3',
      'configs/tiny.py',
      str(tmp_path / 'w'),
    ],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 30
  while time.time() < deadline:
    if os.path.exists(log + '.started') and len(open(log + '.started').readlines()) == 3:
      break
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == failures.EXIT_PREEMPTED
  with open(log) as f:  # every process had exited (1 s after its SIGTERM) before the launcher
    assert sorted(f.read().split()) == ['0', '1', '2']


def test_eval_loader_verifies_the_model_arrays(workdir):
  record = os.path.join(workdir, 'checkpoints', '4', 'record', 'process_0-of-1.json')
  with open(record) as f:
    data = json.load(f)
  key = ".params['model']['fc']['kernel']"
  assert key in data['state_digests']
  data['state_digests'][key] = '0' * 16  # as if the array's bytes had changed
  with open(record, 'w') as f:
    json.dump(data, f)
  with pytest.raises(
    ckpt_lib.CheckpointCorruptError,
    match=r"1 model arrays differ .*"
    r"\['fc'\]\['kernel'\]",
  ):
    ckpt_lib.load_variables(workdir)
  assert ckpt_lib.load_variables(os.path.join(workdir, 'checkpoints', '2'))['params']


def test_non_finite_advice_right_after_a_restore():
  from dolg_jax.training import loop

  nan = [{'loss': float('nan'), 'grad_norm': 1.0, 'param_norm': 1.0, 'nonfinite_state': 0.0}]
  with pytest.raises(loop.NonFiniteLossError) as fresh:
    loop._check_finite(nan, 7, '/w', last_saved=6, restored=None)
  assert 'Lower config.train.base_learning_rate' in str(fresh.value)
  with pytest.raises(loop.NonFiniteLossError) as resumed:
    loop._check_finite(nan, 5, '/w', last_saved=4, restored=4)
  msg = str(resumed.value)
  assert 'learning_rate' not in msg and 'within 1 step(s) of resuming from step 4' in msg
  assert 'prepare --verify' in msg
  with pytest.raises(loop.NonFiniteLossError) as later:  # saved since the restore: usual advice
    loop._check_finite(nan, 9, '/w', last_saved=8, restored=4)
  assert 'Lower config.train.base_learning_rate' in str(later.value)


def test_closing_line_classification():
  def raise_(e):
    raise e

  try:
    raise_(ValueError('config.x=1: bad'))  # raised in this package's tests: not dolg_jax code
  except ValueError as e:
    unexpected = e
  assert failures.describe(unexpected, '/w').startswith('FAILED: unexpected ValueError: config.x=1')
  from dolg_jax import config_rules

  try:
    config_rules.fail('train.x', 0, 'must be >= 1')
  except ValueError as e:
    ours = e
  assert failures.is_expected(ours)
  assert failures.describe(ours, '/w') == 'FAILED: config.train.x=0: must be >= 1'
  full = OSError(28, 'No space left on device')
  assert 'No space left on device. Free space on the filesystem holding /w' in failures.describe(
    full, '/w'
  )


@pytest.mark.parametrize('python_rc, requeued', [(75, True), (0, False), (1, False)])
def test_slurm_script_requeues_a_preempted_job(tmp_path, python_rc, requeued):
  """launch/slurm_gpu.sbatch with stand-ins for srun, scontrol and python on PATH."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  scripts = {
    'srun': '#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n',
    'scontrol': '#!/usr/bin/env bash\necho "$@" >> "$FAKE_LOG"\n',
    'python': f'#!/usr/bin/env bash\necho "python $*" >> "$FAKE_LOG"\nexit {python_rc}\n',
  }
  for name, text in scripts.items():
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / 'calls'
  env = dict(
    os.environ,
    PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
    FAKE_LOG=str(log),
    SLURM_JOB_ID='4242',
    SLURM_SUBMIT_DIR=tl.REPO,
  )
  proc = subprocess.run(
    [
      'bash',
      os.path.join(tl.REPO, 'launch', 'slurm_gpu.sbatch'),
      'configs/tiny.py',
      str(tmp_path / 'w'),
      '--config.seed=1',
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=30,
  )
  assert proc.returncode == python_rc, proc.stderr
  calls = log.read_text().splitlines()
  assert calls[0] == (
    f'python -m dolg_jax.main --config=configs/tiny.py --workdir={tmp_path / "w"} --config.seed=1'
  )
  assert (calls[1:] == ['requeue 4242']) == requeued, calls
