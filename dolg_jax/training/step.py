"""The pure train step (and eval step), jitted once with explicit shardings on the mesh.

`make_train_step(setup, state_sharding)` returns `train_step(state, batch, lr) -> (state, metrics)`
(state donated); `check_batch_split` is the batch rule config_check also applies. The model
computes in `config.compute_dtype` from float32 master weights; logits, loss and update are
float32 (all float64 with `compute_dtype='float64'`). BatchNorm statistics follow
`config.train.bn_mode` ('global' | 'per_device') and `bn_group_size` (with `train.freeze_bn`:
the running statistics, kept); `grad_accum_steps` = k averages the gradients of k micro-batches
into one update. `tests/test_official_training.py` holds this step to the
official trainer's numbers. Numerics, BatchNorm modes, accumulation: docs/design_notes.md.
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dolg_jax import config_rules as rules
from dolg_jax import models
from dolg_jax import sharding as shd
from dolg_jax.models.normalize import wide_dtype
from dolg_jax.models.normalize import widen
from dolg_jax.models import margins
from dolg_jax.training.state import TrainSetup
from dolg_jax.training.state import TrainState

_MASK_VALUE = -1e9
BN_MODES = ('global', 'per_device')  # the choices of config.train.bn_mode
CONFIG_RULES = {
  'train.bn_mode': rules.one_of(BN_MODES),
  'train.bn_group_size': rules.NON_NEGATIVE_INT,
  'train.global_batch_size': rules.POSITIVE_INT,
  'train.grad_accum_steps': rules.POSITIVE_INT,
}


def head_logits(
  head_cfg: ml_collections.ConfigDict, embeddings, weight, labels, t, num_classes: int
):
  """Margin logits (float32, or float64) and the new CurricularFace `t`; padded classes masked."""
  if head_cfg.type == 'arcface':
    logits = margins.arcface_logits(
      embeddings, weight, labels, margin=head_cfg.margin, scale=head_cfg.scale
    )
    new_t = t
  elif head_cfg.type == 'curricularface':
    logits, new_t = margins.curricularface_logits(
      embeddings,
      weight,
      labels,
      t,
      margin=head_cfg.margin,
      scale=head_cfg.scale,
      t_momentum=head_cfg.t_momentum,
    )
  else:
    rules.fail('head.type', head_cfg.type, margins.CONFIG_RULES['head.type'].allowed)
  return _mask_padded_classes(widen(logits), num_classes), new_t


def _mask_padded_classes(logits: jax.Array, num_classes: int) -> jax.Array:
  """Logits (N, C_pad) with the classes >= num_classes (mesh padding) at -1e9."""
  if logits.shape[-1] == num_classes:
    return logits
  return jnp.where(jnp.arange(logits.shape[-1])[None, :] < num_classes, logits, _MASK_VALUE)


def _forward_fn(
  model: nn.Module, mesh: Mesh, bn_mode: str, bn_group_size: int = 0, freeze_bn: bool = False
) -> Callable:
  """(model_params, batch_stats, images) -> (embeddings float32, new batch_stats).

  `freeze_bn` (train.freeze_bn): BatchNorm normalises with its running statistics and returns
  them unchanged, whatever bn_mode and bn_group_size say.
  """

  def forward_frozen(params, batch_stats, images):
    emb = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    return widen(emb), batch_stats

  if freeze_bn:
    return forward_frozen

  def forward_all(params, batch_stats, images):
    emb, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    return widen(emb), updates['batch_stats']

  def forward_grouped(params, batch_stats, images):
    n, g = images.shape[0], bn_group_size
    if n % g:
      raise ValueError(
        f'config.train.bn_group_size={g} must divide the batch it splits: {n} '
        'images (the per-device (micro)batch with bn_mode=per_device, else the '
        'global (micro)batch)'
      )
    groups = images.reshape((n // g, g) + images.shape[1:])
    emb, stats = jax.vmap(forward_all, in_axes=(None, None, 0))(params, batch_stats, groups)
    return (emb.reshape((n,) + emb.shape[2:]), jax.tree.map(lambda x: jnp.mean(x, axis=0), stats))

  rules.check_value('train.bn_group_size', bn_group_size, CONFIG_RULES['train.bn_group_size'])
  forward = forward_grouped if bn_group_size else forward_all

  if bn_mode == 'global':
    return forward
  rules.check_value('train.bn_mode', bn_mode, CONFIG_RULES['train.bn_mode'])

  def local_forward(params, batch_stats, images):
    emb, new_stats = forward(params, batch_stats, images)
    return emb, jax.lax.pmean(new_stats, shd.BATCH_AXES)

  return jax.shard_map(
    local_forward,
    mesh=mesh,
    in_specs=(P(), P(), shd.batch_spec()),
    out_specs=(shd.batch_spec(), P()),
    check_vma=False,
  )


def _split_microbatches(x: jax.Array, k: int, mesh: Mesh) -> jax.Array:
  """(B, ...) -> (k, B/k, ...) such that every microbatch is spread over all devices."""
  b = x.shape[0]
  x = x.reshape((b // k, k) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.BATCH_AXES)))


def check_batch_split(global_batch_size: int, grad_accum_steps: int, devices: int) -> None:
  """Raises ValueError unless the batch splits into `grad_accum_steps` equal micro-batches, each
  split evenly over `devices` (the batch is split over every mesh axis)."""
  if global_batch_size % (grad_accum_steps * devices):
    rules.fail(
      'train.global_batch_size',
      global_batch_size,
      f'must be divisible by train.grad_accum_steps={grad_accum_steps} '
      f'x {devices} devices (the batch is split over every mesh axis)',
    )


def make_train_step(setup: TrainSetup, state_sharding: TrainState) -> Callable:
  """Returns jitted `train_step(state, batch, learning_rate) -> (state, metrics)`.

  `state` is donated. `tx` is the unit-learning-rate optimizer of `state.create_optimizer`;
  `learning_rate` (float32 scalar) scales its update.
  """
  config, model, tx, mesh = setup.config, setup.model, setup.tx, setup.mesh
  num_classes = setup.num_classes
  t_cfg = config.train
  k = int(t_cfg.grad_accum_steps)
  check_batch_split(t_cfg.global_batch_size, k, shd.batch_devices(mesh))
  forward = _forward_fn(model, mesh, t_cfg.bn_mode, int(t_cfg.bn_group_size), t_cfg.freeze_bn)
  wide = wide_dtype(models.resolve_dtype(config.compute_dtype))

  def loss_fn(params, batch_stats, head_t, images, labels):
    emb, new_stats = forward(params['model'], batch_stats, images)
    logits, new_t = head_logits(
      config.head, emb, params['head']['weight'], labels, head_t, num_classes
    )
    loss = jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))
    # Accuracy of the nearest class centre (no margin: the margin lowers only the target logit,
    # so argmax of the margin logits would under-count). XLA shares the cosine matmul with the head.
    cos = _mask_padded_classes(margins.cosine_logits(emb, params['head']['weight']), num_classes)
    correct = jnp.sum(jnp.argmax(cos, axis=-1) == labels)
    return loss, (new_stats, new_t, correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array], learning_rate: jax.Array):
    images, labels = batch['image'], batch['label'].astype(jnp.int32)
    if k == 1:
      (loss, (stats, head_t, correct)), grads = grad_fn(
        state.params, state.batch_stats, state.head_t, images, labels
      )
    else:
      micro = (_split_microbatches(images, k, mesh), _split_microbatches(labels, k, mesh))

      def body(carry, mb):
        stats, t_sum, grads, loss, correct = carry
        # Every microbatch starts from the step's t (one EMA step per optimizer step).
        (l, (stats, t_mb, c)), g = grad_fn(state.params, stats, state.head_t, *mb)
        grads = jax.tree.map(jnp.add, grads, g)
        return (stats, t_sum + t_mb, grads, loss + l, correct + c), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      init = (
        state.batch_stats,
        jnp.zeros_like(state.head_t),
        zeros,
        jnp.zeros((), wide),
        jnp.zeros((), jnp.int32),
      )
      (stats, t_sum, grads, loss, correct), _ = jax.lax.scan(body, init, micro)
      grads = jax.tree.map(lambda g: g / k, grads)
      head_t = t_sum / k  # = t_momentum * mean over the whole batch + (1 - t_momentum) * t
      loss = loss / k
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: learning_rate * u, updates)
    params = optax.apply_updates(state.params, updates)
    metrics = {
      'loss': loss,
      'accuracy': correct.astype(jnp.float32) / labels.shape[0],
      'learning_rate': learning_rate,
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params),
      'head_t': head_t,
      # BatchNorm normalises a diverging activation back to a finite loss while its running
      # variance overflows: count what the loss and the norms would not show.
      'nonfinite_state': sum(
        jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves((stats, head_t))
      ).astype(jnp.float32),
    }
    new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=stats, opt_state=opt_state, head_t=head_t
    )
    return new_state, metrics

  batch_sh = {'image': shd.batch_sharding(mesh), 'label': shd.batch_sharding(mesh)}
  return jax.jit(
    train_step,
    in_shardings=(state_sharding, batch_sh, shd.replicated(mesh)),
    out_shardings=(state_sharding, shd.replicated(mesh)),
    donate_argnums=(0,),
  )


def make_eval_step(setup: TrainSetup, state_sharding: TrainState) -> Callable:
  """Jitted `eval_step(state, batch) -> {'correct', 'count', 'loss_sum'}` with plain cosine logits.

  Validation accuracy uses the nearest class centre (cosine logits without the margin, the
  training step's `margins.cosine_logits`, same precision), the metric that measures the
  descriptor; `batch['mask']` (optional) marks padding examples.
  """
  config, model, mesh, num_classes = setup.config, setup.model, setup.mesh, setup.num_classes

  def eval_step(state: TrainState, batch):
    emb = model.apply(
      {'params': state.params['model'], 'batch_stats': state.batch_stats},
      batch['image'],
      train=False,
    )
    logits = _mask_padded_classes(
      config.head.scale * margins.cosine_logits(emb, state.params['head']['weight']), num_classes
    )
    labels = batch['label'].astype(jnp.int32)
    mask = batch.get('mask', jnp.ones_like(labels)).astype(logits.dtype)
    nll = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
      'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      'count': jnp.sum(mask),
      'loss_sum': jnp.sum(nll * mask),
    }

  return jax.jit(
    eval_step,
    in_shardings=(state_sharding, shd.batch_sharding(mesh)),
    out_shardings=shd.replicated(mesh),
  )


def train_flops_per_step(compiled) -> float | None:
  """FLOPs of one compiled step from XLA's cost analysis (None when unavailable)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001  # Some backends do not implement it.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None
  return float(cost.get('flops', 0.0)) or None
