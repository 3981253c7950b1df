"""Fine-tuning: `train.init_checkpoint` from a seeded official-layout .pyth on a folder dataset, the
fine-tuning fields (lr multipliers, frozen BatchNorm), the architecture check and exact resume.

Two train-step programs, each compiled once (train_testlib's persistent cache; the runs of one
differ only in host-side flags: steps, the init checkpoint): FROZEN (BatchNorm frozen, learning
rate x 0 for the model and the head: every variable stays as loaded) for the start checks, and
TRAINING (model lr x 0.5, head lr x 2, BatchNorm training) for the resumed fine-tune.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import optax
import pytest
import torch

from configs import tiny
from dolg_jax import models
from dolg_jax import pretrained
from dolg_jax import sharding as shd
from dolg_jax.data import folder
from dolg_jax.training import init_checkpoint
from dolg_jax.training import loop
from dolg_jax.training import state as state_lib
from dolg_jax.weights import checkpoint as ckpt_layout
from dolg_jax.weights import released
from tests.helpers import folder_images
from tests.helpers import torch_reference as ref_lib
from tests.helpers import train_testlib
from tests.helpers.paths import REPO

NUM_CLASSES = 4
# The official layout at width 8 (local and global widths 16 x 8, no multi-atrous, learnable p).
ARCH = {'use_multi_atrous': False, 'gem_p_learnable': True, 'local_dim': 128, 'global_dim': 128}
FROZEN = (
  '--config.train.freeze_bn=True',
  '--config.train.model_lr_multiplier=0.0',
  '--config.train.head_lr_multiplier=0.0',
)
TRAINING = ('--config.train.model_lr_multiplier=0.5', '--config.train.head_lr_multiplier=2.0')
HEAD_REINIT = 'has a margin head of 7 classes, the dataset 4: the margin head is initialised'


def _flags(data_dir):
  return (
    '--config=configs/tiny.py',
    '--config.data.make_fixture=False',
    '--config.data.dataset=folder/ft',
    f'--config.data.data_dir={data_dir}',
    '--config.train.log_every_steps=1',
    '--config.train.eval_every_steps=0',
    '--config.train.checkpoint_every_steps=1',
    '--config.train.keep_checkpoints=4',
    *(f'--config.model.{k}={v}' for k, v in ARCH.items()),
  )


def _model_config():
  m = tiny.get_config().model
  m.update(ARCH)
  return m


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('finetune')
  folder_images.write_classes(str(root / 'photos'), {f'class {k}': 5 for k in range(NUM_CLASSES)})
  data_dir = str(root / 'tfds')
  folder.prepare('folder/ft', str(root / 'photos'), data_dir)
  torch.manual_seed(1)
  ref = ref_lib.randomize_(
    ref_lib.DOLGReference(
      width=8,
      stage_depths=(1, 1, 1, 1),
      with_aspp=False,
      gem_p=2.6,
      num_classes=NUM_CLASSES,
      embedding_dim=16,
    ),
    seed=3,
    calib_size=64,
  )
  with torch.no_grad():
    ref.desc_cls.t.fill_(0.25)
  sd = ref.state_dict()
  pyth = str(root / 'tiny_dolg.pyth')
  torch.save({'epoch': 3, 'model_state': sd, 'optimizer_state': {}}, pyth)
  sd7 = dict(sd, **{'desc_cls.weight': torch.randn(7, 16)})
  pyth7 = str(root / 'tiny_dolg_7classes.pyth')
  torch.save({'epoch': 3, 'model_state': sd7}, pyth7)
  return {'root': root, 'data_dir': data_dir, 'pyth': pyth, 'pyth7': pyth7, 'sd': sd}


def _cmd(env, workdir, *flags, wrapped=False):
  head = (
    [sys.executable, '-c', train_testlib.WRAPPER]
    if wrapped
    else [sys.executable, '-m', 'dolg_jax.main']
  )
  return head + [f'--workdir={workdir}', *_flags(env['data_dir']), *flags]


def _run(env, workdir, *flags, wrapped=False, **extra):
  return subprocess.run(
    _cmd(env, workdir, *flags, wrapped=wrapped),
    cwd=REPO,
    env=train_testlib.env(**extra),
    capture_output=True,
    text=True,
    timeout=600,
  )


def _start(env, name, *flags):
  workdir = str(env['root'] / name)
  proc = _run(env, workdir, *FROZEN, *flags)
  assert proc.returncode == 0, train_testlib.explain(proc)
  return {
    'workdir': workdir,
    'proc': proc,
    'losses': train_testlib.train_losses(workdir),
    'metrics': train_testlib.read_metrics(workdir),
  }


@pytest.fixture(scope='module')
def finetuned(env):
  return _start(
    env,
    'finetuned',
    f'--config.train.init_checkpoint={env["pyth"]}',
    '--config.train.num_train_steps=1',
  )


@pytest.fixture(scope='module')
def random_start(env):
  return _start(env, 'random', '--config.train.num_train_steps=1')


@pytest.fixture(scope='module')
def other_classes(env):
  # The init checkpoint takes precedence: this backbone is never resolved (it does not exist).
  return _start(
    env,
    'other_classes',
    f'--config.train.init_checkpoint={env["pyth7"]}',
    '--config.train.backbone_init=/nonexistent/R-101-1x64d_dds_8gpu.pyth',
    '--config.train.num_train_steps=1',
  )


def _state(workdir, step):
  return ckpt_layout.load_state(os.path.join(workdir, 'checkpoints', str(step)))


def _equal(a, b) -> bool:
  return all(
    jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))
  )


def test_first_step_loss_differs_from_a_random_start(finetuned, random_start):
  a, b = finetuned['losses'][1], random_start['losses'][1]
  assert abs(a - b) > 0.05 * abs(b), (a, b)


def test_trunk_after_a_step_at_lr_0_gives_the_pretrained_descriptors(env, finetuned):
  variables, head, _ = _state(finetuned['workdir'], 1)
  model_p, variables_p = pretrained.load(env['pyth'])
  assert _equal(variables, variables_p)  # every model variable, BN statistics and p included
  np.testing.assert_array_equal(head['weight'], env['sd']['desc_cls.weight'].numpy())
  assert float(head['t']) == 0.25
  model = models.build_model(_model_config(), 'float32')
  images = np.random.RandomState(0).uniform(0, 255, (2, 72, 88, 3)).astype(np.float32)
  np.testing.assert_array_equal(
    np.asarray(jax.jit(model.apply)(variables, images)),
    np.asarray(jax.jit(model_p.apply)(variables_p, images)),
  )
  assert finetuned['metrics'][0]['learning_rate'] > 0  # the multipliers made it 0


def test_manifest_records_the_start(env, finetuned):
  with open(os.path.join(finetuned['workdir'], 'manifest.json')) as f:
    manifest = json.load(f)
  with open(env['pyth'], 'rb') as f:
    sha = hashlib.sha256(f.read()).hexdigest()
  start = manifest['start']
  assert (start['used'], start['path'], start['sha256'], start['kind']) == (
    'init_checkpoint',
    env['pyth'],
    sha,
    'released checkpoint',
  )
  assert start['head'].startswith('loaded (4 classes')
  assert 'not used' in manifest['backbone']['note']
  assert manifest['dataset']['name'] == 'folder/ft'
  assert manifest['dataset']['build_options']['source'] == 'class folders'
  assert manifest['start_step'] == 0
  err = finetuned['proc'].stderr
  assert 'Start: init_checkpoint' in err and 'fresh optimizer' in err


def test_head_is_initialised_when_the_class_count_differs(env, other_classes, random_start):
  assert other_classes['proc'].stderr.count(HEAD_REINIT) == 1
  variables, head, _ = _state(other_classes['workdir'], 1)
  _, random_head, _ = _state(random_start['workdir'], 1)
  np.testing.assert_array_equal(head['weight'], random_head['weight'])  # a fresh run's head
  assert head['weight'].shape == (NUM_CLASSES, 16) and float(head['t']) == 0.0
  assert _equal(variables, pretrained.load(env['pyth7'])[1])
  with open(os.path.join(other_classes['workdir'], 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['start']['head'] == (
    'initialised: the checkpoint has a margin head of 7 classes, the dataset 4'
  )
  assert manifest['start']['backbone_init'] == '/nonexistent/R-101-1x64d_dds_8gpu.pyth (not used)'


def _config(env, workdir_init, **model):
  config = tiny.get_config()
  config.data.make_fixture = False
  config.data.dataset, config.data.data_dir = 'folder/ft', env['data_dir']
  config.train.init_checkpoint = workdir_init
  config.model.update(model)
  return config


@pytest.mark.parametrize(
  'model, named',
  [
    (
      {},
      [
        'config.model.use_multi_atrous=True but the checkpoint has False',
        'config.model.local_dim=32 but the checkpoint has 128',
        'config.model.gem_p_learnable=False but the checkpoint has True',
        'config.model.global_dim=32 but the checkpoint has 128',
      ],
    ),
    (
      {**ARCH, 'stage_depths': (1, 1, 2, 1)},
      ['config.model.stage_depths=(1, 1, 2, 1) but the checkpoint has (1, 1, 1, 1)'],
    ),
    ({**ARCH, 'embedding_dim': 32}, ['config.model.embedding_dim=32 but the checkpoint has 16']),
  ],
)
def test_architecture_mismatch_is_refused_before_anything_is_written(env, tmp_path, model, named):
  workdir = str(tmp_path / 'run')
  with pytest.raises(init_checkpoint.InitCheckpointError) as e:
    loop.train_and_evaluate(_config(env, env['pyth'], **model), workdir)
  for text in named:
    assert text in str(e.value)
  assert not os.path.exists(workdir)


def test_resuming_a_finetuned_run_is_exact(env, tmp_path):
  steps = '--config.train.num_train_steps=4'
  straight = str(tmp_path / 'straight')
  proc = _run(env, straight, *TRAINING, f'--config.train.init_checkpoint={env["pyth"]}', steps)
  assert proc.returncode == 0, train_testlib.explain(proc)
  losses = train_testlib.train_losses(straight)
  init = str(tmp_path / 'copy.pyth')
  shutil.copy(env['pyth'], init)
  workdir = str(tmp_path / 'killed')
  flags = (*TRAINING, f'--config.train.init_checkpoint={init}', steps)
  proc = _run(env, workdir, *flags, wrapped=True, DOLG_TEST_KILL_AT=4)
  assert proc.returncode == -9, train_testlib.explain(proc)
  assert train_testlib.checkpoint_steps(workdir)
  os.remove(init)  # resuming reads the workdir's own checkpoints, not the init checkpoint
  proc = _run(env, workdir, *flags)
  assert proc.returncode == 0, train_testlib.explain(proc)
  assert 'Resumed from step' in proc.stderr + proc.stdout
  assert train_testlib.train_losses(workdir) == losses and len(losses) == 4
  record = lambda w: json.loads(
    (ckpt_layout.checkpoint_dir(w) / '4' / 'record' / 'process_0-of-1.json').read_text()
  )
  assert record(workdir)['state_digests'] == record(straight)['state_digests']
  # It trained: every group moved (model at lr x 0.5, head at lr x 2, BatchNorm statistics).
  variables, head, _ = _state(straight, 4)
  pyth_vars = pretrained.load(env['pyth'])[1]
  assert not _equal(variables['params'], pyth_vars['params'])
  assert not _equal(variables['batch_stats'], pyth_vars['batch_stats'])
  assert not np.array_equal(head['weight'], env['sd']['desc_cls.weight'].numpy())
  with open(os.path.join(workdir, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['start']['used'] == 'init_checkpoint'
  assert manifest['resumes'][-1]['start']['used'] == 'resumed'


def test_init_from_our_checkpoint_and_a_converted_dir(env, finetuned, tmp_path):
  expected = pretrained.load(env['pyth'])[1]
  step = os.path.join(finetuned['workdir'], 'checkpoints', '1')
  ours = init_checkpoint.load(step)
  assert ours.kind == 'training checkpoint' and ours.path == step
  assert _equal(ours.variables, expected) and ours.num_classes == NUM_CLASSES
  init_checkpoint.check(ours, _model_config())
  latest = init_checkpoint.load(finetuned['workdir'])  # a workdir: its latest step
  assert latest.path == step
  out = str(tmp_path / 'converted')
  released.convert_file(env['pyth'], out)
  conv = init_checkpoint.load(out)
  assert conv.kind == 'converted directory' and _equal(conv.variables, expected)
  assert conv.num_classes == NUM_CLASSES and conv.head['t'] == 0.25
  with pytest.raises(init_checkpoint.InitCheckpointError, match='does not exist'):
    init_checkpoint.load(str(tmp_path / 'nothing'))
  with pytest.raises(init_checkpoint.InitCheckpointError, match='neither a converted directory'):
    init_checkpoint.load(str(tmp_path))


def test_fine_tuning_fields():
  tx = optax.sgd(1.0, momentum=0.9)
  assert state_lib.scale_param_groups(tx, model=1.0, head=1.0) is tx  # defaults change nothing
  scaled = state_lib.scale_param_groups(tx, model=0.5, head=2.0)
  params = {'model': {'w': np.ones(3, np.float32)}, 'head': {'weight': np.ones((2, 3), np.float32)}}
  grads = jax.tree.map(lambda p: 0.3 * p, params)
  base, _ = tx.update(grads, tx.init(params), params)
  got, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_array_equal(got['model']['w'], 0.5 * base['model']['w'])
  np.testing.assert_array_equal(got['head']['weight'], 2.0 * base['head']['weight'])
  assert jax.tree.structure(scaled.init(params)) == jax.tree.structure(tx.init(params))
  config = tiny.get_config()
  for field, value in (
    ('head_lr_multiplier', -1.0),
    ('model_lr_multiplier', float('nan')),
    ('freeze_bn', 1),
    ('init_checkpoint', None),
  ):
    bad = ml_collections.ConfigDict(config.to_dict(), type_safe=False)  # any value goes in
    bad.train[field] = value
    with pytest.raises(init_checkpoint.InitCheckpointError, match=f'config.train.{field}='):
      init_checkpoint.validate(bad)
  config.train.freeze_bn = True
  setup = state_lib.make_setup(config, shd.make_mesh(config.mesh))
  assert setup.config.train.freeze_bn and setup.model.embedding_dim == 16
