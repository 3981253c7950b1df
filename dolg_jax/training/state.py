"""Train state and optimizer: created already sharded on the mesh.

State layout (a pytree, saved as one orbax item):
  step         int32 scalar: optimizer updates done.
  params       {'model': DOLG params, 'head': {'weight': (C_pad, embedding_dim)}}; float32.
  batch_stats  DOLG BatchNorm running statistics (float32).
  opt_state    the optimizer's state (SGD momentum or Adam moments), sharded as params.
  head_t       float32 scalar: CurricularFace's EMA `t` (unused and 0 for ArcFace).

The head's class count is padded up to a multiple of the mesh's `model` axis so the class dimension
can be split evenly; padded classes are masked out of the softmax by the train step.
Design notes: docs/design_notes.md.
"""

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from dolg_jax import config_rules as rules
from dolg_jax import models
from dolg_jax import sharding as shd
from dolg_jax.weights import backbone as backbone_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  head_t: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainSetup:
  """The collaborators every train-setup function takes: the run's config (its
  `head.num_classes` is the dataset's), the DOLG module, the unit-lr optimizer and the mesh."""

  config: ml_collections.ConfigDict
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: Mesh

  @property
  def num_classes(self) -> int:
    return int(self.config.head.num_classes)


def make_setup(
  config: ml_collections.ConfigDict, mesh: Mesh, num_classes: int | None = None
) -> TrainSetup:
  """TrainSetup of `config` on `mesh`; `num_classes` (the dataset's) replaces config.head's in a
  copy of the config (the caller's config is not modified).

  `train.model_lr_multiplier` / `train.head_lr_multiplier` scale the update of the model / the
  margin head (`scale_param_groups`); with `train.freeze_bn` the train step's BatchNorm uses its
  running statistics and keeps them.
  """
  config = config.copy_and_resolve_references()
  if num_classes is not None:
    config.head.num_classes = int(num_classes)
  t = config.train
  model = models.build_model(config.model, config.compute_dtype)
  tx = scale_param_groups(
    create_optimizer(t), model=t.model_lr_multiplier, head=t.head_lr_multiplier
  )
  return TrainSetup(config, model, tx, mesh)


def scale_param_groups(
  tx: optax.GradientTransformation, *, model: float, head: float
) -> optax.GradientTransformation:
  """`tx` whose update of params['model'] is multiplied by `model` and of params['head'] by
  `head` (per-group learning-rate multipliers: a group's rate is lr x multiplier, weight decay
  included); the state is `tx`'s own, so changing them keeps the checkpoint layout. `tx` itself
  when both are 1.
  """
  if model == 1 and head == 1:
    return tx
  scales = {'model': float(model), 'head': float(head)}

  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    return {
      k: jax.tree.map(lambda u, s=scales[k]: u * jnp.asarray(s, u.dtype), v)
      for k, v in updates.items()
    }, state

  return optax.GradientTransformation(tx.init, update)


def padded_num_classes(num_classes: int, mesh: Mesh) -> int:
  m = mesh.shape[shd.MODEL]
  return -(-num_classes // m) * m


WEIGHT_DECAY_MASKS = ('all', 'kernels')


def weight_decay_mask(kind: str) -> Callable[[Any], Any] | None:
  """Which parameters get weight decay.

  'all' (pycls/DOLG reference: every parameter), 'kernels' (only arrays with ndim >= 2: conv and
  dense kernels and the margin head; no BN scale/bias, biases or GeM p).
  """
  if kind == 'all':
    return None
  if kind == 'kernels':
    return lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  rules.fail('train.weight_decay_mask', kind, CONFIG_RULES['train.weight_decay_mask'].allowed)


OPTIMIZERS = ('sgd', 'adamw')
CONFIG_RULES = {
  'train.optimizer': rules.one_of(OPTIMIZERS),
  'train.weight_decay_mask': rules.one_of(WEIGHT_DECAY_MASKS),
  'train.weight_decay': rules.NON_NEGATIVE,
  'train.momentum': rules.UNIT_INTERVAL,
  'train.adam_b1': rules.UNIT_INTERVAL,
  'train.adam_b2': rules.UNIT_INTERVAL,
  'train.nesterov': rules.BOOL,
  'train.init_on_one_device': rules.BOOL,
  'train.backbone_init': rules.STRING,
}


def create_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer at unit learning rate (`train.optimizer`); the train step multiplies its
  update by the step's learning rate, an argument of the step.

  'sgd' (the paper): SGD with momentum, coupled L2 weight decay as in torch.optim.SGD.
  'adamw': Adam with decoupled weight decay (optax.adamw / torch.optim.AdamW; the CPU demo's).
  Weight decay on the parameters of `train.weight_decay_mask`. Design notes: docs/design_notes.md.
  """
  kind = train_cfg.optimizer
  decay = optax.add_decayed_weights(
    train_cfg.weight_decay, mask=weight_decay_mask(train_cfg.weight_decay_mask)
  )
  if kind == 'sgd':
    return optax.chain(
      decay, optax.sgd(1.0, momentum=train_cfg.momentum, nesterov=train_cfg.nesterov)
    )
  if kind == 'adamw':
    return optax.chain(
      optax.scale_by_adam(b1=train_cfg.adam_b1, b2=train_cfg.adam_b2), decay, optax.scale(-1.0)
    )
  rules.fail('train.optimizer', kind, CONFIG_RULES['train.optimizer'].allowed)


def init_variables(
  model: nn.Module,
  head_init: Callable,
  rng: jax.Array,
  image_size: int,
  num_classes_padded: int,
  embedding_dim: int,
) -> dict:
  """Model and head variables from `rng` (pure; jit it with out_shardings)."""
  model_rng, head_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  variables = model.init(model_rng, dummy, train=False)
  weight = head_init(head_rng, num_classes_padded, embedding_dim)
  return {
    'params': {'model': variables['params'], 'head': {'weight': weight}},
    'batch_stats': variables.get('batch_stats', {}),
  }


def state_shardings(mesh: Mesh, abstract_state: TrainState) -> TrainState:
  """Shardings of the train state: head weight (and its momentum) split over `model`."""
  param_sh = shd.param_shardings(mesh, abstract_state.params)
  rep = shd.replicated(mesh)

  def opt_spec(path, leaf):
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    # Optimizer leaves mirroring params end with the param path, e.g. (..., 'head', 'weight').
    if len(keys) >= 2 and keys[-2:] == ['head', 'weight'] and leaf.ndim == 2:
      return param_sh['head']['weight']
    return rep

  return TrainState(
    step=rep,
    params=param_sh,
    batch_stats=jax.tree.map(lambda _: rep, abstract_state.batch_stats),
    opt_state=jax.tree_util.tree_map_with_path(opt_spec, abstract_state.opt_state),
    head_t=rep,
  )


def _state_init_fn(setup: TrainSetup) -> Callable:
  c_pad = padded_num_classes(setup.num_classes, setup.mesh)
  config, tx = setup.config, setup.tx

  def init(rng):
    v = init_variables(
      setup.model,
      models.margins.init_head_weight,
      rng,
      config.data.image_size,
      c_pad,
      config.model.embedding_dim,
    )
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=v['params'],
      batch_stats=v['batch_stats'],
      opt_state=tx.init(v['params']),
      head_t=jnp.zeros((), jnp.float32),
    )

  return init


def create_train_state(setup: TrainSetup, rng: jax.Array) -> tuple[TrainState, TrainState]:
  """Initialises the state and places it in its mesh shardings. Returns (state, shardings).

  `config.train.init_on_one_device` (default True): the jitted initialiser runs on this process's
  first device, then the state is resharded (every process computes the same values from the same
  key); False: `jax.jit(init, out_shardings=...)` creates every shard in place.
  """
  init = _state_init_fn(setup)
  shardings = state_shardings(setup.mesh, jax.eval_shape(init, rng))
  if not setup.config.train.init_on_one_device:
    return jax.jit(init, out_shardings=shardings)(rng), shardings
  first_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  local = jax.jit(init, out_shardings=first_device)(rng)
  if jax.process_count() == 1:
    return jax.device_put(local, shardings, donate=True), shardings
  return shd.place(jax.device_get(local), shardings), shardings


def uncovered_backbone_leaves(variables: Any, backbone: Any) -> list[str]:
  """The model's `globalmodel` leaves (key strings) that `backbone` does not provide."""
  given = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(backbone)}
  return [
    k
    for k in (jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables))
    if "'globalmodel'" in k and k not in given
  ]


def load_backbone(state: TrainState, shardings: TrainState, path: str) -> TrainState:
  """Replaces the backbone (`globalmodel`) params and BN statistics with an ImageNet checkpoint.

  `path`: pycls .pyth, torchvision .pth, a DOLG checkpoint or a converted directory
  (dolg_jax.weights.backbone.load_backbone). Shapes must match the configured depth and width, and
  the file must provide every backbone variable of the model (a ValueError names the file).
  """
  current = {'params': state.params['model'], 'batch_stats': state.batch_stats}
  backbone = backbone_lib.load_backbone(path)
  missing = uncovered_backbone_leaves(current, backbone)
  if missing:  # E.g. a ResNet-50 file for a ResNet-101 model: its blocks are a subset.
    raise ValueError(
      f'{path}: the backbone lacks {len(missing)} of the model\'s backbone '
      f'variables (first: {missing[:3]}); it does not match config.model (depth, '
      f'stage_depths, width)'
    )
  merged = backbone_lib.merge_backbone(shd.host_replicated(current), backbone)
  target = {'params': shardings.params['model'], 'batch_stats': shardings.batch_stats}
  placed = shd.place(merged, {k: target[k] for k in merged})
  return state.replace(
    params={**state.params, 'model': placed['params']},
    batch_stats=placed.get('batch_stats', state.batch_stats),
  )


def abstract_train_state(setup: TrainSetup) -> tuple[TrainState, TrainState]:
  """Shape/dtype/sharding of the state without allocating it (target for restoring)."""
  abstract = jax.eval_shape(_state_init_fn(setup), jax.random.key(0))
  shardings = state_shardings(setup.mesh, abstract)
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  ), shardings
