"""The train and eval steps: top-level pure functions, jitted once by the loop.

`train_step(state, batch, rng, *, objective, tx, accum_steps)`: the batch's leading axis
is split into `accum_steps` micro-batches that run under `lax.scan`; gradients and metric
sums add up, and everything is divided by the objective's normaliser summed over all
micro-batches (for SFT: the number of loss tokens in the whole accumulated batch). Accumulated
gradients are float32 whatever the params' dtype.

`update_mask` (a tree like `state.trainable` of Python bools, or None for all) restricts
the step to some trainable leaves (directed fine-tuning, `mmjax.train.groups`): the others
get no gradient (stop_gradient, so their weight gradients are never computed) and keep
their params and optimizer moments unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmjax.train.state import TrainState, merge_trees


def _micro_batches(batch: dict, accum_steps: int) -> dict:
  """[B, ...] -> [A, B/A, ...] taking rows i, i+A, ... for micro-batch i, so each data
  shard keeps its own rows (the reshape is local to every device)."""
  def f(x):
    b = x.shape[0]
    x = x.reshape(b // accum_steps, accum_steps, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(f, batch)


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, objective, tx, accum_steps: int = 1,
               update_mask=None):
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(trainable, micro, key):
    if update_mask is not None:
      trainable = jax.tree.map(lambda x, m: x if m else jax.lax.stop_gradient(x), trainable, update_mask)
    loss_sum, norm, sums = objective.loss(_variables(trainable, state.frozen, state.aux), micro, key, True)
    return loss_sum, (norm, sums)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (_, (norm, sums)), grads = grad_fn(state.trainable, batch, rng)
  else:
    def body(carry, xs):
      micro, i = xs
      (_, (n, s)), g = grad_fn(state.trainable, micro, jax.random.fold_in(rng, i))
      acc_g, acc_n, acc_s = carry
      return (jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc_g, g), acc_n + n,
              jax.tree.map(jnp.add, acc_s, s)), None

    micro = _micro_batches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, state.trainable, first, rng)
    (_, (n0, s0)), g0 = shapes
    zeros = lambda t, dtype=None: jax.tree.map(lambda x: jnp.zeros(x.shape, dtype or x.dtype), t)
    (grads, norm, sums), _ = jax.lax.scan(  # gradients summed in float32, whatever the params' dtype
        body, (zeros(g0, jnp.float32), jnp.zeros(n0.shape, n0.dtype), zeros(s0)),
        (micro, jnp.arange(accum_steps)))
  denom = jnp.maximum(norm, 1.0)
  grads = jax.tree.map(lambda g: g / denom, grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  if update_mask is not None:  # leaves outside the mask keep their params and moments
    keep = lambda new, old, m: new if m else old
    trainable = jax.tree.map(keep, trainable, state.trainable, update_mask)
    opt_mask = optax.tree_map_params(tx, lambda _, m: m, opt_state, update_mask, transform_non_params=lambda _: True)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state, opt_mask)
  metrics = {k: v / denom for k, v in sums.items()}
  metrics["grad_norm"] = optax.tree.norm(grads)
  metrics["normaliser"] = norm
  metrics["tokens"] = objective.tokens(batch)
  aux = objective.update_aux(state.aux, merge_trees(trainable, state.frozen), state.step + 1)  # e.g. DPO's reference
  new_state = state.replace(step=state.step + 1, trainable=trainable, opt_state=opt_state, aux=aux)
  return new_state, metrics


def _variables(trainable, frozen, aux):
  """What an objective's loss sees: the model's variables, plus `aux` when there is one."""
  variables = merge_trees(trainable, frozen)
  if aux:
    variables["aux"] = aux
  return variables


def eval_step(state: TrainState, batch: dict, *, objective):
  """Metric sums and the normaliser for one eval batch (divide after summing over batches)."""
  _, norm, sums = objective.loss(_variables(state.trainable, state.frozen, state.aux), batch, jax.random.key(0),
                                 False)
  return dict(sums, normaliser=norm)
