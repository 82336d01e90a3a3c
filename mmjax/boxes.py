"""Boxes and matching for detection and instance segmentation (ViSFT): box ops, exact
Hungarian matching, mask resizing and fixed-shape targets. The DETR, mask and dice losses
are in `mmjax.losses`; metrics (mAP, mask IoU) in `mmjax.evals.detection`.

Conventions (as DETR): predicted and target boxes in the losses are (cx, cy, w, h) normalised
to [0, 1] by the image width and height; metrics use (x0, y0, x1, y1) pixel edges, as the
shapes data set stores them. Targets are padded to a fixed N per image:

  tgt_classes [B, N] int32, tgt_boxes [B, N, 4], tgt_valid [B, N] bool, tgt_masks [B, N, H, W]

A matching is two fixed-shape arrays per batch, usable inside a jitted loss:

  tgt_idx [B, Q] int32  the target each query is matched to (0 where unmatched)
  matched [B, Q] bool   whether the query is matched

Box ops take numpy or JAX arrays and return the same kind.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

_EPS = 1e-9  # guards 0/0 on degenerate (e.g. padded all-zero) boxes


def _xp(*arrays):
  return np if all(isinstance(a, (np.ndarray, np.generic, float, int)) for a in arrays) else jnp


# ---------------------------------------------------------------------------------------------
# Box ops.

def box_cxcywh_to_xyxy(b):
  """[..., 4] (cx, cy, w, h) -> (x0, y0, x1, y1)."""
  xp = _xp(b)
  cx, cy, w, h = (b[..., i] for i in range(4))
  return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(b):
  """[..., 4] (x0, y0, x1, y1) -> (cx, cy, w, h)."""
  xp = _xp(b)
  x0, y0, x1, y1 = (b[..., i] for i in range(4))
  return xp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def normalize_boxes(boxes_xyxy, height: int, width: int):
  """Pixel (x0, y0, x1, y1) [..., 4] -> normalised (cx, cy, w, h), the losses' targets."""
  xp = _xp(boxes_xyxy)
  scale = xp.asarray([width, height, width, height], dtype=boxes_xyxy.dtype)
  return box_xyxy_to_cxcywh(boxes_xyxy / scale)


def box_area(b):
  """[..., 4] xyxy -> [...] (0 for inverted boxes)."""
  xp = _xp(b)
  return xp.maximum(b[..., 2] - b[..., 0], 0) * xp.maximum(b[..., 3] - b[..., 1], 0)


def _iou_union(a, b):
  """Broadcasting IoU and union of xyxy boxes a [..., 4], b [..., 4]."""
  xp = _xp(a, b)
  lt = xp.maximum(a[..., :2], b[..., :2])
  rb = xp.minimum(a[..., 2:], b[..., 2:])
  wh = xp.maximum(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  union = box_area(a) + box_area(b) - inter
  return inter / xp.maximum(union, _EPS), union


def _giou(a, b):
  xp = _xp(a, b)
  iou, union = _iou_union(a, b)
  lt = xp.minimum(a[..., :2], b[..., :2])
  rb = xp.maximum(a[..., 2:], b[..., 2:])
  wh = xp.maximum(rb - lt, 0)
  hull = wh[..., 0] * wh[..., 1]
  return iou - (hull - union) / xp.maximum(hull, _EPS)


def pairwise_iou(a, b):
  """IoU [N, M] of xyxy boxes a [N, 4] and b [M, 4]."""
  return _iou_union(a[:, None], b[None])[0]


def pairwise_giou(a, b):
  """Generalised IoU [N, M] (Rezatofighi et al. 2019) of xyxy boxes a [N, 4], b [M, 4]:
  IoU - (hull - union) / hull, hull = the smallest box enclosing both; in [-1, 1]."""
  return _giou(a[:, None], b[None])


def elementwise_giou(a, b):
  """GIoU [...] of xyxy boxes paired elementwise, a and b [..., 4]."""
  return _giou(a, b)


# ---------------------------------------------------------------------------------------------
# Hungarian matching.

def matching_cost(logits, boxes, tgt_classes, tgt_boxes, *, w_class: float = 1.0, w_l1: float = 5.0,
                  w_giou: float = 2.0):
  """DETR matching cost [B, Q, N] = w_class * -p(target class) + w_l1 * L1(boxes)
  + w_giou * -GIoU. logits [B, Q, C+1]; boxes [B, Q, 4] and tgt_boxes [B, N, 4] normalised
  cxcywh; tgt_classes [B, N]. Pure JAX (jit it with the model, match on the host)."""
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  p_cls = jnp.take_along_axis(prob, jnp.broadcast_to(tgt_classes[:, None, :], prob.shape[:2] + tgt_classes.shape[1:])
                              .astype(jnp.int32), axis=-1)  # [B, Q, N]
  l1 = jnp.sum(jnp.abs(boxes[:, :, None, :] - tgt_boxes[:, None, :, :]), axis=-1)
  giou = _giou(box_cxcywh_to_xyxy(boxes)[:, :, None], box_cxcywh_to_xyxy(tgt_boxes)[:, None])
  return w_class * -p_cls + w_l1 * l1 + w_giou * -giou


def hungarian_match(cost, tgt_valid) -> tuple[np.ndarray, np.ndarray]:
  """Exact minimum-cost matching per image on the host (scipy `linear_sum_assignment`).

  cost: [B, Q, N]; tgt_valid: [B, N] bool (padding is excluded). Each valid target gets its
  own query (if Q >= its count; otherwise min(Q, n) targets are matched). Returns
  (tgt_idx [B, Q] int32, matched [B, Q] bool), see the module docstring.
  """
  from scipy.optimize import linear_sum_assignment  # here: `mmjax.losses` imports this module

  cost = np.asarray(cost, np.float64)
  valid = np.asarray(tgt_valid, bool)
  b, q, _ = cost.shape
  tgt_idx = np.zeros((b, q), np.int32)
  matched = np.zeros((b, q), bool)
  for i in range(b):
    cols = np.flatnonzero(valid[i])
    if cols.size == 0:
      continue
    rows, c = linear_sum_assignment(cost[i][:, cols])
    tgt_idx[i, rows] = cols[c]
    matched[i, rows] = True
  return tgt_idx, matched


def hungarian_match_jax(cost, tgt_valid, mesh=None, batch_axes=None) -> tuple[jax.Array, jax.Array]:
  """`hungarian_match` callable inside `jax.jit` (a `jax.pure_callback` to the host). The
  cost is not differentiated through (matching is a constant of the loss).

  With a `mesh` and the mesh axes the batch is sharded over (`batch_axes`, e.g. the rules'
  `act_batch`), matching runs under `shard_map` on each device's own images: no gather of the
  cost to one device, and it works when each process only holds its share of the batch.
  """
  def host(c, v):
    b, q, _ = c.shape
    shapes = (jax.ShapeDtypeStruct((b, q), jnp.int32), jax.ShapeDtypeStruct((b, q), jnp.bool_))
    return jax.pure_callback(hungarian_match, shapes, c, v, vmap_method="sequential")

  cost = jax.lax.stop_gradient(cost)
  if mesh is None:
    return host(cost, tgt_valid)
  spec = jax.sharding.PartitionSpec(batch_axes)
  return jax.shard_map(host, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec))(cost, tgt_valid)


# ---------------------------------------------------------------------------------------------
# Masks and targets.

def resize_masks(masks, size: tuple[int, int]) -> jax.Array:
  """Masks [..., H, W] (bool or float) -> float32 [..., h, w] in [0, 1]: exact area averages
  when h, w divide H, W (soft targets at object edges), otherwise antialiased linear resampling."""
  m = jnp.asarray(masks).astype(jnp.float32)
  hh, ww = m.shape[-2:]
  h, w = size
  if (hh, ww) == (h, w):
    return m
  if hh % h == 0 and ww % w == 0:
    return m.reshape(*m.shape[:-2], h, hh // h, w, ww // w).mean(axis=(-3, -1))
  return jnp.clip(jax.image.resize(m, (*m.shape[:-2], h, w), "linear", antialias=True), 0.0, 1.0)



def pad_targets(examples, max_objects: int, *, masks: bool = True) -> dict:
  """Batches per-image targets of the shapes set (or any source with pixel xyxy `boxes`
  [n, 4], `classes` [n], optional `masks` [n, H, W] and `image` [H, W, C]) into fixed-shape
  numpy arrays: tgt_boxes [B, N, 4] normalised cxcywh, tgt_boxes_xyxy [B, N, 4] pixels,
  tgt_classes [B, N], tgt_valid [B, N], tgt_masks [B, N, H, W] (if `masks`). Extra objects
  beyond `max_objects` raise (silently dropping targets would bias the metrics)."""
  b = len(examples)
  h, w = examples[0]["image"].shape[:2]
  out = dict(tgt_boxes=np.zeros((b, max_objects, 4), np.float32),
             tgt_boxes_xyxy=np.zeros((b, max_objects, 4), np.float32),
             tgt_classes=np.zeros((b, max_objects), np.int32),
             tgt_valid=np.zeros((b, max_objects), bool))
  if masks:
    out["tgt_masks"] = np.zeros((b, max_objects, h, w), bool)
  for i, ex in enumerate(examples):
    n = len(ex["classes"])
    if n > max_objects:
      raise ValueError(f"pad_targets: example {i} has {n} objects > max_objects={max_objects}")
    boxes = np.asarray(ex["boxes"], np.float32).reshape(n, 4)
    out["tgt_boxes_xyxy"][i, :n] = boxes
    out["tgt_boxes"][i, :n] = normalize_boxes(boxes, h, w)
    out["tgt_classes"][i, :n] = ex["classes"]
    out["tgt_valid"][i, :n] = True
    if masks:
      out["tgt_masks"][i, :n] = ex["masks"]
  return out
