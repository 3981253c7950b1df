"""DOLG: deep orthogonal fusion of local and global features (Yang et al., ICCV 2021).

Flax Linen, NHWC. `DOLG.__call__(images, train=False)` returns the (N, embedding_dim) float32
descriptor BEFORE L2 normalisation (the official `global_feature`). Images are RGB in [0, 255]
(float32 or uint8); normalisation happens inside the model.

Ablations (`c.model`: use_local_branch, use_multi_atrous, use_self_attention, fusion, global_pool,
local_stage) and SuperGlobal's inference-time modules (gem_plus_p, regional_gem, relu_plus; off by
default) are config fields, see configs/default.py. Conv kernels are HWIO, Dense kernels (in, out);
the margin head's weight lives outside this tree (margins.py). The full parameter tree with its
torch keys and the semantics of every option: docs/design_notes.md.
"""

import dataclasses
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dolg_jax import config_rules as rules
from dolg_jax.models import resnet
from dolg_jax.models.normalize import l2_normalize
from dolg_jax.models.normalize import wide_dtype
from dolg_jax.models.normalize import widen

Dtype = Any

# ImageNet statistics in RGB order (the official model: the same numbers in BGR order, BGR input).
RGB_MEAN = (0.485, 0.456, 0.406)
RGB_STD = (0.229, 0.224, 0.225)

FUSIONS = ('orthogonal', 'concat', 'hadamard')
GLOBAL_POOLS = ('gem', 'gap')
LOCAL_STAGES = ('res3', 'res4', 'both')

# pycls Linear init (normal std 0.01, zero bias); used for fc_t and fc with dense_init='pycls'.
dense_kernel_init = nn.initializers.normal(0.01)
DENSE_INITS = ('pycls', 'torch')
# The choices of the model's string fields (config.model.NAME).
CHOICE_RULES = {
  'fusion': rules.one_of(FUSIONS),
  'dense_init': rules.one_of(DENSE_INITS),
  'bn_running_var': resnet.RUNNING_VAR_RULE,
  'global_pool': rules.one_of(GLOBAL_POOLS),
  'local_stage': rules.one_of(LOCAL_STAGES),
}


def torch_linear_inits(fan_in: int):
  """torch.nn.Linear's default init: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  (kaiming_uniform with a = sqrt(5) for the weight gives exactly this bound.) What fc_t and fc of
  the official DOLG model start from: its init_weights is applied to the ResNet trunk only.
  """
  bound = 1.0 / math.sqrt(fan_in)
  uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(
    key, shape, dtype, -bound, bound
  )
  return uniform, uniform


def head_dense(
  features: int,
  fan_in: int,
  dense_init: str = 'pycls',
  name: Optional[str] = None,
  dtype: Dtype = jnp.float32,
) -> nn.Dense:
  """fc_t / fc: float32 (`dtype`, float64 for a float64 model) whatever the compute dtype (tiny,
  feeds the loss); init by `dense_init`."""
  if dense_init == 'torch':
    kernel_init, bias_init = torch_linear_inits(fan_in)
  else:
    kernel_init, bias_init = dense_kernel_init, nn.initializers.zeros
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=bias_init,
    name=name,
  )


# ------------------------------------------------------------------------------ pure functions
def normalize_images(images: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
  """RGB [0, 255] (float or uint8) -> ImageNet-normalised `dtype` (float32), as the official BGR
  pipeline."""
  x = images.astype(dtype) / 255.0
  mean = jnp.asarray(RGB_MEAN, dtype)
  std = jnp.asarray(RGB_STD, dtype)
  return (x - mean) / std


def masked_mean(
  x: jax.Array, mask: Optional[jax.Array] = None, keepdims: bool = False
) -> jax.Array:
  """Mean over H, W of an NHWC map, float32; with an (N, H, W, 1) 0/1 mask, over its cells only."""
  x = widen(x)
  if mask is None:
    return jnp.mean(x, axis=(1, 2), keepdims=keepdims)
  mask = mask.astype(x.dtype)
  return jnp.sum(x * mask, axis=(1, 2), keepdims=keepdims) / jnp.sum(
    mask, axis=(1, 2), keepdims=keepdims
  )


def gem_pool(
  x: jax.Array, p: jax.Array | float, eps: float = 1e-6, mask: Optional[jax.Array] = None
) -> jax.Array:
  """Generalised-mean pooling over H, W of an NHWC map: mean(clamp(x, eps)^p)^(1/p), float32."""
  return masked_mean(jnp.maximum(widen(x), eps) ** p, mask) ** (1.0 / p)


def _reflect(i: jax.Array, n: jax.Array) -> jax.Array:
  """Reflection (edge not repeated, period 2 (n - 1)) of indices i into [0, n); n = 1 -> 0."""
  period = jnp.maximum(2 * (n - 1), 1)
  j = jnp.mod(i, period)
  return jnp.where(n > 1, jnp.minimum(j, period - j), 0)


def regional_gem(
  x: jax.Array, p: float = 2.5, size: int = 5, mask: Optional[jax.Array] = None
) -> jax.Array:
  """SuperGlobal's regional-GeM (`rgem`): 0.5 * LPPool_p(ReflectionPad(x / size^(2/p))) + 0.5 x.

  LP pooling over size x size windows, stride 1, after reflection padding of (size - 1) // 2:
  (sum_window (x / size^(2/p))^p)^(1/p) = (mean_window x^p)^(1/p), a local GeM. x: NHWC, >= 0
  (a post-ReLU map). With a mask (padded canvases), each image reflects at its own valid border,
  so valid cells equal the unpadded computation. Where a side has fewer than size // 2 + 1 cells,
  torch's ReflectionPad2d refuses; here the reflection repeats (period 2 (n - 1)).
  """
  x = widen(x)
  n, h, w, _ = x.shape
  if mask is None:
    hv = jnp.full((n,), h, jnp.int32)
    wv = jnp.full((n,), w, jnp.int32)
  else:
    hv = jnp.sum(mask[:, :, 0, 0] > 0, axis=1).astype(jnp.int32)
    wv = jnp.sum(mask[:, 0, :, 0] > 0, axis=1).astype(jnp.int32)
  y = x**p
  r = (size - 1) // 2
  rows = jnp.arange(h)[None, :]
  cols = jnp.arange(w)[None, :]
  acc = jnp.zeros_like(y)
  for d in range(-r, size - r):  # box sum over rows (reflected per image)
    idx = _reflect(rows + d, hv[:, None])  # (n, h)
    acc = acc + jnp.take_along_axis(y, idx[:, :, None, None], axis=1)
  out = jnp.zeros_like(y)
  for d in range(-r, size - r):  # then over columns
    idx = _reflect(cols + d, wv[:, None])  # (n, w)
    out = out + jnp.take_along_axis(acc, idx[:, None, :, None], axis=2)
  return 0.5 * (out / (size * size)) ** (1.0 / p) + 0.5 * x


def avg_pool(x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
  """Global average pooling over H, W of an NHWC map (the mask's cells only), float32."""
  return masked_mean(x, mask)


def orthogonal_component(f_l: jax.Array, f_g: jax.Array, eps: float) -> jax.Array:
  """f_l minus its projection on f_g: f_l - (f_l . f_g) / (|f_g|^2 + eps) * f_g.

  f_l: (N, ..., C) local vectors (a map (N, H, W, C) or pooled (N, C)); f_g: (N, C).
  """
  f_l, f_g = widen(f_l), widen(f_g)
  g = f_g.reshape(f_g.shape[:1] + (1,) * (f_l.ndim - 2) + f_g.shape[1:])
  dot = jnp.sum(f_l * g, axis=-1, keepdims=True)
  sq_norm = jnp.sum(jnp.square(g), axis=-1, keepdims=True)
  return f_l - dot / (sq_norm + eps) * g


def orthogonal_fusion(f_l: jax.Array, f_g: jax.Array, eps: float) -> jax.Array:
  """The official fusion: concat[f_g, avgpool(f_l - proj_{f_g}(f_l))] -> (N, 2C).

  f_l: (N, H, W, C) map. Pooling is linear and the projection is linear in f_l, so this equals
  projecting the pooled vector once (`orthogonal_fusion_pooled`), which the model uses.
  """
  f_o = avg_pool(orthogonal_component(f_l, f_g, eps))
  return jnp.concatenate([widen(f_g), f_o], axis=-1)


def orthogonal_fusion_pooled(f_l_pooled: jax.Array, f_g: jax.Array, eps: float) -> jax.Array:
  """Same as `orthogonal_fusion` given avgpool(f_l) (N, C) instead of the map."""
  f_o = orthogonal_component(f_l_pooled, f_g, eps)
  return jnp.concatenate([widen(f_g), f_o], axis=-1)


def concat_fusion(f_l_pooled: jax.Array, f_g: jax.Array) -> jax.Array:
  """Ablation: concat[f_g, avgpool(f_l)] -> (N, C_g + C_l)."""
  return jnp.concatenate([widen(f_g), widen(f_l_pooled)], axis=-1)


def hadamard_fusion(f_l_pooled: jax.Array, f_g: jax.Array) -> jax.Array:
  """Ablation: element-wise product f_g * avgpool(f_l) -> (N, C)."""
  return widen(f_g) * widen(f_l_pooled)


# ------------------------------------------------------------------------------ modules
GEM_PLUS_EPS = 1e-8  # SuperGlobal's gemp clamp


class GeM(nn.Module):
  """GeM pooling; with `learnable`, p is the param `p` of shape (1,) (torch `pool_g.p`).

  test_p > 0: SuperGlobal's GeM+, the power test_p (clamp 1e-8) instead of p (the param, if any,
  stays in the tree, unused).
  """

  p: float = 3.0
  learnable: bool = False
  eps: float = 1e-6
  test_p: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    p = self.p
    if self.learnable:
      p = self.param('p', nn.initializers.constant(self.p), (1,), jnp.float32)
    if self.test_p > 0:
      return gem_pool(x, self.test_p, GEM_PLUS_EPS, mask)
    return gem_pool(x, p, self.eps, mask)


def _conv_bias(
  features: int, kernel_size: int, name: str, dtype: Dtype, dilation: int = 1
) -> nn.Conv:
  return resnet.conv(
    features, kernel_size, dilation=dilation, use_bias=True, dtype=dtype, name=name
  )


class MultiAtrous(nn.Module):
  """The official `ASPP`: image-pool branch FIRST, a 1x1 branch, 3x3 branches with dilations
  `rates` (padding = dilation), concat -> 1x1 conv -> ReLU. All convs have a bias; no BN."""

  rates: Sequence[int] = (6, 12, 18)
  branch_dim: int = 512
  out_dim: int = 1024
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """mask: optional (N, H, W, 1) cells of x that the image covers (x is zero elsewhere)."""
    n, h, w, _ = x.shape
    pooled = masked_mean(x, mask, keepdims=True).astype(self.dtype)
    im = nn.relu(_conv_bias(self.branch_dim, 1, 'im_pool', self.dtype)(pooled))
    # Bilinear upsampling of a 1x1 map (align_corners=False) is a broadcast.
    outs = [jnp.broadcast_to(im, (n, h, w, self.branch_dim))]
    outs.append(_conv_bias(self.branch_dim, 1, 'aspp_0', self.dtype)(x))
    for j, r in enumerate(self.rates):
      outs.append(_conv_bias(self.branch_dim, 3, f'aspp_{j + 1}', self.dtype, dilation=int(r))(x))
    y = jnp.concatenate(outs, axis=-1)
    return nn.relu(_conv_bias(self.out_dim, 1, 'conv_after', self.dtype)(y))


class LocalBranch(nn.Module):
  """The official `localmodel`: optional multi-atrous block, then the self-attention
  (conv1 -> bn; f = L2norm_c(bn); att = softplus(conv2(relu(bn))); f_l = att * f).

  Returns f_l as a float32 (N, H, W, local_dim) map.
  """

  use_multi_atrous: bool = True
  atrous_rates: Sequence[int] = (6, 12, 18)
  atrous_dim: int = 512
  local_dim: int = 1024
  use_self_attention: bool = True
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  bn_running_var: str = 'unbiased'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: Optional[jax.Array] = None) -> jax.Array:
    if self.use_multi_atrous:
      x = MultiAtrous(self.atrous_rates, self.atrous_dim, self.local_dim, self.dtype, name='aspp')(
        resnet.apply_mask(x, mask), mask
      )
    if not self.use_self_attention:
      if x.shape[-1] != self.local_dim:
        raise ValueError(
          f'model.use_self_attention=False without multi-atrous uses the backbone map as f_l, '
          f'which has {x.shape[-1]} channels but model.local_dim={self.local_dim}; use '
          f"local_stage='res3' with local_dim=1024 or enable use_multi_atrous."
        )
      return widen(x)
    x = _conv_bias(self.local_dim, 1, 'conv1', self.dtype)(x)
    x = resnet.batch_norm(
      'bn',
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      running_var=self.bn_running_var,
    )(x, use_running_average=not train)
    features = l2_normalize(widen(x), axis=-1)
    att = nn.softplus(widen(_conv_bias(1, 1, 'conv2', self.dtype)(nn.relu(x))))
    return att * features


def _model(architecture: bool = False) -> Any:
  """A DOLG attribute set from the config.model field of its name (no default here)."""
  return dataclasses.field(metadata={'config': 'model', 'architecture': architecture})


def _eval(off: Any) -> Any:
  """A DOLG attribute set from the config.eval field of its name at evaluation; `off` before."""
  return dataclasses.field(default=off, metadata={'config': 'eval'})


def config_fields(section: str, architecture: bool = False) -> tuple[str, ...]:
  """The DOLG attributes set from config.`section` ('model' or 'eval'), in declaration order;
  with `architecture`, only those that shape the variables or the computation."""
  return tuple(
    f.name
    for f in dataclasses.fields(DOLG)
    if f.metadata.get('config') == section and (f.metadata.get('architecture') or not architecture)
  )


class DOLG(nn.Module):
  """DOLG retrieval model: ResNet trunk + local branch + GeM global branch + fusion + fc.

  RGB images in [0, 255], NHWC -> the float32 descriptor before L2 normalisation; with
  `return_features=True`, (descriptor, intermediates): 'res3', 'res4' (backbone maps, compute
  dtype, strides 16 and 32), 'pooled_g' (global pool of res4, float32), 'f_g' (fc_t(pooled_g)),
  'f_l/<branch>' (each local branch's float32 map), 'local_vec' (f_o or avgpool(f_l), mean over
  branches) and 'fused' (the input of fc). Parameter tree and options: docs/design_notes.md.
  """

  # config.model fields (same names; documented and defaulted in configs/default.py only);
  # `_model(architecture=True)`: shapes the variables or the computation (init_checkpoint compares).
  depth: int = _model(architecture=True)
  width: int = _model(architecture=True)
  stage_depths: Sequence[int] = _model(architecture=True)
  use_local_branch: bool = _model(architecture=True)
  local_stage: str = _model(architecture=True)
  use_multi_atrous: bool = _model(architecture=True)
  atrous_rates: Sequence[int] = _model(architecture=True)
  atrous_dim: int = _model(architecture=True)
  local_dim: int = _model(architecture=True)
  use_self_attention: bool = _model(architecture=True)
  fusion: str = _model(architecture=True)
  global_pool: str = _model(architecture=True)
  gem_p: float = _model()
  gem_p_learnable: bool = _model(architecture=True)
  global_dim: int = _model(architecture=True)
  embedding_dim: int = _model(architecture=True)
  fusion_eps: float = _model()
  bn_momentum: float = _model()
  bn_epsilon: float = _model()
  bn_running_var: str = _model()
  zero_init_final_gamma: bool = _model()
  dense_init: str = _model()
  dtype: Dtype = jnp.float32
  # config.eval fields set at evaluation (`evaluate.with_overrides`); off here, so a model built
  # from config.model alone is the trained one.
  gem_plus_p: float = _eval(0.0)
  regional_gem: bool = _eval(False)
  relu_plus: float = _eval(0.0)
  # SuperGlobal's regional GeM constants (no config field).
  regional_gem_p: float = 2.5
  regional_gem_size: int = 5

  def check(self) -> None:
    """Raises ValueError naming the config field when the configuration is inconsistent."""
    for name, rule in CHOICE_RULES.items():
      rules.check_value(f'model.{name}', getattr(self, name), rule)
    if (
      self.use_local_branch
      and self.fusion in ('orthogonal', 'hadamard')
      and self.local_dim != self.global_dim
    ):
      raise ValueError(
        f'model.fusion={self.fusion!r} needs model.local_dim == model.global_dim, '
        f'got {self.local_dim} and {self.global_dim}'
      )
    if self.gem_plus_p < 0 or (self.gem_plus_p > 0 and self.global_pool != 'gem'):
      raise ValueError(
        f'model.gem_plus_p={self.gem_plus_p} needs a value >= 0 and '
        f"global_pool='gem' (got {self.global_pool!r}); 0 turns GeM+ off"
      )
    if self.regional_gem and (self.regional_gem_p <= 0 or self.regional_gem_size < 1):
      raise ValueError(
        f'model.regional_gem_p must be > 0 and model.regional_gem_size >= 1; got '
        f'{self.regional_gem_p}, {self.regional_gem_size}'
      )
    if self.relu_plus < 0:
      raise ValueError(f'model.relu_plus must be >= 0 (0 = ReLU); got {self.relu_plus}')

  @nn.compact
  def __call__(
    self,
    images: jax.Array,
    train: bool = False,
    return_features: bool = False,
    valid_hw: Optional[jax.Array] = None,
  ):
    """valid_hw: optional (N, 2) int (height, width) of each image inside `images`, a batch of
    top-left anchored canvases padded with anything: the result is then what each unpadded image
    alone gives (up to float rounding), so images of different sizes share one compiled shape.
    Inference only: ValueError with train=True (BatchNorm batch statistics would see the padding).
    ValueError (`check`) for an inconsistent configuration."""
    self.check()
    if valid_hw is not None and train:
      raise ValueError(
        'valid_hw (padded canvases) is for inference; train=True would let the '
        'padding into the BatchNorm batch statistics'
      )
    feats = {}
    x = normalize_images(images, wide_dtype(self.dtype)).astype(self.dtype)
    res3, res4 = resnet.ResNet(
      self.depth,
      self.width,
      tuple(self.stage_depths),
      self.bn_momentum,
      self.bn_epsilon,
      self.dtype,
      zero_init_final_gamma=self.zero_init_final_gamma,
      relu_plus=self.relu_plus,
      bn_running_var=self.bn_running_var,
      name='globalmodel',
    )(x, train, valid_hw)
    feats['res3'], feats['res4'] = res3, res4
    masks = {
      'res3': resnet.valid_mask(valid_hw, 16, res3),
      'res4': resnet.valid_mask(valid_hw, 32, res4),
    }

    # Global branch (float32 from the pooling on).
    g_map = res4
    if self.regional_gem:
      g_map = regional_gem(res4, self.regional_gem_p, self.regional_gem_size, masks['res4'])
    if self.global_pool == 'gem':
      pooled_g = GeM(self.gem_p, self.gem_p_learnable, test_p=self.gem_plus_p, name='pool_g')(
        g_map, masks['res4']
      )
    else:
      pooled_g = avg_pool(g_map, masks['res4'])
    f_g = self._dense(self.global_dim, 'fc_t', pooled_g.shape[-1])(pooled_g)
    feats['pooled_g'], feats['f_g'] = pooled_g, f_g

    if not self.use_local_branch:
      fused = f_g
    else:
      inputs = {
        'res3': [('localmodel', 'res3')],
        'res4': [('localmodel', 'res4')],
        'both': [('localmodel', 'res3'), ('localmodel_res4', 'res4')],
      }[self.local_stage]
      local_vecs = []
      for name, stage in inputs:
        f_l = LocalBranch(
          self.use_multi_atrous,
          tuple(self.atrous_rates),
          self.atrous_dim,
          self.local_dim,
          self.use_self_attention,
          self.bn_momentum,
          self.bn_epsilon,
          self.dtype,
          bn_running_var=self.bn_running_var,
          name=name,
        )(feats[stage], train, masks[stage])
        feats[f'f_l/{name}'] = f_l
        v = avg_pool(f_l, masks[stage])
        if self.fusion == 'orthogonal':
          v = orthogonal_component(v, f_g, self.fusion_eps)
        local_vecs.append(v)
      local_vec = sum(local_vecs) / len(local_vecs)
      feats['local_vec'] = local_vec  # f_o for orthogonal fusion, avgpool(f_l) otherwise.
      if self.fusion == 'hadamard':
        fused = hadamard_fusion(local_vec, f_g)
      else:  # orthogonal (local_vec is already f_o) or concat.
        fused = concat_fusion(local_vec, f_g)
    feats['fused'] = fused
    desc = self._dense(self.embedding_dim, 'fc', fused.shape[-1])(fused)
    return (desc, feats) if return_features else desc

  def _dense(self, features: int, name: str, fan_in: int) -> nn.Dense:
    return head_dense(features, fan_in, self.dense_init, name=name, dtype=wide_dtype(self.dtype))
