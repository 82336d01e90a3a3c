"""Box ops, Hungarian matching, DETR/mask losses and detection metrics against hand-computed
values and naive loops."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import boxes as det
from mmjax import losses
from mmjax.data.shapes import ShapesConfig, ShapesSource
from mmjax.evals import detection as dm


# ------------------------------------------------------------------------------- box ops

def test_box_conversions_round_trip():
  rng = np.random.default_rng(0)
  b = rng.uniform(0, 1, (5, 7, 4)).astype(np.float32)
  np.testing.assert_allclose(det.box_xyxy_to_cxcywh(det.box_cxcywh_to_xyxy(b)), b, atol=1e-6)
  np.testing.assert_allclose(det.box_cxcywh_to_xyxy(np.array([0.5, 0.25, 0.2, 0.1])), [0.4, 0.2, 0.6, 0.3])
  got = det.normalize_boxes(np.array([[2.0, 4.0, 10.0, 8.0]], np.float32), height=16, width=20)
  np.testing.assert_allclose(got, [[0.3, 0.375, 0.4, 0.25]], atol=1e-7)
  assert isinstance(det.box_cxcywh_to_xyxy(jnp.asarray(b)), jax.Array)


GIOU_CASES = [  # (a, b, iou, giou) by hand
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),  # overlapping: inter 1, union 7, hull 9
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),  # disjoint: union 2, hull 3
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 1 / 16),  # contained: hull = the outer box
    ([1, 2, 3, 5], [1, 2, 3, 5], 1.0, 1.0),  # identical
    ([0, 0, 1, 1], [3, 3, 4, 4], 0.0, -(16 - 2) / 16),  # far apart, diagonal: hull 4x4
]


@pytest.mark.parametrize("xp", [np, jnp])
def test_iou_and_giou_hand_computed(xp):
  a = xp.asarray([c[0] for c in GIOU_CASES], dtype=xp.float32)
  b = xp.asarray([c[1] for c in GIOU_CASES], dtype=xp.float32)
  iou = np.array([c[2] for c in GIOU_CASES])
  giou = np.array([c[3] for c in GIOU_CASES])
  np.testing.assert_allclose(det.elementwise_giou(a, b), giou, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(det.elementwise_giou(b, a), giou, rtol=1e-6, atol=1e-7)  # symmetric
  pi, pg = det.pairwise_iou(a, b), det.pairwise_giou(a, b)
  assert pi.shape == pg.shape == (len(GIOU_CASES), len(GIOU_CASES))
  np.testing.assert_allclose(np.diag(np.asarray(pi)), iou, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.diag(np.asarray(pg)), giou, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(det.pairwise_giou(a[:2], b[2:]), np.asarray(pg)[:2, 2:], rtol=1e-6)


def test_giou_of_padding_is_finite():
  z = jnp.zeros((3, 4))
  assert np.all(np.isfinite(det.elementwise_giou(z, z)))
  g = jax.grad(lambda x: det.elementwise_giou(x, z).sum())(jnp.full((3, 4), 0.5))
  assert np.all(np.isfinite(g))


# ------------------------------------------------------------------------------- matching

def _brute_force(cost, valid):
  """Minimum total cost over all injective assignments of valid targets to queries (or of
  queries to targets when there are more targets)."""
  q = cost.shape[0]
  cols = np.flatnonzero(valid)
  if cols.size == 0:
    return 0.0
  c = cost[:, cols]
  if cols.size <= q:
    return min(sum(c[p[j], j] for j in range(cols.size)) for p in itertools.permutations(range(q), cols.size))
  return min(sum(c[i, p[i]] for i in range(q)) for p in itertools.permutations(range(cols.size), q))


def test_hungarian_matches_brute_force():
  rng = np.random.default_rng(1)
  for trial in range(60):
    b, q, n = 3, int(rng.integers(1, 6)), int(rng.integers(1, 6))
    cost = rng.normal(size=(b, q, n))
    if trial % 3 == 0:  # integer costs: many ties
      cost = rng.integers(0, 3, (b, q, n)).astype(np.float64)
    valid = rng.random((b, n)) < 0.7
    idx, matched = det.hungarian_match(cost, valid)
    assert idx.shape == matched.shape == (b, q) and idx.dtype == np.int32
    for i in range(b):
      rows = np.flatnonzero(matched[i])
      tg = idx[i, rows]
      assert valid[i, tg].all() and len(set(tg.tolist())) == len(tg)  # injective, valid targets only
      assert len(rows) == min(q, valid[i].sum())
      np.testing.assert_allclose(cost[i, rows, tg].sum(), _brute_force(cost[i], valid[i]), atol=1e-9)


def test_hungarian_inside_jit_equals_host():
  rng = np.random.default_rng(2)
  cost = rng.normal(size=(4, 6, 3)).astype(np.float32)
  valid = rng.random((4, 3)) < 0.6
  want = det.hungarian_match(cost, valid)
  got = jax.jit(det.hungarian_match_jax)(jnp.asarray(cost), jnp.asarray(valid))
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


def _random_outputs(rng, b=2, q=5, c=3, n=4):
  logits = rng.normal(size=(b, q, c + 1)).astype(np.float32)
  boxes = rng.uniform(0.2, 0.8, (b, q, 4)).astype(np.float32)
  boxes[..., 2:] *= 0.5
  tb = rng.uniform(0.2, 0.8, (b, n, 4)).astype(np.float32)
  tb[..., 2:] *= 0.5
  tc = rng.integers(0, c, (b, n)).astype(np.int32)
  valid = np.array([[True, True, False, False], [True, True, True, False]])[:b, :n]
  return logits, boxes, tc, tb, valid


def _giou_scalar(a, b):
  return float(det.elementwise_giou(np.asarray(det.box_cxcywh_to_xyxy(a), np.float64),
                                    np.asarray(det.box_cxcywh_to_xyxy(b), np.float64)))


def test_matching_cost_against_loop():
  rng = np.random.default_rng(3)
  logits, boxes, tc, tb, _ = _random_outputs(rng)
  cost = np.asarray(det.matching_cost(logits, boxes, tc, tb, w_class=1.5, w_l1=5.0, w_giou=2.0))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  for i, j, k in itertools.product(range(2), range(5), range(4)):
    want = (-1.5 * p[i, j, tc[i, k]] + 5.0 * np.abs(boxes[i, j] - tb[i, k]).sum()
            - 2.0 * _giou_scalar(boxes[i, j], tb[i, k]))
    np.testing.assert_allclose(cost[i, j, k], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- losses

def test_detr_loss_against_loop():
  rng = np.random.default_rng(4)
  logits, boxes, tc, tb, valid = _random_outputs(rng)
  idx, matched = det.hungarian_match(det.matching_cost(logits, boxes, tc, tb), valid)
  out = losses.detr_loss(logits, boxes, tc, tb, valid, idx, matched, eos_coef=0.2, w_class=1.0, w_l1=5.0, w_giou=2.0)
  num = valid.sum()
  ce_num = ce_den = l1 = gl = 0.0
  for i in range(2):
    for j in range(5):
      lp = logits[i, j] - np.log(np.exp(logits[i, j]).sum())
      if matched[i, j]:
        k = idx[i, j]
        ce_num -= lp[tc[i, k]]
        ce_den += 1
        l1 += np.abs(boxes[i, j] - tb[i, k]).sum()
        gl += 1 - _giou_scalar(boxes[i, j], tb[i, k])
      else:
        ce_num -= 0.2 * lp[-1]
        ce_den += 0.2
  np.testing.assert_allclose(out["loss_ce"], ce_num / ce_den, rtol=1e-5)
  np.testing.assert_allclose(out["loss_l1"], l1 / num, rtol=1e-5)
  np.testing.assert_allclose(out["loss_giou"], gl / num, rtol=1e-5)
  np.testing.assert_allclose(out["loss"], ce_num / ce_den + 5 * l1 / num + 2 * gl / num, rtol=1e-5)
  assert int(out["num_targets"]) == num == matched.sum()
  # Perfect boxes give zero box losses.
  perfect = np.take_along_axis(tb, idx[..., None], axis=1)
  out = losses.detr_loss(logits, perfect, tc, tb, valid, idx, matched)
  assert abs(float(out["loss_l1"])) < 1e-6 and abs(float(out["loss_giou"])) < 1e-6


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_mask_losses_against_naive():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, 3, 5, 7)).astype(np.float64) * 3
  t = (rng.random((2, 3, 5, 7)) < 0.4).astype(np.float64)
  t[0, 1] = rng.random((5, 7))  # soft targets too
  w = np.array([[1, 0, 1], [1, 1, 0]], np.float64)
  n = 3.0
  dice = ce = focal = 0.0
  for i, j in itertools.product(range(2), range(3)):
    p = _sigmoid(x[i, j]).ravel()
    tt = t[i, j].ravel()
    dice += w[i, j] * (1 - (2 * (p * tt).sum() + 1) / (p.sum() + tt.sum() + 1))
    bce = -(tt * np.log(p) + (1 - tt) * np.log(1 - p))
    ce += w[i, j] * bce.mean()
    pt = p * tt + (1 - p) * (1 - tt)
    focal += w[i, j] * ((0.25 * tt + 0.75 * (1 - tt)) * (1 - pt) ** 2 * bce).mean()
  np.testing.assert_allclose(losses.dice_loss(jnp.asarray(x), t, w, n), dice / n, rtol=1e-5)
  np.testing.assert_allclose(losses.sigmoid_ce_loss(jnp.asarray(x), t, w, n), ce / n, rtol=1e-5)
  np.testing.assert_allclose(losses.sigmoid_focal_loss(jnp.asarray(x), t, w, n), focal / n, rtol=1e-5)
  # Extreme logits stay finite.
  big = jnp.full((1, 1, 2, 2), 200.0)
  assert np.isfinite(losses.sigmoid_ce_loss(big, jnp.zeros((1, 1, 2, 2)), jnp.ones((1, 1)), 1.0))


def test_mask_loss_resizes_and_gathers_matched_targets():
  rng = np.random.default_rng(6)
  tgt = rng.random((2, 3, 8, 12)) < 0.5
  logits = rng.normal(size=(2, 4, 4, 6)).astype(np.float32)
  valid = np.array([[True, True, False], [True, False, False]])
  idx = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.int32)
  matched = np.array([[True, True, False, False], [False, False, True, False]])
  out = losses.mask_loss(logits, tgt, valid, idx, matched, w_dice=2.0, w_ce=0.5)
  small = tgt.reshape(2, 3, 4, 2, 6, 2).mean(axis=(3, 5))  # 2x2 area averages
  np.testing.assert_allclose(det.resize_masks(tgt, (4, 6)), small, atol=1e-7)
  want_t = np.stack([small[0, [1, 0, 0, 0]], small[1, [0, 0, 0, 0]]])
  w = matched.astype(np.float32)
  dice = losses.dice_loss(logits, want_t, w, 3.0)
  ce = losses.sigmoid_ce_loss(logits, want_t, w, 3.0)
  np.testing.assert_allclose(out["loss_dice"], dice, rtol=1e-6)
  np.testing.assert_allclose(out["loss_mask_ce"], ce, rtol=1e-6)
  np.testing.assert_allclose(out["loss"], 2 * dice + 0.5 * ce, rtol=1e-6)
  assert det.resize_masks(tgt, (5, 5)).shape == (2, 3, 5, 5)  # non-divisible sizes resample


def test_losses_live_in_the_losses_module():
  for name in ("detr_loss", "mask_loss", "dice_loss", "sigmoid_ce_loss", "sigmoid_focal_loss"):
    assert callable(getattr(losses, name)) and not hasattr(det, name)


def test_pad_targets_on_shapes():
  src = ShapesSource("image_caption", 4, seed=0, cfg=ShapesConfig(max_objects=3))
  ex = [src[i] for i in range(4)]
  t = det.pad_targets(ex, 3)
  assert t["tgt_masks"].shape == (4, 3, 32, 32) and t["tgt_boxes"].shape == (4, 3, 4)
  for i, e in enumerate(ex):
    n = len(e["classes"])
    assert t["tgt_valid"][i].sum() == n
    np.testing.assert_allclose(det.box_cxcywh_to_xyxy(t["tgt_boxes"][i, :n]) * 32, e["boxes"], atol=1e-5)
  with pytest.raises(ValueError, match="max_objects"):
    det.pad_targets([e for e in ex if len(e["classes"]) > 1][:1], 1)


# ------------------------------------------------------------------------------- metrics

def _gt(boxes, classes):
  return dict(boxes=np.asarray(boxes, np.float64), classes=np.asarray(classes))


def _dt(boxes, scores, classes):
  return dict(boxes=np.asarray(boxes, np.float64), scores=np.asarray(scores), classes=np.asarray(classes))


def test_map_perfect_prediction_is_one():
  gts = [_gt([[0, 0, 5, 5], [10, 10, 20, 18]], [0, 2]), _gt([[3, 3, 9, 9]], [1])]
  dts = [_dt(g["boxes"], np.ones(len(g["classes"])), g["classes"]) for g in gts]
  out = dm.detection_map(dts, gts, num_classes=4)
  assert out["map"] == out["map50"] == out["map75"] == 1.0
  assert np.isnan(out["ap"][3]).all() and list(out["num_gt"]) == [1, 1, 1, 0]  # class 3 has no GT


def test_map_hand_cases():
  g = [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])]
  # TP, FP, TP by score: recall .5 .5 1, precision 1 .5 .667 -> monotone 1 .667 .667;
  # 51 recall points (0 .. .5) at 1, 50 at 2/3.
  d = [_dt([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
  np.testing.assert_allclose(dm.detection_map(d, g, 1)["map50"], (51 + 50 * 2 / 3) / 101)
  # One of two found: 51 of 101 points.
  np.testing.assert_allclose(dm.detection_map([_dt([[0, 0, 10, 10]], [0.5], [0])], g, 1)["map50"], 51 / 101)
  # Wrong class: nothing found.
  assert dm.detection_map([_dt([[0, 0, 10, 10]], [0.5], [1])], g, 2)["map50"] == 0.0
  # IoU 40/64 = 0.625 passes thresholds .5, .55, .6 only.
  out = dm.detection_map([_dt([[0, 0, 8, 5]], [1.0], [0])], [_gt([[0, 0, 8, 8]], [0])], 1)
  np.testing.assert_allclose(out["ap"][0], [1, 1, 1] + [0] * 7)
  np.testing.assert_allclose(out["map"], 0.3)
  assert out["map50"] == 1.0 and out["map75"] == 0.0
  # Duplicate on one GT: the higher score is the TP, the lower a FP after it -> AP 1.
  dup = [_dt([[0, 0, 10, 10], [0, 0, 10, 9]], [0.6, 0.9], [0, 0])]
  np.testing.assert_allclose(dm.detection_map(dup, [_gt([[0, 0, 10, 10]], [0])], 1)["map50"], 1.0)
  # ... but a FP ranked first halves the precision: 101 points at 1/2.
  first_fp = [_dt([[40, 40, 50, 50], [0, 0, 10, 10]], [0.9, 0.6], [0, 0])]
  np.testing.assert_allclose(dm.detection_map(first_fp, [_gt([[0, 0, 10, 10]], [0])], 1)["map50"], 0.5)
  # Two classes averaged: class 0 perfect, class 1 missed.
  two = dm.detection_map([_dt([[0, 0, 10, 10]], [1.0], [0])], [_gt([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])], 2)
  np.testing.assert_allclose(two["map50"], 0.5)


def test_map_merges_images_by_score():
  # Image A: TP at 0.9; image B: FP at 0.8, TP at 0.3. Merged: TP FP TP over 2 GT.
  gts = [_gt([[0, 0, 10, 10]], [0]), _gt([[0, 0, 10, 10]], [0])]
  dts = [_dt([[0, 0, 10, 10]], [0.9], [0]), _dt([[30, 30, 40, 40], [0, 0, 10, 10]], [0.8, 0.3], [0, 0])]
  np.testing.assert_allclose(dm.detection_map(dts, gts, 1)["map50"], (51 + 50 * 2 / 3) / 101)


def test_detections_from_outputs_and_mask_iou():
  logits = np.log(np.array([[[0.7, 0.1, 0.2], [0.1, 0.1, 0.8]]]))  # 2 classes + no-object
  boxes = np.array([[[0.5, 0.5, 0.5, 0.25], [0.1, 0.1, 0.1, 0.1]]])
  d = dm.detections_from_outputs(logits, boxes, (16, 32), score_threshold=0.15)
  np.testing.assert_allclose(d[0]["scores"], [0.7])  # query 2's best real class has 0.1
  np.testing.assert_allclose(d[0]["boxes"], [[8, 6, 24, 10]])
  assert list(d[0]["classes"]) == [0]

  tgt = np.zeros((1, 2, 4, 4), bool)
  tgt[0, 0, :2, :2] = True  # 4 pixels
  tgt[0, 1, 2:, :] = True  # 8 pixels
  pred = np.full((1, 3, 4, 4), -5.0)
  pred[0, 0, :2, :3] = 5  # vs target 0: inter 4, union 6
  pred[0, 1, 2:, :] = 5  # vs target 1: exact
  out = dm.matched_mask_iou(pred, tgt, np.array([[0, 1, 0]]), np.array([[True, True, False]]))
  np.testing.assert_allclose(out["mask_iou"], (4 / 6 + 1) / 2)
  assert out["count"] == 2
