"""ResNet-50/101 in the pycls form (stride on the 3x3 conv `b`), with torch-equivalent padding.

Flax's 'SAME' padding is asymmetric on even inputs with stride 2 (it pads more at the end), while
torch pads k // 2 on both sides; every conv and the max-pool here use explicit symmetric padding so
that converted torch weights give the same numbers. Module names mirror the pycls keys (see
docs/design_notes.md, dolg.py, for the full tree): `stem` {conv, bn}, stages `s1..s4`, blocks
`b1..bK`, in a block `a, a_bn, b, b_bn, c, c_bn` and the projection shortcut `proj, bn` (first
block of a stage).

Initialisation follows pycls: conv kernels normal(0, sqrt(2 / fan_out)), BN scale 1 and bias 0;
with `zero_init_final_gamma` (pycls BN.ZERO_INIT_FINAL_GAMMA, set by the official DOLG yaml) the
scale of each block's last BN (`c_bn`) starts at 0, so every residual block starts as identity.
"""

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dolg_jax import config_rules as rules

Dtype = Any

STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
DEPTH_RULE = rules.one_of(tuple(sorted(STAGE_DEPTHS)))

# pycls init: normal(0, sqrt(2 / fan_out)) where fan_out = kh * kw * out_channels.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def torch_padding(kernel_size: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """Symmetric padding used by torch for a `kernel_size` conv: dilation * (k // 2) on each side."""
  p = dilation * (kernel_size // 2)
  return ((p, p), (p, p))


def conv(
  features: int,
  kernel_size: int,
  *,
  stride: int = 1,
  dilation: int = 1,
  use_bias: bool = False,
  dtype: Dtype = jnp.float32,
  name: str | None = None,
  kernel_init=conv_kernel_init,
) -> nn.Conv:
  """A torch-padded 2-D convolution (float32 params, `dtype` compute)."""
  return nn.Conv(
    features,
    (kernel_size, kernel_size),
    strides=(stride, stride),
    padding=torch_padding(kernel_size, dilation),
    kernel_dilation=(dilation, dilation),
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    name=name,
  )


def max_pool_torch(x: jax.Array, window: int = 3, stride: int = 2) -> jax.Array:
  """torch.nn.MaxPool2d(window, stride, padding=window // 2): pads with -inf on both sides."""
  p = window // 2
  # nn.max_pool pads with -inf and lowers to the differentiable max reduce-window.
  return nn.max_pool(x, (window, window), strides=(stride, stride), padding=((p, p), (p, p)))


BN_RUNNING_VARS = ('unbiased', 'biased')
RUNNING_VAR_RULE = rules.one_of(BN_RUNNING_VARS)


class BatchNorm(nn.Module):
  """BatchNorm over N, H, W (NHWC) with torch's running-variance estimate by default.

  Train mode normalises with the batch mean and the biased batch variance (two-pass, in float32 or
  wider) and, when `batch_stats` is mutable, updates
    mean <- momentum mean + (1 - momentum) batch_mean
    var  <- momentum var  + (1 - momentum) batch_var * (n / (n - 1 if running_var == 'unbiased'
                                                             else n)),   n = N H W,
  'unbiased' being torch.nn.BatchNorm2d's (and so the official trainer's) estimate and 'biased'
  flax.linen.BatchNorm's. Variables as flax's: params `scale`, `bias`; batch_stats `mean`, `var`.
  Flax has no option for the unbiased estimate, hence this module.
  """

  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  running_var: str = 'unbiased'
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    rules.check_value('model.bn_running_var', self.running_var, RUNNING_VAR_RULE)
    c = x.shape[-1]
    wide = jnp.promote_types(self.dtype, jnp.float32)
    scale = self.param('scale', self.scale_init, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xw = x.astype(wide)
    if use_running_average:
      mean, var = ra_mean.value.astype(wide), ra_var.value.astype(wide)
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xw, axis=axes)
      var = jnp.mean(jnp.square(xw - mean), axis=axes)
      if not self.is_initializing() and self.is_mutable_collection('batch_stats'):
        n = math.prod(x.shape[:-1])
        correction = n / (n - 1) if self.running_var == 'unbiased' and n > 1 else 1.0
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * (var * correction)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale.astype(wide)
    return ((xw - mean) * mul + bias.astype(wide)).astype(self.dtype)


def batch_norm(
  name: str,
  *,
  momentum: float,
  epsilon: float,
  dtype: Dtype,
  running_var: str = 'unbiased',
  scale_init=nn.initializers.ones,
) -> BatchNorm:
  return BatchNorm(
    momentum=momentum,
    epsilon=epsilon,
    dtype=dtype,
    running_var=running_var,
    scale_init=scale_init,
    name=name,
  )


def valid_mask(valid_hw: Optional[jax.Array], stride: int, x: jax.Array) -> Optional[jax.Array]:
  """(N, h, w, 1) 0/1 mask of the cells of the stride-`stride` map `x` that the image covers.

  valid_hw: (N, 2) int heights and widths of the images inside a larger, top-left anchored,
  zero-padded canvas (None: no padding). With torch padding every stride-2 layer maps a side n to
  ceil(n / 2), so the image covers the first ceil(n / stride) cells of each side.
  """
  if valid_hw is None:
    return None
  vh = -(-valid_hw[:, 0] // stride)
  vw = -(-valid_hw[:, 1] // stride)
  rows = jnp.arange(x.shape[1])[None, :, None] < vh[:, None, None]
  cols = jnp.arange(x.shape[2])[None, None, :] < vw[:, None, None]
  return (rows & cols)[..., None].astype(x.dtype)


def apply_mask(x: jax.Array, mask: Optional[jax.Array]) -> jax.Array:
  """Zeroes the padding so that a following spatial conv sees torch's zero padding there."""
  return x if mask is None else x * mask


class ResStem(nn.Module):
  """pycls ResStemIN: 7x7/2 conv (pad 3), BN, ReLU, 3x3/2 max-pool (pad 1)."""

  width: int
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  bn_running_var: str = 'unbiased'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, valid_hw: Optional[jax.Array] = None) -> jax.Array:
    x = apply_mask(x, valid_mask(valid_hw, 1, x))
    x = conv(self.width, 7, stride=2, dtype=self.dtype, name='conv')(x)
    x = batch_norm(
      'bn',
      momentum=self.bn_momentum,
      epsilon=self.bn_epsilon,
      dtype=self.dtype,
      running_var=self.bn_running_var,
    )(x, use_running_average=not train)
    # After the ReLU every value is >= 0, so zeros in the padding act as the pool's -inf padding.
    x = apply_mask(nn.relu(x), valid_mask(valid_hw, 2, x))
    return max_pool_torch(x, 3, 2)


def relu_floor(x: jax.Array, floor: float = 0.0) -> jax.Array:
  """ReLU, or with floor > 0 SuperGlobal's ReLU+: x.clamp(min=floor)."""
  return nn.relu(x) if floor == 0 else jnp.maximum(x, jnp.asarray(floor, x.dtype))


class ResBottleneckBlock(nn.Module):
  """pycls ResBottleneckBlock: 1x1 -> 3x3 (stride) -> 1x1, each with BN; projection if needed.

  inner_floor / out_floor: the floor of the two inner activations and of the block output's
  activation (0 = ReLU; > 0 = ReLU+, see ResNet.relu_plus).
  """

  inner_width: int
  out_width: int
  stride: int = 1
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  zero_init_final_gamma: bool = False
  inner_floor: float = 0.0
  out_floor: float = 0.0
  bn_running_var: str = 'unbiased'

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, valid_hw: Optional[jax.Array] = None, in_stride: int = 1
  ) -> jax.Array:
    """valid_hw / in_stride: image sizes in a padded canvas, the stride of `x` (see valid_mask)."""

    def bn(name, scale_init=nn.initializers.ones):
      return batch_norm(
        name,
        momentum=self.bn_momentum,
        epsilon=self.bn_epsilon,
        dtype=self.dtype,
        running_var=self.bn_running_var,
        scale_init=scale_init,
      )

    ura = not train
    shortcut = x
    if x.shape[-1] != self.out_width or self.stride != 1:
      shortcut = conv(self.out_width, 1, stride=self.stride, dtype=self.dtype, name='proj')(x)
      shortcut = bn('bn')(shortcut, use_running_average=ura)
    y = conv(self.inner_width, 1, dtype=self.dtype, name='a')(x)
    y = relu_floor(bn('a_bn')(y, use_running_average=ura), self.inner_floor)
    y = apply_mask(y, valid_mask(valid_hw, in_stride, y))
    y = conv(self.inner_width, 3, stride=self.stride, dtype=self.dtype, name='b')(y)
    y = relu_floor(bn('b_bn')(y, use_running_average=ura), self.inner_floor)
    y = conv(self.out_width, 1, dtype=self.dtype, name='c')(y)
    y = bn('c_bn', nn.initializers.zeros if self.zero_init_final_gamma else nn.initializers.ones)(
      y, use_running_average=ura
    )
    return relu_floor(shortcut + y, self.out_floor)


class ResStage(nn.Module):
  """A stage of `num_blocks` bottleneck blocks `b1..bK`; the first one strides and projects."""

  inner_width: int
  num_blocks: int
  stride: int
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  zero_init_final_gamma: bool = False
  inner_floor: float = 0.0
  out_floor: float = 0.0
  bn_running_var: str = 'unbiased'

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, valid_hw: Optional[jax.Array] = None, in_stride: int = 1
  ) -> jax.Array:
    for k in range(self.num_blocks):
      x = ResBottleneckBlock(
        self.inner_width,
        4 * self.inner_width,
        self.stride if k == 0 else 1,
        self.bn_momentum,
        self.bn_epsilon,
        self.dtype,
        zero_init_final_gamma=self.zero_init_final_gamma,
        inner_floor=self.inner_floor,
        out_floor=self.out_floor,
        bn_running_var=self.bn_running_var,
        name=f'b{k + 1}',
      )(x, train, valid_hw, in_stride if k == 0 else in_stride * self.stride)
    return x


class ResNet(nn.Module):
  """pycls ResNet trunk (no head). Returns the res3 (stride 16) and res4 (stride 32) maps.

  Attributes:
    depth: 50 or 101 (or 152); ignored when `stage_depths` is given.
    width: stem width; stage i (1-based) has inner width width * 2**(i-1) and output 4x that.
    stage_depths: optional explicit block counts per stage (e.g. (1, 1, 1, 1) for tiny tests).
    zero_init_final_gamma: each block's last BN scale starts at 0 (pycls option).
    relu_plus: 0 (ReLU everywhere, pycls) or SuperGlobal's ReLU+ floor (0.014): where the
      released SuperGlobal ResNet clamps with it, i.e. the block-output activations of stages 1-3
      (stage 4 keeps ReLU) and the two inner activations of the stage-1 blocks (its code passes
      the truthy `relup` class as the flag there).
  """

  depth: int = 50
  width: int = 64
  stage_depths: Sequence[int] = ()
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  zero_init_final_gamma: bool = False
  relu_plus: float = 0.0
  bn_running_var: str = 'unbiased'  # 'unbiased' (torch, official) | 'biased' (flax): BatchNorm.

  def block_counts(self) -> tuple[int, ...]:
    if self.stage_depths:
      if len(self.stage_depths) != 4:
        raise ValueError(f'model.stage_depths must have 4 entries, got {self.stage_depths!r}')
      return tuple(int(d) for d in self.stage_depths)
    return STAGE_DEPTHS[rules.check_value('model.depth', self.depth, DEPTH_RULE)]

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool = False, valid_hw: Optional[jax.Array] = None
  ) -> tuple[jax.Array, jax.Array]:
    """valid_hw: optional (N, 2) image sizes inside a zero-padded canvas (see valid_mask); the
    cells the images cover then hold exactly what unpadded images would give."""
    x = ResStem(
      self.width,
      self.bn_momentum,
      self.bn_epsilon,
      self.dtype,
      bn_running_var=self.bn_running_var,
      name='stem',
    )(x, train, valid_hw)
    feats = []
    stride = 4
    for i, n_blocks in enumerate(self.block_counts()):
      stage_stride = 1 if i == 0 else 2
      x = ResStage(
        self.width * 2**i,
        n_blocks,
        stage_stride,
        self.bn_momentum,
        self.bn_epsilon,
        self.dtype,
        zero_init_final_gamma=self.zero_init_final_gamma,
        inner_floor=self.relu_plus if i == 0 else 0.0,
        out_floor=self.relu_plus if i < 3 else 0.0,
        bn_running_var=self.bn_running_var,
        name=f's{i + 1}',
      )(x, train, valid_hw, stride)
      stride *= stage_stride
      feats.append(x)
    return feats[2], feats[3]
