"""The train step's mechanics on small stand-in models (fast to compile on CPU).

The tiny DOLG itself is trained by tests/test_train_loop.py and tests/test_multihost.py.
"""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import tiny
from dolg_jax import sharding as shd
from dolg_jax.models import margins
from dolg_jax.training import state as state_lib
from dolg_jax.training import step as step_lib
from dolg_jax.weights import backbone as backbone_lib

from tests.helpers.paths import REPO


class DenseEmbed(nn.Module):
  """No BatchNorm: gradient accumulation must equal one big batch."""

  @nn.compact
  def __call__(self, x, train=False):
    x = x.astype(jnp.float32).reshape(x.shape[0], -1) / 255.0
    return nn.Dense(16)(nn.relu(nn.Dense(32)(x)))


def _config(**train):
  c = tiny.get_config()
  c.data.image_size = 8
  c.train.global_batch_size = 8
  c.head.num_classes = 6
  c.model.embedding_dim = 16
  c.train.update(train)
  return c


def _setup(config, model):
  mesh = shd.make_mesh(config.mesh)
  setup = state_lib.TrainSetup(config, model, state_lib.create_optimizer(config.train), mesh)
  state, sh = state_lib.create_train_state(setup, jax.random.key(0))
  step = step_lib.make_train_step(setup, sh)
  return mesh, state, step


def _batch(n=8, size=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
    'label': rng.integers(0, 6, (n,), dtype=np.int32),
  }


def test_one_step_updates_params_and_reports_metrics():
  config = _config()
  mesh, state, step = _setup(config, DenseEmbed())
  before = jax.device_get(state.params)
  new, metrics = step(state, shd.global_batch(mesh, _batch()), np.float32(0.1))
  metrics = jax.device_get(metrics)
  assert int(new.step) == 1
  assert np.isfinite(metrics['loss']) and metrics['loss'] > 0
  assert 0.0 <= metrics['accuracy'] <= 1.0 and metrics['learning_rate'] == pytest.approx(0.1)
  assert metrics['grad_norm'] > 0
  after = jax.device_get(new.params)
  assert not np.allclose(before['head']['weight'], after['head']['weight'])
  for a in jax.tree.leaves(after):
    assert a.dtype == np.float32


def test_gradient_accumulation_equals_full_batch():
  batch = _batch()
  results = []
  for k in (1, 2, 4):
    config = _config(grad_accum_steps=k)
    mesh, state, step = _setup(config, DenseEmbed())
    new, metrics = step(state, shd.global_batch(mesh, batch), np.float32(0.5))
    results.append((jax.device_get(new.params), jax.device_get(metrics)))
  for params, metrics in results[1:]:
    assert metrics['loss'] == pytest.approx(results[0][1]['loss'], rel=1e-5)
    assert metrics['accuracy'] == results[0][1]['accuracy']
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, results[0][0]
    )


@pytest.mark.parametrize(
  'optimizer, nesterov, rtol, atol',
  [('sgd', False, 1e-6, 0.0), ('sgd', True, 1e-6, 0.0), ('adamw', False, 1e-5, 1e-6)],
)
def test_optimizer_matches_torch_with_a_changing_learning_rate(optimizer, nesterov, rtol, atol):
  """Unit-lr optax chain x the step's lr == torch.optim.SGD / AdamW with that lr each step."""
  import torch

  cfg = ml_collections.ConfigDict(
    dict(
      optimizer=optimizer,
      weight_decay=1e-2,
      weight_decay_mask='all',
      momentum=0.9,
      nesterov=nesterov,
      adam_b1=0.9,
      adam_b2=0.999,
    )
  )
  tx = state_lib.create_optimizer(cfg)
  w0 = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
  params = {'w': jnp.asarray(w0)}
  opt = tx.init(params)
  tw = torch.tensor(w0, requires_grad=True)
  if optimizer == 'sgd':
    topt = torch.optim.SGD([tw], lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=nesterov)
  else:
    topt = torch.optim.AdamW([tw], lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
  for i, lr in enumerate((0.1, 0.05, 0.2, 0.01)):
    g = np.full_like(w0, 0.3) * (i + 1) + w0 * (i % 2 - 0.5)
    updates, opt = tx.update({'w': jnp.asarray(g)}, opt, params)
    params = jax.tree.map(lambda p, u: p + lr * u, params, updates)
    for group in topt.param_groups:
      group['lr'] = lr
    tw.grad = torch.tensor(g)
    topt.step()
  np.testing.assert_allclose(np.asarray(params['w']), tw.detach().numpy(), rtol=rtol, atol=atol)


def test_unknown_optimizer_is_an_error_naming_the_field():
  with pytest.raises(ValueError, match='optimizer'):
    state_lib.create_optimizer(
      ml_collections.ConfigDict(dict(optimizer='lamb', weight_decay=0.0, weight_decay_mask='all'))
    )


def test_weight_decay_mask():
  params = {
    'conv': {'kernel': jnp.ones((3, 3, 2, 2)), 'bias': jnp.ones((2,))},
    'bn': {'scale': jnp.ones((2,))},
    'head': {'weight': jnp.ones((4, 2))},
  }
  zero = jax.tree.map(jnp.zeros_like, params)
  for kind, decayed in (
    ('all', {'kernel', 'bias', 'scale', 'weight'}),
    ('kernels', {'kernel', 'weight'}),
  ):
    cfg = ml_collections.ConfigDict(
      dict(optimizer='sgd', weight_decay=0.5, weight_decay_mask=kind, momentum=0.0, nesterov=False)
    )
    tx = state_lib.create_optimizer(cfg)
    updates, _ = tx.update(zero, tx.init(params), params)
    flat = jax.tree_util.tree_flatten_with_path(updates)[0]
    for path, u in flat:
      name = path[-1].key
      assert np.all(np.asarray(u) == (-0.5 if name in decayed else 0.0)), (kind, name)
  with pytest.raises(ValueError, match='weight_decay_mask'):
    state_lib.weight_decay_mask('bn')


def test_padded_head_classes_are_masked_out():
  rng = np.random.default_rng(0)
  emb = jnp.asarray(rng.normal(size=(4, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 16)), jnp.float32)
  w_pad = jnp.concatenate([w, jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)])
  labels = jnp.array([0, 5, 2, 3])
  head = ml_collections.ConfigDict(dict(type='arcface', margin=0.15, scale=30.0, t_momentum=0.01))
  logits, _ = step_lib.head_logits(head, emb, w, labels, 0.0, 6)
  logits_pad, _ = step_lib.head_logits(head, emb, w_pad, labels, 0.0, 6)
  np.testing.assert_allclose(logits_pad[:, :6], logits)
  loss = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
  np.testing.assert_allclose(
    optax.losses.softmax_cross_entropy_with_integer_labels(logits_pad, labels), loss, rtol=1e-6
  )
  mesh = shd.make_mesh(ml_collections.ConfigDict(dict(data=-1, model=1)))
  assert state_lib.padded_num_classes(81313, mesh) == 81313


def test_mesh_config_errors():
  with pytest.raises(ValueError, match='config.mesh'):
    shd.make_mesh(ml_collections.ConfigDict(dict(data=2, model=1)))  # 1 CPU device here
  with pytest.raises(ValueError, match='config.train.bn_mode'):
    _setup(_config(bn_mode='per_gpu'), DenseEmbed())


_BN_SCRIPT = textwrap.dedent('''
  import flax.linen as nn, jax, jax.numpy as jnp, math, numpy as np, torch
  from tests.test_train_step import _config, _setup, _batch
  from dolg_jax import sharding as shd

  class BNEmbed(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = x.astype(jnp.float32).reshape(x.shape[0], -1) / 255.0
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Dense(16)(x))
      return nn.Dense(16)(nn.relu(x))

  assert jax.device_count() == 8
  LR, N = 0.5, 16                                   # 2 images per device
  batch = _batch(n=N)
  out = {}
  for name, mode, group in (('per_device', 'per_device', 0), ('groups_of_2', 'global', 2)):
    config = _config(bn_mode=mode, bn_group_size=group, global_batch_size=N, optimizer='sgd',
                     momentum=0.9, nesterov=False, weight_decay=0.0)
    mesh, state, step = _setup(config, BNEmbed())
    params = jax.device_get(state.params)           # Before the step (the state is donated).
    new, m = step(state, shd.global_batch(mesh, batch), np.float32(LR))
    new_params = jax.device_get(new.params)
    # First SGD step, no weight decay: the update is -LR x the gradient (momentum buffer = grad).
    grads = jax.tree.map(lambda a, b: (a - b) / LR, params, new_params)
    out[name] = dict(grads=grads, loss=float(m['loss']), grad_norm=float(m['grad_norm']),
                     stats=jax.device_get(new.batch_stats['BatchNorm_0']))
  head = config.head
  assert head.type == 'arcface' and params['head']['weight'].shape[0] == 6

  def close(a, b, rtol=1e-4, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)

  # per_device (one BN per device, inside shard_map) == global mode over groups of 2 (vmap): the
  # same statistics, so the same loss, gradients (backward through shard_map) and running stats.
  a, b = out['per_device'], out['groups_of_2']
  close(a['grads'], b['grads'])
  close(a['stats'], b['stats'])
  assert abs(a['loss'] - b['loss']) < 1e-5 and abs(a['grad_norm'] - b['grad_norm']) < 1e-4

  def torch_reference(ranks):
    """(loss, gradients) in float64 with `ranks` GPUs, each BatchNorm1d in train mode on its
    N / ranks images, the ArcFace loss averaged over the global batch (DDP averages the equal
    ranks' mean gradients); ranks=1 is whole-batch statistics."""
    p = params['model']
    t = lambda x: torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    w0, b0, w1, b1 = (t(p['Dense_0']['kernel']), t(p['Dense_0']['bias']),
                      t(p['Dense_1']['kernel']), t(p['Dense_1']['bias']))
    gamma, beta = t(p['BatchNorm_0']['scale']), t(p['BatchNorm_0']['bias'])
    wh = t(params['head']['weight'])
    x = torch.tensor(np.asarray(batch['image'], np.float64).reshape(N, -1) / 255.0)
    y = torch.tensor(batch['label'], dtype=torch.long)
    embs, per = [], N // ranks
    for r in range(ranks):
      h = x[per * r: per * (r + 1)] @ w0 + b0
      h = torch.nn.functional.batch_norm(h, None, None, gamma, beta, training=True, eps=1e-5)
      embs.append(torch.relu(h) @ w1 + b1)
    e = torch.nn.functional.normalize(torch.cat(embs), dim=1)
    cos = (e @ torch.nn.functional.normalize(wh, dim=1).T).clamp(-1, 1)
    cos_y = cos[torch.arange(N), y]
    m_, s_ = head.margin, head.scale
    phi = cos_y * math.cos(m_) - torch.sqrt((1 - cos_y ** 2).clamp_min(1e-12)) * math.sin(m_)
    phi = torch.where(cos_y > math.cos(math.pi - m_), phi, cos_y - math.sin(math.pi - m_) * m_)
    logits = s_ * torch.where(torch.nn.functional.one_hot(y, 6).bool(), phi[:, None], cos)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = {'model': {'Dense_0': {'kernel': w0.grad, 'bias': b0.grad},
                       'BatchNorm_0': {'scale': gamma.grad, 'bias': beta.grad},
                       'Dense_1': {'kernel': w1.grad, 'bias': b1.grad}},
             'head': {'weight': wh.grad}}
    return loss.item(), jax.tree.map(lambda v: v.numpy(), grads,
                                     is_leaf=lambda v: isinstance(v, torch.Tensor))

  torch.set_default_dtype(torch.float64)
  # float32 (ours) vs float64 (reference): ~1e-4 relative per tensor is rounding; whole-batch
  # statistics are off by ~1 (so this test tells the modes apart). Dense_0's bias (before the
  # BN, cancelled by its mean) has a zero gradient in exact arithmetic: only rounding, small next
  # to its kernel's gradient.
  dense0 = a['grads']['model']['Dense_0']
  assert np.linalg.norm(dense0['bias']) < 1e-3 * np.linalg.norm(dense0['kernel'])
  for ranks, tol in ((8, 1e-3), (1, None)):
    loss, ref = torch_reference(ranks)
    errs = jax.tree.map(lambda x, y: (float(np.linalg.norm(x - y)), float(np.linalg.norm(y))),
                        a['grads'], ref)
    for path, (err, norm) in jax.tree_util.tree_flatten_with_path(
        errs, is_leaf=lambda v: isinstance(v, tuple))[0]:
      if 'Dense_0' in str(path) and 'bias' in str(path):
        continue
      if tol:
        assert err <= tol * norm, (ranks, path, err, norm)
      else:
        assert err > 0.3 * norm, (ranks, path, err, norm)
    if tol:
      assert abs(a['loss'] - loss) < 1e-4 * loss, (a['loss'], loss)
  print('BN_OK')
''')


def test_per_device_bn_gradients_equal_groups_and_a_torch_per_gpu_reference():
  """8 CPU devices, 2 images each, one SGD step at a non-zero learning rate: bn_mode=per_device
  (shard_map) has the gradients, loss and running statistics of global mode with
  bn_group_size=2, and its gradients equal a PyTorch per-GPU BatchNorm reference (8 ranks), not
  the same reference with whole-batch statistics."""
  env = dict(
    os.environ,
    XLA_FLAGS='--xla_force_host_platform_device_count=8',
    JAX_PLATFORMS='cpu',
    PYTHONPATH=os.pathsep.join([REPO, os.environ.get('PYTHONPATH', '')]),
  )
  proc = subprocess.run(
    [sys.executable, '-c', _BN_SCRIPT],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0 and 'BN_OK' in proc.stdout, proc.stderr[-4000:]


def test_load_backbone_replaces_only_given_leaves(monkeypatch):
  config = _config()
  mesh, state, _ = _setup(config, DenseEmbed())
  shardings = jax.tree.map(lambda x: x.sharding, state)
  kernel = np.full((8 * 8 * 3, 32), 0.5, np.float32)
  monkeypatch.setattr(
    backbone_lib, 'load_backbone', lambda path: {'params': {'Dense_1': {'kernel': kernel}}}
  )
  before = jax.device_get(state.params)
  new = state_lib.load_backbone(state, shardings, 'fake.pyth')
  after = jax.device_get(new.params)
  np.testing.assert_array_equal(after['model']['Dense_1']['kernel'], kernel)
  np.testing.assert_array_equal(
    after['model']['Dense_0']['kernel'], before['model']['Dense_0']['kernel']
  )
  np.testing.assert_array_equal(after['head']['weight'], before['head']['weight'])
  placed = new.params['model']['Dense_1']['kernel']
  assert placed.sharding == shardings.params['model']['Dense_1']['kernel']


def test_gradient_accumulation_takes_one_curricularface_t_step_from_the_whole_batch():
  """k microbatches: t moves once per update, by t_momentum x the WHOLE batch's mean target cosine
  (k EMA steps from microbatch means would give a different t: checked against that too)."""
  batch = _batch()
  runs = {}
  for k in (1, 2):
    config = _config(grad_accum_steps=k)
    config.head.type = 'curricularface'
    mesh, state, step = _setup(config, DenseEmbed())
    state = state.replace(head_t=jnp.asarray(0.3, jnp.float32))
    _, metrics = step(state, shd.global_batch(mesh, batch), np.float32(0.5))
    runs[k] = jax.device_get(metrics)
  assert runs[2]['head_t'] == pytest.approx(runs[1]['head_t'], rel=1e-6)
  # The target cosines of the two microbatches (rows 0::2 and 1::2) at the step's parameters.
  config = _config()
  _, state, _ = _setup(config, DenseEmbed())
  emb = DenseEmbed().apply({'params': state.params['model']}, batch['image'])
  cos = margins.cosine_logits(emb, state.params['head']['weight'])
  cos_y = np.asarray(jnp.take_along_axis(cos, batch['label'][:, None], axis=1))[:, 0]
  m, t0 = config.head.t_momentum, 0.3
  assert runs[1]['head_t'] == pytest.approx(m * cos_y.mean() + (1 - m) * t0, rel=1e-6)
  two_ema_steps = m * cos_y[1::2].mean() + (1 - m) * (m * cos_y[0::2].mean() + (1 - m) * t0)
  assert abs(runs[2]['head_t'] - two_ema_steps) > 1e-3 * abs(t0)
  assert runs[2]['loss'] == pytest.approx(runs[1]['loss'], rel=1e-3)


def test_validation_logits_use_the_training_cosine_at_highest_precision():
  """The eval step's class logits are the train step's `margins.cosine_logits` (Precision.HIGHEST):
  every matmul against the head weight in the eval program runs at HIGHEST."""
  config = _config()
  mesh, state, _ = _setup(config, DenseEmbed())
  setup = state_lib.TrainSetup(config, DenseEmbed(), state_lib.create_optimizer(config.train), mesh)
  sh = jax.tree.map(lambda _: shd.replicated(mesh), state)
  eval_step = step_lib.make_eval_step(setup, sh)
  batch = shd.global_batch(mesh, _batch())
  jaxpr = jax.make_jaxpr(eval_step)(state, batch)
  head_shape = state.params['head']['weight'].shape

  def dots(jp):
    for eqn in jp.eqns:
      if eqn.primitive.name == 'dot_general':
        yield eqn
      for p in eqn.params.values():
        if isinstance(p, jax.extend.core.ClosedJaxpr):
          yield from dots(p.jaxpr)
        elif isinstance(p, jax.extend.core.Jaxpr):
          yield from dots(p)

  head_dots = [
    e for e in dots(jaxpr.jaxpr) if any(tuple(v.aval.shape) == head_shape for v in e.invars)
  ]
  assert head_dots, 'no matmul against the head weight found'
  for e in head_dots:
    precision = e.params['precision']
    assert precision is not None and jax.lax.Precision.HIGHEST in tuple(precision), precision
  out = jax.device_get(eval_step(state, batch))
  emb = DenseEmbed().apply({'params': state.params['model']}, _batch()['image'])
  logits = config.head.scale * margins.cosine_logits(emb, state.params['head']['weight'])
  want = np.sum(np.argmax(np.asarray(logits), -1) == _batch()['label'])
  assert out['correct'] == want
