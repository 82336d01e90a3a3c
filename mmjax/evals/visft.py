"""ViSFT evaluation: in-domain task metrics of the heads and out-of-domain probes of the tower.

In-domain, on the first `visft.eval_examples` held-out images:
  det_map50, det_map       COCO box mAP@0.5 and mAP@[.5:.95] (`mmjax.evals.detection`)
  mask_iou                 mean IoU of the masks of Hungarian-matched queries
  cap_exact_match          greedy captions equal to the truth; on shapes also cap_missing,
                           cap_hallucination (atomic facts, `mmjax.evals.captions`)
Out-of-domain, on frozen tower features (mean of the patch tokens), never trained on:
  probe_count_acc          ridge classifier of the number of objects in the image
  probe_retrieval_r1 / r5  image-to-text recall through a ridge map to bag-of-words captions

Truly out of domain, each probe set of `visft.probe_sets` (NAME -> data overrides and labels:
images the tower never saw, e.g. shapes or colours absent from training, more objects than
the training maximum, a noise background), on that set's own images:
  probe_NAME_count / probe_NAME_shape / probe_NAME_colour   ridge classifier accuracy (shape
                           and colour: of the one object of each image)
  probe_NAME_r1 / probe_NAME_r5                             image-to-text retrieval
  probe_ood_mean           the mean of the probe sets' accuracies and r1 (the recipe's probe mean)

Each probe is fitted on `visft.probe_train_examples` train images and scored on
`visft.probe_eval_examples` held-out images; both lists are fixed, so before/after numbers of
a stage compare the same images. Generated data is made that large; a dataset on disk with
fewer images stops the evaluation with a one-line ConfigError (0 turns the probes off).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from mmjax import boxes as det
from mmjax import sharding
from mmjax.config.core import ConfigError, derive
from mmjax.data import catalog, media, pipeline
from mmjax.evals import captions, features, probes
from mmjax.evals import detection as det_eval
from mmjax.models import heads


def _fns(run, tokenizer):
  """Jitted eval functions of a run, built once per run (`run.cache`)."""
  cache = run.cache.setdefault("visft_eval", {})
  if cache:
    return cache
  objective, model = run.objective, run.model
  in_ctx = functools.partial(sharding.in_context, mesh=run.mesh, rules=run.rules)

  def forward(variables, batch):
    out = objective.outputs(variables, batch)
    res = {}
    if "detection" in out:
      res.update(logits=out["detection"]["logits"], boxes=out["detection"]["boxes"])
      res["tgt_idx"], res["matched"] = objective.match(out, batch)
    if "masks" in out:
      res["masks"] = out["masks"]
    return res

  cache["forward"] = jax.jit(in_ctx(forward))
  if run.model_cfg.caption is not None:
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
    cache["caption"] = jax.jit(in_ctx(functools.partial(
        heads.greedy_caption, model, bos_id=start, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        max_len=run.config.seq_len)))
  return cache


def _decode(tokenizer, ids) -> str:
  ids = list(ids)
  if tokenizer.eos_id in ids:
    ids = ids[:ids.index(tokenizer.eos_id)]
  return tokenizer.decode([i for i in ids if i != tokenizer.pad_id])


def _global(run, full: dict) -> dict:
  """A batch every process builds whole (eval chunks are the same on each process), as
  global arrays of the objective's fields split over the batch axis."""
  return {k: sharding.from_full(full[k], run.mesh, run.rules) for k in run.objective.batch_fields}


def task_metrics(run, variables, tokenizer) -> dict:
  """mAP, mask IoU and caption metrics of the heads on held-out images (see module doc)."""
  config = run.config
  v, data = config.visft, config.data
  records = catalog.records(data, "eval", v.eval_examples)
  if not records:
    return {}
  fns = _fns(run, tokenizer)
  cfg = run.model_cfg
  make = run.objective.example_fn(config, tokenizer)
  size = data.image_size
  dets, gts, cap_scores, exact = [], [], [], []
  iou_sum, iou_count = 0.0, 0
  for chunk, n_real in pipeline.fixed_chunks(records, config.eval_batch_size):
    examples = [make(r) for r in chunk]
    local = {k: np.stack([e[k] for e in examples]) for k in run.objective.batch_fields}
    gb = _global(run, local)
    if cfg.detection is not None:
      out = {k: sharding.to_host(x)[:n_real] for k, x in fns["forward"](variables, gb).items()}
      dets += det_eval.detections_from_outputs(out["logits"], out["boxes"], (size, size))
      tgt = local["tgt_valid"][:n_real] > 0
      xyxy = det.box_cxcywh_to_xyxy(local["tgt_boxes"][:n_real]) * size
      gts += det_eval.ground_truths_from_targets(xyxy, local["tgt_classes"][:n_real], tgt)
      if cfg.segmentation is not None:
        m = det_eval.matched_mask_iou(out["masks"], local["tgt_masks"][:n_real], out["tgt_idx"], out["matched"])
        iou_sum, iou_count = iou_sum + m["iou_sum"], iou_count + m["count"]
    if cfg.caption is not None:
      ids = sharding.to_host(fns["caption"](variables, gb["images"]))[:n_real]
      for r, row in zip(chunk[:n_real], ids):
        text = _decode(tokenizer, row)
        exact.append(float(text.strip() == r.get("caption", "").strip()))
        if r.get("facts"):
          cap_scores.append(captions.caption_metrics(text, r["facts"], "image"))
  out = {}
  if cfg.detection is not None:
    m = det_eval.detection_map(dets, gts, cfg.detection.num_classes)
    out.update(det_map50=m["map50"], det_map=m["map"])
    if cfg.segmentation is not None:
      out["mask_iou"] = iou_sum / iou_count if iou_count else float("nan")
  if cfg.caption is not None:
    out["cap_exact_match"] = float(np.mean(exact))
    if cap_scores:
      agg = captions.aggregate(cap_scores)
      out.update(cap_missing=agg["missing"], cap_hallucination=agg["hallucination"])
  return out


PROBE_LABELS = ("count", "shape", "colour", "retrieval")


def check_probe_set(data_cfg, name: str, probe, files: bool = False) -> None:
  """One `visft.probe_sets` entry; a ConfigError naming it (one line)."""
  where = f"visft.probe_sets.{name}"
  if not hasattr(probe, "keys") or set(probe.keys()) - {"data", "labels"} or not probe.get("labels"):
    shown = probe.to_dict() if hasattr(probe, "to_dict") else probe
    raise ConfigError(f"config.{where}={shown!r} must be dict(data=dict(data overrides), labels=(...)) with labels "
                      f"from {', '.join(PROBE_LABELS)}")
  bad = [x for x in probe["labels"] if x not in PROBE_LABELS]
  if bad:
    raise ConfigError(f"config.{where}.labels has {bad[0]!r}; valid: {', '.join(PROBE_LABELS)}")
  data = catalog.overridden(data_cfg, probe.get("data", {}), f"{where}.data", files)
  if ({"shape", "colour"} & set(probe["labels"])) and (data.source != "shapes" or data.max_objects != 1):
    raise ConfigError(f"config.{where}: labels shape / colour name the one object of a shapes image; set its "
                      f"data.max_objects=1 (and data.source='shapes'), not {data.max_objects}")


def _probe(run, variables, data, labels, train_n: int, eval_n: int, prefix: str) -> dict:
  """The `labels` probes of tower features on `data`'s train / held-out images: `train_n` and
  `eval_n` of them (generated sets are made that large; a dataset on disk must hold that many,
  else a ConfigError: a probe on fewer images than asked has a larger error than planned)."""
  if not train_n or not eval_n:
    return {}
  config = run.config
  data = derive(data, {"num_train_examples": max(train_n, data.num_train_examples),
                       "num_eval_examples": max(eval_n, data.num_eval_examples)})
  train = catalog.records(data, "train", train_n)
  test = catalog.records(data, "eval", eval_n)
  if len(train) < train_n or len(test) < eval_n:
    name = prefix[len("probe_"):].rstrip("_")
    which = f"visft.probe_sets.{name}" if name else "in-domain"
    raise ConfigError(f"the visft probes ({which}) ask for config.visft.probe_train_examples={train_n} train and "
                      f"probe_eval_examples={eval_n} held-out images, but data.source={data.source!r} has "
                      f"{len(train)} and {len(test)}; ask for at most those (0 turns the probes off)")
  load = lambda recs: np.stack([media.load_image(r["image"], data.image_size) for r in recs])
  xtr = features.tower_features(run, variables, load(train), config.eval_batch_size)
  xte = features.tower_features(run, variables, load(test), config.eval_batch_size)
  ridge = config.visft.probe_ridge
  out = {}
  for label in labels:
    if label == "retrieval":
      if all(r.get("caption") for r in train + test):
        rec = probes.retrieval_probe(xtr, [r["caption"] for r in train], xte, [r["caption"] for r in test], l2=ridge)
        out.update({f"{prefix}r1": rec["r1"], f"{prefix}r5": rec["r5"]})
      continue
    if label == "count":
      of = lambda r: len(r["classes"])
      classes = list(range(data.max_objects + 1))
    else:  # the one object's shape or colour name
      of = lambda r, k=1 if label == "colour" else 2: r["facts"][0][k]
      classes = sorted({of(r) for r in train + test})
    ids = {c: i for i, c in enumerate(classes)}
    out[f"{prefix}{label}"] = probes.classification_probe(
        xtr, [ids[of(r)] for r in train], xte, [ids[of(r)] for r in test], num_classes=len(classes), l2=ridge)
  return out


def probe_metrics(run, variables) -> dict:
  """Count classification and image-to-text retrieval probes on frozen tower features, on the
  training distribution and on each out-of-domain probe set."""
  config = run.config
  v = config.visft
  n_train, n_eval = v.probe_train_examples, v.probe_eval_examples
  out = _probe(run, variables, config.data, ("count", "retrieval"), n_train, n_eval, "probe_")
  if "probe_count" in out:
    out["probe_count_acc"] = out.pop("probe_count")
  for key in ("r1", "r5"):
    if f"probe_{key}" in out:
      out[f"probe_retrieval_{key}"] = out.pop(f"probe_{key}")
  ood = []
  for name, p in v.probe_sets.items():
    data = catalog.overridden(config.data, p.get("data", {}), f"visft.probe_sets.{name}.data")
    got = _probe(run, variables, data, tuple(p["labels"]), n_train, n_eval, f"probe_{name}_")
    out.update(got)
    ood += [x for k, x in got.items() if not k.endswith("_r5")]
  if ood:
    out["probe_ood_mean"] = float(np.mean(ood))
  return out


def extra_eval(run, variables, tokenizer) -> dict:
  out = task_metrics(run, variables, tokenizer)
  out.update(probe_metrics(run, variables))
  return out
