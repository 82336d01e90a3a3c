"""Detection and instance-segmentation metrics on numpy arrays: COCO-style box mAP and mask
IoU over matched queries.

`detection_map` follows pycocotools' `COCOeval` for boxes (no crowd regions, no area
ranges): per image and class, detections sorted by score (top `max_dets`) are greedily
matched to the unmatched ground truth of highest IoU >= the threshold; per class,
detections of all images are merged by score, precision is made monotone and sampled at 101
recall points (0, 0.01, ..., 1; 0 past the highest recall); AP is their mean, and mAP the
mean over classes that have ground truth. Boxes are pixel (x0, y0, x1, y1) edges; IoU is
the plain ratio of areas (no +1 pixel convention).
"""
from __future__ import annotations

import numpy as np

from mmjax import boxes as det

COCO_IOUS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2))
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def interpolated_ap(tp: np.ndarray, num_gt: int) -> float:
  """COCO 101-point AP from the TP flags [K] of detections sorted by descending score."""
  if num_gt == 0:
    return float("nan")
  tp = np.asarray(tp, bool)
  if tp.size == 0:
    return 0.0
  tps = np.cumsum(tp).astype(np.float64)
  fps = np.cumsum(~tp).astype(np.float64)
  recall = tps / num_gt
  precision = tps / np.maximum(tps + fps, np.spacing(1))
  precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone non-increasing
  idx = np.searchsorted(recall, RECALL_POINTS, side="left")
  q = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
  return float(np.mean(q))


def _match_image(boxes, scores, gt_boxes, thresholds, max_dets):
  """One image, one class: (scores [K], tp [T, K]) of its top-`max_dets` detections."""
  order = np.argsort(-scores, kind="mergesort")[:max_dets]
  boxes, scores = boxes[order], scores[order]
  tp = np.zeros((len(thresholds), len(scores)), bool)
  if len(gt_boxes) and len(boxes):
    ious = np.asarray(det.pairwise_iou(boxes.astype(np.float64), gt_boxes.astype(np.float64)))
    for ti, t in enumerate(thresholds):
      taken = np.zeros(len(gt_boxes), bool)
      for d in range(len(boxes)):
        best, m = min(t, 1 - 1e-10), -1
        for g in range(len(gt_boxes)):
          if taken[g] or ious[d, g] < best:
            continue
          best, m = ious[d, g], g
        if m >= 0:
          taken[m] = True
          tp[ti, d] = True
  return scores, tp


def detection_map(detections, ground_truths, num_classes: int, iou_thresholds=COCO_IOUS,
                  max_dets: int = 100) -> dict:
  """COCO box mAP.

  detections: per image a dict with `boxes` [K, 4] xyxy, `scores` [K], `classes` [K];
  ground_truths: per image a dict with `boxes` [N, 4] xyxy and `classes` [N].
  Returns `map` (mean over thresholds and classes with ground truth), `map50`, `map75` (when
  0.5 / 0.75 are thresholds), `ap` [C, T] per class and threshold (nan where a class has no
  ground truth) and `num_gt` [C].
  """
  if len(detections) != len(ground_truths):
    raise ValueError(f"detection_map: {len(detections)} detection lists for {len(ground_truths)} images")
  thresholds = np.asarray(iou_thresholds, np.float64)
  ap = np.full((num_classes, len(thresholds)), np.nan)
  num_gt = np.zeros(num_classes, np.int64)
  for c in range(num_classes):
    all_scores, all_tp = [], []
    for d, g in zip(detections, ground_truths):
      dsel = np.asarray(d["classes"]) == c
      gsel = np.asarray(g["classes"]) == c
      gt_boxes = np.asarray(g["boxes"], np.float64).reshape(-1, 4)[gsel]
      num_gt[c] += len(gt_boxes)
      s, tp = _match_image(np.asarray(d["boxes"], np.float64).reshape(-1, 4)[dsel],
                           np.asarray(d["scores"], np.float64)[dsel], gt_boxes, thresholds, max_dets)
      all_scores.append(s)
      all_tp.append(tp)
    if num_gt[c] == 0:
      continue
    scores = np.concatenate(all_scores)
    tp = np.concatenate(all_tp, axis=1)
    order = np.argsort(-scores, kind="mergesort")
    for ti in range(len(thresholds)):
      ap[c, ti] = interpolated_ap(tp[ti, order], int(num_gt[c]))
  has_gt = num_gt > 0
  out = dict(ap=ap, num_gt=num_gt, map=float(np.mean(ap[has_gt])) if has_gt.any() else float("nan"))
  for name, t in (("map50", 0.5), ("map75", 0.75)):
    hit = np.flatnonzero(np.isclose(thresholds, t))
    if hit.size:
      out[name] = float(np.mean(ap[has_gt, hit[0]])) if has_gt.any() else float("nan")
  return out


def detections_from_outputs(logits, boxes, image_hw, score_threshold: float = 0.0) -> list[dict]:
  """DETR post-processing: per query, score and class = max and argmax of the softmax over
  real classes (no-object dropped); boxes cxcywh [0, 1] -> pixel xyxy. logits [B, Q, C+1];
  boxes [B, Q, 4]. Returns per image a dict for `detection_map`."""
  logits = np.asarray(logits, np.float64)
  e = np.exp(logits - logits.max(-1, keepdims=True))
  prob = (e / e.sum(-1, keepdims=True))[..., :-1]
  scores, classes = prob.max(-1), prob.argmax(-1)
  h, w = image_hw
  xyxy = det.box_cxcywh_to_xyxy(np.asarray(boxes, np.float64)) * np.asarray([w, h, w, h], np.float64)
  out = []
  for i in range(logits.shape[0]):
    keep = scores[i] > score_threshold
    out.append(dict(boxes=xyxy[i][keep], scores=scores[i][keep], classes=classes[i][keep]))
  return out


def ground_truths_from_targets(tgt_boxes_xyxy, tgt_classes, tgt_valid) -> list[dict]:
  """Padded targets ([B, N, 4] pixel xyxy, [B, N], [B, N] bool) -> per-image dicts."""
  v = np.asarray(tgt_valid, bool)
  return [dict(boxes=np.asarray(tgt_boxes_xyxy)[i][v[i]], classes=np.asarray(tgt_classes)[i][v[i]])
          for i in range(v.shape[0])]


def matched_mask_iou(mask_logits, tgt_masks, tgt_idx, matched) -> dict:
  """Mask IoU of matched queries: prediction = logit > 0, target = resized mask >= 0.5 (at the
  prediction's size). mask_logits [B, Q, h, w]; tgt_masks [B, N, H, W]; matching [B, Q].
  Returns `mask_iou` (mean over matched queries; nan if none), `iou_sum`, `count`."""
  pred = np.asarray(mask_logits) > 0
  tm = np.asarray(det.resize_masks(np.asarray(tgt_masks), pred.shape[-2:])) >= 0.5
  tm = np.take_along_axis(tm, np.asarray(tgt_idx)[:, :, None, None], axis=1)
  inter = np.sum(pred & tm, axis=(-2, -1))
  union = np.sum(pred | tm, axis=(-2, -1))
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)  # both empty: a perfect match
  m = np.asarray(matched, bool)
  total, count = float(np.sum(iou[m])), int(m.sum())
  return dict(mask_iou=total / count if count else float("nan"), iou_sum=total, count=count)
