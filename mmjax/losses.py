"""Every loss in mmjax, as pure functions of arrays. Each is unit-tested against a reference:
token cross-entropy and accuracy (SFT), sequence log-probs and the DPO family (DPO), the
DETR set loss, mask dice / sigmoid CE / focal losses (ViSFT).

Token losses return *sums* and *counts* rather than means, so gradient accumulation can
normalise by the tokens of the whole accumulated batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.boxes import box_cxcywh_to_xyxy, elementwise_giou, resize_masks


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


# ---------------------------------------------------------------------------------------
# Preference optimisation (DPO family). Formulas follow TRL's DPOTrainer.dpo_loss.

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero")


def sequence_log_probs(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                       average: bool = False) -> jax.Array:
  """Sum (or mean, if `average`) of log p(target) over the masked positions of each row -> [B].

  The backward is hand-written (`_fused_row_logps`): it saves only the log-normaliser and
  recomputes the softmax in one pass, as `fused_cross_entropy` does for SFT."""
  mask = mask.astype(jnp.float32)
  total = _fused_row_logps(logits, targets, mask)
  if average:
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return total


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_lengths=None, rejected_lengths=None, bco_delta=None):
  """Per-example DPO-family losses and the (stop-gradient) chosen/rejected rewards.

  All log-prob inputs are summed over response tokens, shape [B]. Returns
  (losses [B], chosen_rewards [B], rejected_rewards [B]) with
  rewards = beta * (policy - reference) log-prob.

  loss_type: 'sigmoid' (DPO, with conservative label smoothing), 'robust' (label
  smoothing in [0, 0.5), unbiased), 'hinge' (SLiC), 'ipo' (log-probs divided by response
  length when the lengths are given, as TRL does), 'bco_pair' (delta = `bco_delta`, by
  default the batch mean of all rewards; TRL keeps a running mean across steps, which a
  caller can pass in), 'apo_zero'.
  """
  if loss_type not in DPO_LOSS_TYPES:
    raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
  pc, pr, rc, rr = (jnp.asarray(x, jnp.float32) for x in (
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
  if loss_type == "ipo" and chosen_lengths is not None and rejected_lengths is not None:
    lc = jnp.maximum(jnp.asarray(chosen_lengths, jnp.float32), 1.0)
    lr = jnp.maximum(jnp.asarray(rejected_lengths, jnp.float32), 1.0)
    pc, rc, pr, rr = pc / lc, rc / lc, pr / lr, rr / lr
  chosen_logratios = pc - rc
  rejected_logratios = pr - rr
  logits = chosen_logratios - rejected_logratios
  ls = label_smoothing
  if loss_type == "sigmoid":
    losses = -jax.nn.log_sigmoid(beta * logits) * (1 - ls) - jax.nn.log_sigmoid(-beta * logits) * ls
  elif loss_type == "robust":
    losses = (-jax.nn.log_sigmoid(beta * logits) * (1 - ls) + jax.nn.log_sigmoid(-beta * logits) * ls) / (1 - 2 * ls)
  elif loss_type == "hinge":
    losses = jax.nn.relu(1 - beta * logits)
  elif loss_type == "ipo":
    losses = (logits - 1 / (2 * beta)) ** 2
  elif loss_type == "bco_pair":
    cr, rj = beta * chosen_logratios, beta * rejected_logratios
    if bco_delta is None:
      bco_delta = jax.lax.stop_gradient(jnp.mean(jnp.concatenate([cr, rj])))
    losses = -jax.nn.log_sigmoid(cr - bco_delta) - jax.nn.log_sigmoid(-(rj - bco_delta))
  else:  # apo_zero
    losses = (1 - jax.nn.sigmoid(beta * chosen_logratios)) + jax.nn.sigmoid(beta * rejected_logratios)
  chosen_rewards = jax.lax.stop_gradient(beta * chosen_logratios)
  rejected_rewards = jax.lax.stop_gradient(beta * rejected_logratios)
  return losses, chosen_rewards, rejected_rewards


def _row_logps(logits, targets, mask):
  """(per-row sum over mask of picked - logsumexp [B], logsumexp [B, T])."""
  logits = logits.astype(jnp.float32)
  mx = jnp.max(logits, axis=-1)
  lse = mx + jnp.log(jnp.sum(jnp.exp(logits - mx[..., None]), axis=-1))
  picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return jnp.sum((picked - lse) * mask, axis=-1), lse


@jax.custom_vjp
def _fused_row_logps(logits, targets, mask):
  return _row_logps(logits, targets, mask)[0]


def _fused_row_logps_fwd(logits, targets, mask):
  rows, lse = _row_logps(logits, targets, mask)
  return rows, (logits, targets, mask, lse)


def _fused_row_logps_bwd(res, g):
  logits, targets, mask, lse = res
  vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  onehot = vocab == targets[..., None].astype(jnp.int32)
  # One pass over [B, T, V]: softmax recomputed from the saved log-normaliser.
  d = (onehot - jnp.exp(logits.astype(jnp.float32) - lse[..., None])) * (g[:, None] * mask)[..., None]
  return d.astype(logits.dtype), None, None


_fused_row_logps.defvjp(_fused_row_logps_fwd, _fused_row_logps_bwd)


def _fused_nll(logits, targets, mask):
  """Sum over mask of -log p(target), with the one-pass backward of `_fused_row_logps`."""
  return -jnp.sum(_fused_row_logps(logits, targets, mask))


def fused_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy` with a hand-written backward: saves only the log-normaliser [B, T] and
  recomputes the softmax in one fused pass (autodiff keeps a second [B, T, V] array and
  makes more passes). Same values and gradients (fp32 rounding aside)."""
  mask = mask.astype(jnp.float32)
  return _fused_nll(logits, targets, mask), jnp.sum(mask)


def cross_entropy_and_accuracy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """(nll sum, mask count, correct count) in one pass over the logits: `fused_cross_entropy`
  plus accuracy as "the target's logit is the row maximum" (no argmax pass). That equals
  `token_accuracy` except on exact ties for the maximum, where `token_accuracy` counts a
  hit only if the target is the first maximal index. The accuracy carries no gradient."""
  mask = mask.astype(jnp.float32)
  nll = _fused_nll(logits, targets, mask)
  lg = jax.lax.stop_gradient(logits).astype(jnp.float32)
  picked = jnp.take_along_axis(lg, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  hit = (picked >= jnp.max(lg, axis=-1)).astype(jnp.float32)
  return nll, jnp.sum(mask), jnp.sum(hit * mask)


def chunked_token_log_probs(head, h: jax.Array, targets: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
  """(log p(target), target is a row maximum) per token [B, T] from hidden states h [B, T, D]
  and `head` (hidden [B, C, D] -> logits [B, C, V]), computing the logits `chunk` positions
  at a time: a `lax.map` over chunks under `jax.checkpoint`, so a step holds one chunk's
  [B, chunk, V] float32 logits (forward and backward) instead of the whole sequence's. The
  same values and gradients as the unchunked losses, fp32 rounding aside. The hit carries
  no gradient."""
  b, t, d = h.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  hs = jnp.pad(h, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  ts = jnp.pad(targets.astype(jnp.int32), ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(xs):
    hc, tc = xs
    logits = head(hc).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    lg = jax.lax.stop_gradient(logits)
    hit = (jax.lax.stop_gradient(picked) >= jnp.max(lg, axis=-1)).astype(jnp.float32)
    return picked - lse, hit

  logp, hit = jax.lax.map(one, (hs, ts))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return unchunk(logp), unchunk(hit)


def chunked_cross_entropy_and_accuracy(head, h: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int):
  """`cross_entropy_and_accuracy(head(h), targets, mask)` computed `chunk` positions at a time
  (`chunked_token_log_probs`): (nll sum, mask count, correct count)."""
  mask = mask.astype(jnp.float32)
  logp, hit = chunked_token_log_probs(head, h, targets, chunk)
  return -jnp.sum(logp * mask), jnp.sum(mask), jnp.sum(hit * mask)


def chunked_sequence_log_probs(head, h: jax.Array, targets: jax.Array, mask: jax.Array, chunk: int,
                               average: bool = False) -> jax.Array:
  """`sequence_log_probs(head(h), targets, mask, average)` computed `chunk` positions at a time."""
  mask = mask.astype(jnp.float32)
  total = jnp.sum(chunked_token_log_probs(head, h, targets, chunk)[0] * mask, axis=-1)
  if average:
    return total / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return total


# ---------------------------------------------------------------------------------------------
# Detection and segmentation (ViSFT). Targets and matchings as in `mmjax.boxes`. Each returns
# means normalised as DETR does: class CE is a weighted mean over all queries; box and mask
# losses are sums over matched queries / the number of valid targets (at least 1) in the
# batch. Under data parallelism pass `num_targets` = the global count.

def detr_loss(logits, boxes, tgt_classes, tgt_boxes, tgt_valid, tgt_idx, matched, *, eos_coef: float = 0.1,
              w_class: float = 1.0, w_l1: float = 5.0, w_giou: float = 2.0, num_targets=None) -> dict:
  """DETR set loss for a given matching.

  logits [B, Q, C+1] (last = no-object), boxes [B, Q, 4] normalised cxcywh; targets and
  matching as in `mmjax.boxes`. Returns a dict of scalars: `loss` (weighted sum),
  `loss_ce` (cross-entropy against the matched class or no-object, no-object weighted by
  `eos_coef`, weighted mean over B*Q queries), `loss_l1` and `loss_giou` (sum of L1 and of
  1 - GIoU over matched queries / num_targets), `num_targets`, `class_accuracy` (matched
  queries whose argmax is their class; a diagnostic).
  """
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1] - 1
  if num_targets is None:
    num_targets = jnp.maximum(jnp.sum(tgt_valid.astype(jnp.float32)), 1.0)
  m = matched.astype(jnp.float32)
  cls_q = jnp.take_along_axis(tgt_classes.astype(jnp.int32), tgt_idx, axis=1)  # [B, Q]
  target = jnp.where(matched, cls_q, num_classes)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
  w = jnp.where(matched, 1.0, eos_coef)
  loss_ce = jnp.sum(w * nll) / jnp.sum(w)

  tb = jnp.take_along_axis(tgt_boxes.astype(jnp.float32), tgt_idx[..., None], axis=1)  # [B, Q, 4]
  pb = boxes.astype(jnp.float32)
  loss_l1 = jnp.sum(m * jnp.sum(jnp.abs(pb - tb), axis=-1)) / num_targets
  giou = elementwise_giou(box_cxcywh_to_xyxy(pb), box_cxcywh_to_xyxy(tb))
  loss_giou = jnp.sum(m * (1.0 - giou)) / num_targets
  hit = (jnp.argmax(logits, axis=-1) == cls_q).astype(jnp.float32)
  acc = jnp.sum(m * hit) / jnp.maximum(jnp.sum(m), 1.0)
  loss = w_class * loss_ce + w_l1 * loss_l1 + w_giou * loss_giou
  return dict(loss=loss, loss_ce=loss_ce, loss_l1=loss_l1, loss_giou=loss_giou, num_targets=num_targets,
              class_accuracy=acc)


def dice_loss(mask_logits, targets, weights, num_targets):
  """DETR dice loss: sum_i weights_i * (1 - (2 |p t| + 1) / (|p| + |t| + 1)) / num_targets,
  p = sigmoid(logits). mask_logits, targets: [..., h, w]; weights: [...] (0/1 = matched)."""
  p = jax.nn.sigmoid(mask_logits.astype(jnp.float32))
  t = targets.astype(jnp.float32)
  num = 2.0 * jnp.sum(p * t, axis=(-2, -1))
  den = jnp.sum(p, axis=(-2, -1)) + jnp.sum(t, axis=(-2, -1))
  return jnp.sum(weights * (1.0 - (num + 1.0) / (den + 1.0))) / num_targets


def sigmoid_ce_loss(mask_logits, targets, weights, num_targets):
  """Binary cross-entropy with logits, mean over pixels of each mask, then
  sum_i weights_i * that / num_targets. Shapes as `dice_loss`; targets may be soft."""
  x = mask_logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  ce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))  # stable log(1 + e^x) - x t
  return jnp.sum(weights * jnp.mean(ce, axis=(-2, -1))) / num_targets


def sigmoid_focal_loss(mask_logits, targets, weights, num_targets, alpha: float = 0.25, gamma: float = 2.0):
  """DETR's focal mask loss (Lin et al. 2017): alpha_t (1 - p_t)^gamma * BCE, mean over
  pixels, sum_i weights_i * that / num_targets. alpha < 0 disables the alpha weighting."""
  x = mask_logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  ce = jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))
  p_t = p * t + (1 - p) * (1 - t)
  loss = ce * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
  return jnp.sum(weights * jnp.mean(loss, axis=(-2, -1))) / num_targets


def mask_loss(mask_logits, tgt_masks, tgt_valid, tgt_idx, matched, *, w_dice: float = 1.0, w_ce: float = 1.0,
              num_targets=None) -> dict:
  """Instance-mask losses on matched queries: mask_logits [B, Q, h, w]; tgt_masks
  [B, N, H, W] are resized to (h, w) (`resize_masks`). Returns `loss` = w_dice * dice +
  w_ce * sigmoid CE, `loss_dice`, `loss_mask_ce` (each a sum over matched / num_targets)."""
  if num_targets is None:
    num_targets = jnp.maximum(jnp.sum(tgt_valid.astype(jnp.float32)), 1.0)
  tm = resize_masks(tgt_masks, mask_logits.shape[-2:])  # [B, N, h, w]
  tm = jnp.take_along_axis(tm, tgt_idx[:, :, None, None], axis=1)  # [B, Q, h, w]
  w = matched.astype(jnp.float32)
  dice = dice_loss(mask_logits, tm, w, num_targets)
  ce = sigmoid_ce_loss(mask_logits, tm, w, num_targets)
  return dict(loss=w_dice * dice + w_ce * ce, loss_dice=dice, loss_mask_ce=ce)
