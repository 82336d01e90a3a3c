import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmjax import losses


def test_cross_entropy_matches_optax_with_mask():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 7, 11)) * 3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, size=(3, 7)))
  mask = jnp.asarray(rng.integers(0, 2, size=(3, 7)))
  total, count = losses.cross_entropy(logits, targets, mask)
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  np.testing.assert_allclose(total, jnp.sum(ref * mask), rtol=1e-6)
  assert count == mask.sum()


def test_token_log_probs_naive_loop():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 13)).astype(np.float32)
  targets = rng.integers(0, 13, size=(2, 5))
  out = np.asarray(losses.token_log_probs(jnp.asarray(logits), jnp.asarray(targets)))
  for b in range(2):
    for t in range(5):
      row = logits[b, t].astype(np.float64)
      ref = row[targets[b, t]] - np.log(np.exp(row - row.max()).sum()) - row.max()
      assert abs(out[b, t] - ref) < 1e-5


def test_token_accuracy_counts_masked_hits_only():
  logits = jnp.asarray([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
  targets = jnp.asarray([[1, 1, 0]])
  mask = jnp.asarray([[1, 1, 0]])
  hits, count = losses.token_accuracy(logits, targets, mask)
  assert float(hits) == 1.0 and float(count) == 2.0


def test_cross_entropy_bf16_logits_are_upcast():
  logits = jnp.asarray([[[100.0, 0.0, -100.0]]], jnp.bfloat16)
  total, _ = losses.cross_entropy(logits, jnp.asarray([[2]]), jnp.ones((1, 1)))
  assert np.isfinite(float(total)) and abs(float(total) - 200.0) < 1.0


def _head_problem(t=13, d=8, v=37, b=3, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(k[0], (b, t, d))
  w = jax.random.normal(k[1], (d, v)) * 0.5
  targets = jax.random.randint(k[2], (b, t), 0, v)
  mask = jax.random.bernoulli(k[3], 0.7, (b, t)).astype(jnp.float32)
  return h, w, targets, mask


def test_chunked_cross_entropy_equals_the_full_one_value_and_gradients():
  h, w, targets, mask = _head_problem()
  full = lambda h, w: losses.cross_entropy_and_accuracy(h @ w, targets, mask)
  for chunk in (1, 4, 5, 13, 20):  # chunk need not divide T
    chunked = lambda h, w: losses.chunked_cross_entropy_and_accuracy(lambda x: x @ w, h, targets, mask, chunk)
    want, got = full(h, w), chunked(h, w)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-5)
    g_want = jax.grad(lambda h, w: full(h, w)[0], argnums=(0, 1))(h, w)
    g_got = jax.grad(lambda h, w: chunked(h, w)[0], argnums=(0, 1))(h, w)
    for a, b in zip(g_got, g_want):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_sequence_log_probs_equal_the_full_ones():
  h, w, targets, mask = _head_problem(t=11, seed=1)
  for average in (False, True):
    want = losses.sequence_log_probs(h @ w, targets, mask, average)
    got = losses.chunked_sequence_log_probs(lambda x: x @ w, h, targets, mask, 4, average)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    gw = jax.grad(lambda w: losses.sequence_log_probs(h @ w, targets, mask, average).sum())(w)
    gc = jax.grad(lambda w: losses.chunked_sequence_log_probs(lambda x: x @ w, h, targets, mask, 4, average).sum())(w)
    np.testing.assert_allclose(gc, gw, rtol=1e-5, atol=1e-6)


def test_chunked_logits_are_never_whole():
  """The largest float32 array the chunked step makes is one chunk of logits, not [B, T, V]."""
  h, w, targets, mask = _head_problem(t=64, v=512)
  f = jax.jit(jax.grad(lambda w: losses.chunked_cross_entropy_and_accuracy(lambda x: x @ w, h, targets, mask, 8)[0]))
  hlo = f.lower(w).compile().as_text()
  assert "f32[3,64,512]" not in hlo and "f32[3,8,512]" in hlo
  full = jax.jit(jax.grad(lambda w: losses.cross_entropy_and_accuracy(h @ w, targets, mask)[0]))
  assert "f32[3,64,512]" in full.lower(w).compile().as_text()
