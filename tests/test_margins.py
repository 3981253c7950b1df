"""Tests of the margin heads (dolg_jax/models/margins.py) against numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dolg_jax.models import margins


def _cross_entropy(logits, labels):
  return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels))


def normalize(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def setup(n=6, c=10, d=16, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(c, d)).astype(np.float32)
  e = rng.normal(size=(n, d)).astype(np.float32) * 5
  labels = rng.integers(0, c, n).astype(np.int32)
  # Row 0: close to its class (small theta); row 1: nearly opposite its class, so theta + m > pi
  # and the threshold fallback applies.
  e[0] = w[labels[0]] * 3 + 0.05 * rng.normal(size=d)
  e[1] = -w[labels[1]] + 0.01 * rng.normal(size=d)
  return e, w, labels


def np_cos(e, w):
  return np.clip(normalize(e.astype(np.float64)) @ normalize(w.astype(np.float64)).T, -1, 1)


def np_arcface(e, w, labels, m, s):
  cos = np_cos(e, w)
  out = cos.copy()
  for i, y in enumerate(labels):
    theta = math.acos(cos[i, y])
    if theta + m < math.pi:  # cos > cos(pi - m)
      out[i, y] = math.cos(theta + m)
    else:
      out[i, y] = cos[i, y] - math.sin(math.pi - m) * m
  return s * out


def np_curricularface(e, w, labels, t, m, s, momentum):
  cos = np_cos(e, w)
  cos_y = cos[np.arange(len(labels)), labels]
  new_t = momentum * cos_y.mean() + (1 - momentum) * t
  out = cos.copy()
  for i, y in enumerate(labels):
    theta = math.acos(cos_y[i])
    cos_ym = math.cos(theta + m)
    for j in range(cos.shape[1]):
      if cos[i, j] > cos_ym:
        out[i, j] = cos[i, j] * (new_t + cos[i, j])
    out[i, y] = cos_ym if theta + m < math.pi else cos_y[i] - math.sin(math.pi - m) * m
  return s * out, new_t


def test_arcface_matches_numpy_including_fallback():
  e, w, labels = setup()
  cos = np_cos(e, w)
  assert cos[1, labels[1]] < math.cos(math.pi - 0.15)  # the fallback branch is exercised
  assert cos[0, labels[0]] > 0.99
  logits = margins.arcface_logits(
    jnp.asarray(e), jnp.asarray(w), jnp.asarray(labels), margin=0.15, scale=30.0
  )
  assert logits.dtype == jnp.float32 and logits.shape == (6, 10)
  np.testing.assert_allclose(logits, np_arcface(e, w, labels, 0.15, 30.0), rtol=1e-5, atol=2e-4)


def test_arcface_large_margin_fallback_is_monotonic():
  # With m = 0.5 the fallback covers theta > pi - 0.5; the target logit must keep decreasing.
  w = np.eye(2, dtype=np.float32)
  thetas = np.linspace(0, math.pi, 50)
  e = np.stack([np.cos(thetas), np.sin(thetas)], -1).astype(np.float32)
  labels = np.zeros(50, np.int32)
  logits = np.asarray(
    margins.arcface_logits(
      jnp.asarray(e), jnp.asarray(w), jnp.asarray(labels), margin=0.5, scale=1.0
    )
  )[:, 0]
  np.testing.assert_allclose(logits, np_arcface(e, w, labels, 0.5, 1.0)[:, 0], atol=2e-5)
  assert np.all(np.diff(logits) < 0)


@pytest.mark.parametrize('t0', [0.0, 0.3])
def test_curricularface_matches_numpy(t0):
  e, w, labels = setup(seed=1)
  t = jnp.full((1,), t0, jnp.float32)
  logits, new_t = margins.curricularface_logits(
    jnp.asarray(e), jnp.asarray(w), jnp.asarray(labels), t, margin=0.15, scale=30.0, t_momentum=0.01
  )
  ref, ref_t = np_curricularface(e, w, labels, t0, 0.15, 30.0, 0.01)
  assert new_t.shape == (1,) and logits.dtype == jnp.float32
  np.testing.assert_allclose(new_t, [ref_t], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=2e-4)
  # Hard negatives exist in this batch and are reweighted (differ from scale * cos).
  cos = np_cos(e, w)
  onehot = np.eye(10, dtype=bool)[labels]
  changed = ~np.isclose(np.asarray(logits), 30 * cos, atol=1e-4) & ~onehot
  assert changed.any()


def test_curricularface_t_ema_over_steps_and_no_gradient_into_t():
  e, w, labels = setup(seed=2)
  t = jnp.zeros(())
  ref_t = 0.0
  step = jax.jit(margins.curricularface_logits)
  for _ in range(3):
    _, t = step(jnp.asarray(e), jnp.asarray(w), jnp.asarray(labels), t)
    _, ref_t = np_curricularface(e, w, labels, ref_t, 0.15, 30.0, 0.01)
  assert t.shape == ()
  np.testing.assert_allclose(t, ref_t, rtol=1e-5)

  def loss(t, e):
    logits, _ = margins.curricularface_logits(e, jnp.asarray(w), jnp.asarray(labels), t)
    return _cross_entropy(logits, jnp.asarray(labels))

  g_t, g_e = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(0.2), jnp.asarray(e))
  assert float(g_t) == 0.0
  assert np.isfinite(np.asarray(g_e)).all() and np.abs(np.asarray(g_e)).sum() > 0


def test_gradients_finite_when_embedding_equals_class_weight():
  w = np.eye(4, dtype=np.float32)
  e = w[:2].copy()  # cos = 1 exactly for the targets, -> sin = 0
  labels = jnp.asarray([0, 1])
  for fn in (
    lambda x: margins.arcface_logits(x, jnp.asarray(w), labels, margin=0.15, scale=30.0),
    lambda x: margins.curricularface_logits(x, jnp.asarray(w), labels, jnp.zeros(()))[0],
  ):
    g = jax.jit(jax.grad(lambda x: _cross_entropy(fn(x), labels)))(jnp.asarray(e))
    assert np.isfinite(np.asarray(g)).all()


def test_bf16_embeddings_give_float32_logits():
  e, w, labels = setup()
  logits = margins.arcface_logits(
    jnp.asarray(e, jnp.bfloat16), jnp.asarray(w), jnp.asarray(labels), margin=0.15, scale=30.0
  )
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np_arcface(e, w, labels, 0.15, 30.0), atol=0.3)


def test_init_head_weight_and_accuracy():
  w = margins.init_head_weight(jax.random.PRNGKey(0), 1000, 64)
  assert w.shape == (1000, 64) and w.dtype == jnp.float32
  assert abs(float(jnp.std(w)) - 0.01) < 5e-4 and abs(float(jnp.mean(w))) < 5e-4
  logits = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 3.0, 0.5]])
  labels = jnp.asarray([0, 2])
  assert float(margins.accuracy(logits, labels)) == 0.5
