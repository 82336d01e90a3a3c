"""Train state, the trainable/frozen split and the optimizer.

Variables are `{'params': ..., 'lora': ...}`. Which leaves train is data: regexes over
'/'-joined variable paths (`config.trainable`, e.g. `lora/.*`). The split happens before
differentiation, so frozen leaves get no gradient and no optimizer state.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar
  trainable: dict  # the leaves that get gradients
  frozen: dict  # everything else (not donated to the optimizer, not re-saved every step)
  opt_state: Any
  aux: dict  # objective-owned state updated by the step and checkpointed (DPO's reference copy), or {}

  @property
  def variables(self) -> dict:
    return merge_trees(self.trainable, self.frozen)


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def is_trainable(path: str, patterns: Sequence[str]) -> bool:
  return any(re.fullmatch(p, path) for p in patterns)


def split(variables: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
  """(trainable, frozen) subtrees of `variables` by full-match of the regexes on paths."""
  train, frozen = {}, {}
  for path, leaf in _flat(variables).items():
    (train if is_trainable(path, patterns) else frozen)[path] = leaf
  return (traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def merge_trees(a: dict, b: dict) -> dict:
  flat = _flat(a)
  flat.update(_flat(b))
  return traverse_util.unflatten_dict(flat, sep="/")


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine or linear decay to `lr * end_lr_fraction`, constant, or
  stepped (`lr * step_rate ** (k // step_every)` at the k-th step after warmup)."""
  warmup = int(opt_cfg.warmup_steps)
  decay_steps = max(int(total_steps) - warmup, 1)
  end = opt_cfg.lr * opt_cfg.end_lr_fraction
  if opt_cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(opt_cfg.lr, decay_steps, alpha=opt_cfg.end_lr_fraction)
  elif opt_cfg.schedule == "linear":
    decay = optax.linear_schedule(opt_cfg.lr, end, decay_steps)
  elif opt_cfg.schedule == "step":
    decay = optax.exponential_decay(opt_cfg.lr, int(opt_cfg.step_every), opt_cfg.step_rate, staircase=True)
  else:  # constant
    decay = optax.constant_schedule(opt_cfg.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, opt_cfg.lr, warmup), decay], [warmup])


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with a weight-decay mask (regex over paths), global-norm clipping and a schedule."""
  schedule = learning_rate_schedule(opt_cfg, total_steps)

  def decay_mask(tree):
    flat = _flat(tree)
    return traverse_util.unflatten_dict(
        {p: bool(re.fullmatch(opt_cfg.decay_mask, p)) for p in flat}, sep="/")

  parts = []
  if opt_cfg.clip_norm and opt_cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.clip_norm))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask))
  tx = optax.chain(*parts)
  return in_dtype(tx, jnp.dtype(opt_cfg.moment_dtype) if opt_cfg.get("moment_dtype") else None), schedule


def in_dtype(tx: optax.GradientTransformation, dtype=None) -> optax.GradientTransformation:
  """`tx` run on `dtype` copies of the gradients and params, so its state (AdamW's moments) and
  its updates are `dtype` whatever the params' dtype (PEFT and MaxText keep them float32 for
  bf16 weights); `optax.apply_updates` casts each update back to its param's dtype. dtype=None:
  each gradient is cast to its param's dtype (gradients summed in float32 over micro-batches
  come back to it), so the state keeps the params' dtypes. With gradients and params already in
  that dtype this is `tx` exactly."""
  def cast(tree, like=None):
    def one(x, p):
      to = dtype if dtype is not None else (p.dtype if p is not None else x.dtype)
      return x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x
    return jax.tree.map(one, tree, tree if like is None else like)

  def init(params):
    return tx.init(cast(params))

  def update(updates, state, params=None):
    if params is None:
      return tx.update(cast(updates), state, None)
    return tx.update(cast(updates, params), state, cast(params))

  return optax.GradientTransformation(init, update)


def create_state(variables: dict, patterns: Sequence[str], tx: optax.GradientTransformation,
                 aux: dict | None = None) -> TrainState:
  trainable, frozen = split(variables, patterns)
  return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                    opt_state=tx.init(trainable), aux=aux or {})
