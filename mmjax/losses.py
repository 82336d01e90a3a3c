"""Every loss in mmjax, as pure functions of arrays. Each is unit-tested against a reference.

Token losses return *sums* and *counts* rather than means, so gradient accumulation can
normalise by the tokens of the whole accumulated batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) per position. logits [B, T, V] (any float), targets [B, T] -> [B, T] float32."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - lse


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked next-token cross-entropy. Returns (sum of -log p over mask, number of masked tokens)."""
  mask = mask.astype(jnp.float32)
  nll = -token_log_probs(logits, targets)
  return jnp.sum(nll * mask), jnp.sum(mask)


def token_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(number of masked positions whose argmax equals the target, number of masked positions)."""
  mask = mask.astype(jnp.float32)
  hit = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(hit * mask), jnp.sum(mask)
