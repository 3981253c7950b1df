"""Margin heads as pure functions: ArcFace (paper) and CurricularFace (released DOLG code).

`arcface_logits(embeddings, weight, labels)` -> logits and `curricularface_logits(..., t)` ->
(logits, the updated t) take embeddings (N, dim) and the head weight (num_classes, dim) (torch
layout, the class dimension first so it can be split over the `model` mesh axis), L2-normalise
both and compute in float32 (float64 for float64 inputs: `normalize.wide_dtype`), the matmul at
`Precision.HIGHEST`. Also `init_head_weight`, `cosine_logits`, `accuracy`, and `CONFIG_RULES` of
the `head.*` fields. Design notes: docs/design_notes.md.
"""

import math

import jax
import jax.numpy as jnp

from dolg_jax import config_rules as rules
from dolg_jax.models.normalize import l2_normalize
from dolg_jax.models.normalize import widen

HEAD_INIT_STD = 0.01
HEAD_TYPES = ('arcface', 'curricularface')  # the choices of config.head.type
CONFIG_RULES = {
  'head.type': rules.one_of(HEAD_TYPES),
  'head.scale': rules.POSITIVE,
  'head.margin': rules.NON_NEGATIVE,
  'head.t_momentum': rules.UNIT_INTERVAL,
  'head.num_classes': rules.NON_NEGATIVE_INT,
}


def init_head_weight(rng: jax.Array, num_classes: int, dim: int, dtype=jnp.float32) -> jax.Array:
  """(num_classes, dim) weight, normal(0, 0.01) as the official CurricularFace code initialises it.

  (DOLG's released head was never initialised explicitly; rows are L2-normalised in the forward
  pass so only their directions matter.)
  """
  return HEAD_INIT_STD * jax.random.normal(rng, (num_classes, dim), dtype)


def cosine_logits(embeddings: jax.Array, weight: jax.Array) -> jax.Array:
  """cos(theta) (N, num_classes) between L2-normalised embeddings and weight rows, float32 (or
  float64 when either is float64)."""
  dtype = jnp.promote_types(widen(embeddings).dtype, widen(weight).dtype)
  e = l2_normalize(embeddings.astype(dtype))
  w = l2_normalize(weight.astype(dtype))
  cos = jnp.einsum('nd,cd->nc', e, w, precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(cos, -1.0, 1.0)


def _margin_target(cos_y: jax.Array, margin: float) -> tuple[jax.Array, jax.Array]:
  """(cos(theta + m), cos(theta + m) with the easy_margin=False fallback) for target cosines."""
  cos_m, sin_m = math.cos(margin), math.sin(margin)
  th = math.cos(math.pi - margin)
  mm = math.sin(math.pi - margin) * margin
  # max(., tiny) keeps the gradient finite at |cos| = 1 (changes the value by < 1e-6).
  sin_y = jnp.sqrt(jnp.maximum(1.0 - cos_y * cos_y, 1e-12))
  cos_ym = cos_y * cos_m - sin_y * sin_m
  return cos_ym, jnp.where(cos_y > th, cos_ym, cos_y - mm)


def arcface_logits(
  embeddings: jax.Array,
  weight: jax.Array,
  labels: jax.Array,
  *,
  margin: float = 0.15,
  scale: float = 30.0,
) -> jax.Array:
  """ArcFace logits (N, num_classes), float32. labels: int (N,) class indices.

  Target class: s cos(theta + m), or s (cos(theta) - m sin(pi - m)) where cos(theta) <=
  cos(pi - m) (insightface's easy_margin=False); other classes: s cos(theta).
  """
  cos = cosine_logits(embeddings, weight)
  onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  cos_y = jnp.sum(jnp.where(onehot, cos, 0.0), axis=-1, keepdims=True)
  _, phi = _margin_target(cos_y, margin)
  return scale * jnp.where(onehot, phi, cos)


def curricularface_logits(
  embeddings: jax.Array,
  weight: jax.Array,
  labels: jax.Array,
  t: jax.Array,
  *,
  margin: float = 0.15,
  scale: float = 30.0,
  t_momentum: float = 0.01,
) -> tuple[jax.Array, jax.Array]:
  """CurricularFace logits (N, num_classes) float32 and the updated t (same shape as `t`).

  Target logit as ArcFace's; a logit with cos > cos(theta_y + m) (a hard negative) becomes
  s cos (t + cos), with t first updated to t_momentum * mean(cos(theta_y)) + (1 - t_momentum) t
  (the mean over the whole global batch). `t` is the EMA state (torch buffer `desc_cls.t`, shape
  (1,) or ()); it carries no gradient.
  """
  cos = cosine_logits(embeddings, weight)
  onehot = jax.nn.one_hot(labels, cos.shape[-1], dtype=jnp.bool_)
  cos_y = jnp.sum(jnp.where(onehot, cos, 0.0), axis=-1, keepdims=True)
  cos_ym, target = _margin_target(cos_y, margin)
  t = jnp.asarray(t, cos.dtype)
  new_t = jax.lax.stop_gradient(t_momentum * jnp.mean(cos_y) + (1.0 - t_momentum) * t)
  hard = cos > cos_ym
  t_b = jnp.reshape(new_t, ())
  logits = jnp.where(hard, cos * (t_b + cos), cos)
  logits = jnp.where(onehot, target, logits)
  return scale * logits, new_t


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy (fraction) of logits (N, C) against labels (N,)."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
