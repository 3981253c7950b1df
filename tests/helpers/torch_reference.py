"""PyTorch reference of the official DOLG forward (feymanpriv/DOLG, pycls-based), for parity tests.

Written from the design notes' section 3 (shared/DESIGN.md beside the repository) (not copied). Module names are chosen so that
`state_dict()` keys are exactly the released checkpoint's:

  globalmodel.stem.{conv,bn}.*                    pycls ResStemIN (7x7/2 pad 3, BN, ReLU, maxpool 3/2 pad 1)
  globalmodel.s{1..4}.b{k}.f.{a,a_bn,b,b_bn,c,c_bn}.*   bottleneck (stride on the 3x3 conv `b`)
  globalmodel.s{i}.b1.{proj,bn}.*                 projection shortcut
  pool_g.p                                        GeM power (learnable variant only)
  fc_t.{weight,bias}, fc.{weight,bias}
  localmodel.{conv1,bn,conv2}.*
  localmodel.aspp.aspp.{0..3}.*, localmodel.aspp.im_pool.1.*, localmodel.aspp.conv_after.0.*  (optional)
  desc_cls.weight, desc_cls.t                     margin head (CurricularFace weight and EMA buffer `t`)

`DOLGReference.forward(x)` takes the official input (NCHW, BGR, /255, normalised with the BGR mean/std)
and returns `global_feature`: the 512-d descriptor before L2 normalisation. `preprocess_rgb` turns
float RGB [0, 255] NHWC images (what our Flax model takes) into that input.

Also: `ResNetBackbone` alone (pycls ImageNet checkpoint keys `stem/s{i}.b{j}`), `to_torchvision_state_dict`
(renames backbone tensors to torchvision ResNet keys) and `randomize_` (random weights + eval-mode BN
statistics that are neither 0/1 nor the batch statistics, so eval-mode BN is really tested).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BGR_MEAN = (0.406, 0.456, 0.485)
BGR_STD = (0.225, 0.224, 0.229)
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def _bn(c: int) -> nn.BatchNorm2d:
  return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class ResStemIN(nn.Module):
  """pycls ImageNet stem: conv 7x7/2 (pad 3, no bias), BN, ReLU, max-pool 3x3/2 (pad 1)."""

  def __init__(self, w_in: int, w_out: int):
    super().__init__()
    self.conv = nn.Conv2d(w_in, w_out, 7, stride=2, padding=3, bias=False)
    self.bn = _bn(w_out)
    self.relu = nn.ReLU(inplace=True)
    self.pool = nn.MaxPool2d(3, stride=2, padding=1)

  def forward(self, x):
    return self.pool(self.relu(self.bn(self.conv(x))))


class BottleneckTransform(nn.Module):
  """1x1 (w_in->w_b), 3x3 (stride), 1x1 (w_b->w_out); BN after each, ReLU after the first two."""

  def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
    super().__init__()
    self.a = nn.Conv2d(w_in, w_b, 1, stride=1, padding=0, bias=False)
    self.a_bn = _bn(w_b)
    self.a_relu = nn.ReLU(inplace=True)
    self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
    self.b_bn = _bn(w_b)
    self.b_relu = nn.ReLU(inplace=True)
    self.c = nn.Conv2d(w_b, w_out, 1, stride=1, padding=0, bias=False)
    self.c_bn = _bn(w_out)

  def forward(self, x):
    x = self.a_relu(self.a_bn(self.a(x)))
    x = self.b_relu(self.b_bn(self.b(x)))
    return self.c_bn(self.c(x))


class ResBlock(nn.Module):
  """Residual block x + f(x) with a projection shortcut (`proj`, `bn`) when the shape changes."""

  def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
    super().__init__()
    self.proj_block = (w_in != w_out) or (stride != 1)
    if self.proj_block:
      self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, padding=0, bias=False)
      self.bn = _bn(w_out)
    self.f = BottleneckTransform(w_in, w_out, stride, w_b)
    self.relu = nn.ReLU(inplace=True)

  def forward(self, x):
    shortcut = self.bn(self.proj(x)) if self.proj_block else x
    return self.relu(shortcut + self.f(x))


class ResStage(nn.Module):
  """`d` blocks named b1..bd; the first one carries the stride."""

  def __init__(self, w_in: int, w_out: int, stride: int, d: int, w_b: int):
    super().__init__()
    for i in range(d):
      self.add_module(
        f'b{i + 1}', ResBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, w_b)
      )

  def forward(self, x):
    for block in self.children():
      x = block(x)
    return x


class ResNetBackbone(nn.Module):
  """pycls ResNet-{50,101}-1x{width}d without the classifier; returns (s3 output, s4 output).

  `stage_depths` (4 block counts) overrides `depth` for small test models.
  """

  def __init__(self, depth: int = 50, width: int = 64, stage_depths: Sequence[int] = ()):
    super().__init__()
    d = tuple(stage_depths) or STAGE_DEPTHS[depth]
    self.stem = ResStemIN(3, width)
    w_in = width
    for i in range(4):
      w_b = width * 2**i
      w_out = 4 * w_b
      self.add_module(f's{i + 1}', ResStage(w_in, w_out, 1 if i == 0 else 2, d[i], w_b))
      w_in = w_out

  def forward(self, x):
    x = self.stem(x)
    x = self.s2(self.s1(x))
    x3 = self.s3(x)
    x4 = self.s4(x3)
    return x3, x4


class GeneralizedMeanPooling(nn.Module):
  """GeM: (mean(clamp(x, eps)^p))^(1/p); `p` is a (1,) Parameter when learnable (key `pool_g.p`)."""

  def __init__(self, p: float = 3.0, learnable: bool = True, eps: float = 1e-6):
    super().__init__()
    self.eps = eps
    if learnable:
      self.p = nn.Parameter(torch.ones(1) * p)
    else:
      self.p = float(p)

  def forward(self, x):
    x = x.clamp(min=self.eps).pow(self.p)
    return F.adaptive_avg_pool2d(x, 1).pow(1.0 / self.p)


class ASPP(nn.Module):
  """Multi-atrous block: [image pool, 1x1, 3x3 d6, d12, d18] -> concat -> 1x1 -> ReLU. No BN."""

  def __init__(
    self, in_c: int, dim: int = 512, out_c: int = 1024, rates: Sequence[int] = (6, 12, 18)
  ):
    super().__init__()
    branches = [nn.Conv2d(in_c, dim, 1, 1)]
    for r in rates:
      branches.append(nn.Conv2d(in_c, dim, 3, 1, padding=r, dilation=r))
    self.aspp = nn.ModuleList(branches)
    self.im_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_c, dim, 1, 1), nn.ReLU())
    self.conv_after = nn.Sequential(nn.Conv2d(dim * (len(branches) + 1), out_c, 1, 1), nn.ReLU())

  def forward(self, x):
    h, w = x.shape[2], x.shape[3]
    # The official code upsamples the 1x1 image-pool output by scale (h, w): a broadcast.
    outs = [
      F.interpolate(self.im_pool(x), scale_factor=(h, w), mode='bilinear', align_corners=False)
    ]
    outs += [branch(x) for branch in self.aspp]
    return self.conv_after(torch.cat(outs, 1))


class SpatialAttention2d(nn.Module):
  """Local branch: [ASPP] -> conv1 -> BN -> (L2-normalised features) * softplus(conv2(ReLU(.)))."""

  def __init__(
    self,
    in_c: int,
    dim: int = 1024,
    with_aspp: bool = False,
    aspp_dim: int = 512,
    rates: Sequence[int] = (6, 12, 18),
  ):
    super().__init__()
    self.with_aspp = with_aspp
    if with_aspp:
      self.aspp = ASPP(in_c, aspp_dim, dim, rates)
      in_c = dim
    self.conv1 = nn.Conv2d(in_c, dim, 1, 1)
    self.bn = _bn(dim)
    self.act1 = nn.ReLU()
    self.conv2 = nn.Conv2d(dim, 1, 1, 1)
    self.softplus = nn.Softplus(beta=1, threshold=20)

  def forward(self, x):
    if self.with_aspp:
      x = self.aspp(x)
    x = self.bn(self.conv1(x))
    feature_map_norm = F.normalize(x, p=2, dim=1)
    att_score = self.softplus(self.conv2(self.act1(x)))
    return att_score.expand_as(feature_map_norm) * feature_map_norm, att_score


class CurricularHead(nn.Module):
  """Holds the margin head's tensors only (`weight` (classes, dim) and the EMA buffer `t`)."""

  def __init__(self, dim: int, num_classes: int):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
    self.register_buffer('t', torch.zeros(1))


class DOLGReference(nn.Module):
  """The official DOLG model; `forward` returns `global_feature` (N, 512) before L2 normalisation."""

  def __init__(
    self,
    depth: int = 50,
    width: int = 64,
    with_aspp: bool = False,
    gem_p: float = 3.0,
    gem_p_learnable: bool = True,
    num_classes: int = 16,
    embedding_dim: int = 512,
    fusion_eps: float = 0.0,
    stage_depths: Sequence[int] = (),
  ):
    super().__init__()
    s3_dim, s4_dim = 16 * width, 32 * width
    self.s3_dim, self.s4_dim = s3_dim, s4_dim
    self.fusion_eps = fusion_eps  # The official code divides by |f_g|^2 with no epsilon.
    self.pool_l = nn.AdaptiveAvgPool2d((1, 1))
    self.pool_g = GeneralizedMeanPooling(gem_p, learnable=gem_p_learnable)
    self.fc_t = nn.Linear(s4_dim, s3_dim, bias=True)
    self.fc = nn.Linear(s4_dim, embedding_dim, bias=True)
    self.globalmodel = ResNetBackbone(depth, width, stage_depths)
    self.localmodel = SpatialAttention2d(s3_dim, s3_dim, with_aspp=with_aspp, aspp_dim=s3_dim // 2)
    self.desc_cls = CurricularHead(embedding_dim, num_classes)

  def forward_features(self, x) -> dict[str, torch.Tensor]:
    """The official forward, returning intermediates: res3, res4, f_g, f_o and the descriptor."""
    f3, f4 = self.globalmodel(x)
    fl, _ = self.localmodel(f3)
    fg_o = self.pool_g(f4).view(x.shape[0], self.s4_dim)
    fg = self.fc_t(fg_o)
    fg_norm = torch.norm(fg, p=2, dim=1)
    proj = torch.bmm(fg.unsqueeze(1), torch.flatten(fl, start_dim=2))
    proj = torch.bmm(fg.unsqueeze(2), proj).view(fl.size())
    proj = proj / (fg_norm * fg_norm + self.fusion_eps).view(-1, 1, 1, 1)
    fo = self.pool_l(fl - proj).view(x.shape[0], self.s3_dim)
    desc = self.fc(torch.cat((fg, fo), 1))
    return {'res3': f3, 'res4': f4, 'f_g': fg, 'f_o': fo, 'descriptor': desc}

  def forward(self, x):
    return self.forward_features(x)['descriptor']


def preprocess_rgb(images: np.ndarray) -> torch.Tensor:
  """(N, H, W, 3) RGB in [0, 255] -> the official input: NCHW, BGR, /255, BGR mean/std."""
  x = np.asarray(images, np.float32)[..., ::-1] / 255.0
  x = (x - np.asarray(BGR_MEAN, np.float32)) / np.asarray(BGR_STD, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def preprocess_rgb_torchvision(images: np.ndarray) -> torch.Tensor:
  """(N, H, W, 3) RGB in [0, 255] -> torchvision's input: NCHW, RGB, /255, RGB mean/std."""
  x = np.asarray(images, np.float32) / 255.0
  x = (x - np.asarray(BGR_MEAN[::-1], np.float32)) / np.asarray(BGR_STD[::-1], np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, calib_size: int = 96) -> nn.Module:
  """Random weights with realistic, perturbed BN running statistics (in place; returns `model`).

  Convs/Linears keep torch's default random init (seeded); BN gammas ~ U(0.5, 1.5), betas ~ N(0, 0.1).
  Running stats are first calibrated with one train-mode pass over random images (so activations stay
  well scaled through 100+ layers), then perturbed (mean + N(0, 0.1) * std, var * U(0.7, 1.4)) so the
  eval-mode result differs from batch-statistics normalisation. Biases get N(0, 0.05).
  """
  gen = torch.Generator().manual_seed(seed)
  torch.manual_seed(seed)
  for m in model.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      m.reset_parameters()
      if m.bias is not None:
        m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.05)
    elif isinstance(m, nn.BatchNorm2d):
      m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
      m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
      m.reset_running_stats()
      m.momentum = None  # Cumulative average: one pass sets the running stats to the batch stats.
  x = torch.rand(2, 3, calib_size, calib_size + 32, generator=gen) * 4 - 2
  model.train()
  model(x)
  model.eval()
  for m in model.modules():
    if isinstance(m, nn.BatchNorm2d):
      m.momentum = BN_MOMENTUM
      std = m.running_var.sqrt()
      m.running_mean.add_(torch.randn(m.running_mean.shape, generator=gen) * 0.1 * std)
      m.running_var.mul_(torch.rand(m.running_var.shape, generator=gen) * 0.7 + 0.7)
  if isinstance(model, DOLGReference):
    # With random weights |f_o| << |f_g| (f_o is an average of unit vectors times attention), so the
    # local branch would barely move the descriptor; rescale fc's f_o columns so both halves
    # contribute alike and a parity test on the descriptor also tests the local branch.
    feats = model.forward_features(x)
    s3 = model.s3_dim
    ratio = (feats['f_g'].norm(dim=1) / feats['f_o'].norm(dim=1).clamp(min=1e-12)).mean()
    model.fc.weight[:, s3:] *= ratio
  return model


def to_torchvision_state_dict(backbone_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Renames pycls backbone keys (`stem.*`, `s{i}.b{j}.*`) to torchvision ResNet keys.

  stem.conv -> conv1, stem.bn -> bn1, s{i}.b{j}.f.{a,b,c} -> layer{i}.{j-1}.conv{1,2,3},
  f.{a,b,c}_bn -> bn{1,2,3}, b1.proj -> downsample.0, b1.bn -> downsample.1. Adds a random `fc`
  (1000 classes), as torchvision checkpoints carry one, and `num_batches_tracked` entries.
  """
  out = {}
  for key, value in backbone_sd.items():
    if key.endswith('num_batches_tracked'):
      continue
    parts = key.split('.')
    if parts[0] == 'stem':
      new = ['conv1' if parts[1] == 'conv' else 'bn1'] + parts[2:]
    else:
      stage, block = int(parts[0][1:]), int(parts[1][1:]) - 1
      prefix = [f'layer{stage}', str(block)]
      if parts[2] == 'f':
        sub = {
          'a': 'conv1',
          'b': 'conv2',
          'c': 'conv3',
          'a_bn': 'bn1',
          'b_bn': 'bn2',
          'c_bn': 'bn3',
        }[parts[3]]
        new = prefix + [sub] + parts[4:]
      else:
        new = prefix + ['downsample', {'proj': '0', 'bn': '1'}[parts[2]]] + parts[3:]
    out['.'.join(new)] = value.clone()
    if new[-1] == 'running_var':
      out['.'.join(new[:-1] + ['num_batches_tracked'])] = torch.tensor(10)
  in_dim = backbone_sd['s4.b1.proj.weight'].shape[0]
  out['fc.weight'] = torch.randn(1000, in_dim) * 0.01
  out['fc.bias'] = torch.zeros(1000)
  return out
