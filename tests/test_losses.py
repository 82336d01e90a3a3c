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
