"""ViSFT objective: a ViT trained through detection, instance-segmentation and caption heads.

The model is the 'visft' family's `mmjax.models.heads.VisionTaskModel` (`vision/...` and
`heads/...`), so the two ViSFT stages are the same objective with different trainable sets
(`mmjax.recipes.stages`):

  stage 1  trainable=('params/heads/.*',), no LoRA: the heads learn on a frozen tower
  stage 2  lora.targets over vision/..., trainable=('lora/vision/.*',): the tower's adapter
           learns through the frozen heads

Batch fields of one step (B images, N = data.max_objects target slots, L = seq_len, h x w the
mask head's output size; every field is built on the host by `example_fn`):

  images           float32 [B, S, S, 3] in [-1, 1]
  tgt_boxes        float32 [B, N, 4] normalised cxcywh
  tgt_classes      int32   [B, N]
  tgt_valid        int32   [B, N] 1 on real objects
  tgt_masks        float32 [B, N, h, w] area-averaged instance masks  (segmentation head)
  caption_tokens / caption_targets / caption_mask  int32 [B, L]        (caption head)
  example_weight   float32 [B, 1] 1 for real images, 0 for eval padding rows

Loss per image = w_detection * DETR loss + w_segmentation * mask loss + w_caption * token-mean
caption NLL, each a batch mean as DETR normalises it (box and mask terms over the batch's
target count, class CE over all queries); the step sums loss * images and divides by the
images of the whole accumulated batch, so grad accumulation weighs micro-batches by images.
Hungarian matching runs on the host inside the jitted step (`jax.pure_callback`, per data
shard under `shard_map` when the batch is sharded).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from mmjax import boxes as det
from mmjax import losses
from mmjax.config.core import ConfigError
from mmjax.data import media
from mmjax.evals import visft as visft_eval
from mmjax.objectives import base

NAME = "visft"
FAMILIES = ("visft",)
TARGET_FIELDS = ("tgt_boxes", "tgt_classes", "tgt_valid")
CAPTION_FIELDS = ("caption_tokens", "caption_targets", "caption_mask")


def config_dict() -> dict:
  """`config.visft`: the heads on the tower (built by the 'visft' model family) and the task weights."""
  return {"visft": ml_collections.ConfigDict(dict(
      detection=True,  # DETR-style detection head
      segmentation=True,  # instance masks from the detection queries (needs detection)
      caption=True,  # autoregressive caption decoder (teacher-forced on seq_len tokens)
      d_model=64,  # width of the heads' decoders
      n_layers=2,  # decoder layers of each head
      n_heads=4,
      head_dim=16,
      mlp_dim=128,
      num_queries=8,  # detection queries (>= data.max_objects)
      num_classes=-1,  # -1: the data source's class count (shapes: data shapes; COCO: its categories)
      mask_dim=32,  # mask embedding width
      mask_upsample=4,  # masks are (grid * mask_upsample)^2; patch_size gives full resolution
      w_detection=1.0,  # task weights of the total loss (0 switches a task's loss off)
      w_segmentation=1.0,
      w_caption=1.0,
      eos_coef=0.1,  # DETR no-object class weight
      cost_class=1.0, cost_l1=5.0, cost_giou=2.0,  # Hungarian matching cost weights
      w_l1=5.0, w_giou=2.0, w_dice=1.0, w_mask_ce=1.0,  # loss term weights inside each task
      eval_examples=128,  # held-out images for mAP, mask IoU and caption metrics (0 = off)
      probe_train_examples=512,  # train images the out-of-domain probes are fitted on (0 = off)
      probe_eval_examples=256,  # held-out images the probes are scored on
      probe_ridge=1e-2,  # L2 strength of the closed-form ridge probes
      # Out-of-domain probe sets: NAME -> dict(data=dict(overrides of config.data), labels=(...)), labels from
      # count | shape | colour (of a one-object image: data.max_objects=1) | retrieval; each probe is fitted on
      # the set's train images and scored on its held-out ones (mmjax/evals/visft.py)
      probe_sets=ml_collections.ConfigDict(),
  ))}


SOURCES = ("shapes", "coco")


def validate(config, env) -> None:
  """ViSFT keys of a run config; raises `ConfigError` (one line) naming the key and the value."""
  v, d = config.visft, config.data
  if d.source not in SOURCES:
    raise ConfigError(f"config.data.source={d.source!r} is not valid for objective 'visft'; choose one of "
                      f"{', '.join(map(repr, SOURCES))} (image records with boxes, masks and captions)")
  if d.source == "shapes" and d.task != "image_caption":
    raise ConfigError(f"config.data.task={d.task!r} is not valid for objective 'visft' on shapes; use "
                      "'image_caption' (images with boxes, masks and a caption)")
  if not (v.detection or v.caption):
    raise ConfigError("config.visft.detection and config.visft.caption are both False; ViSFT needs a head")
  if v.segmentation and not v.detection:
    raise ConfigError("config.visft.segmentation=True needs config.visft.detection=True "
                      "(masks are predicted from the detection queries)")
  for key in ("w_detection", "w_segmentation", "w_caption", "eos_coef", "cost_class", "cost_l1", "cost_giou",
              "w_l1", "w_giou", "w_dice", "w_mask_ce", "probe_ridge"):
    if not v[key] >= 0:
      raise ConfigError(f"config.visft.{key}={v[key]!r} must be >= 0")
  for key in ("d_model", "n_layers", "n_heads", "head_dim", "mlp_dim", "num_queries", "mask_dim", "mask_upsample"):
    if not v[key] > 0:
      raise ConfigError(f"config.visft.{key}={v[key]!r} must be > 0")
  for key in ("eval_examples", "probe_train_examples", "probe_eval_examples"):
    if not v[key] >= 0:
      raise ConfigError(f"config.visft.{key}={v[key]!r} must be >= 0")
  for name, p in v.probe_sets.items():
    visft_eval.check_probe_set(config.data, name, p, env.files)
  if v.d_model % 4:
    raise ConfigError(f"config.visft.d_model={v.d_model} must be divisible by 4 (2-D sin-cos positions)")
  if v.detection and v.num_queries < d.max_objects:
    raise ConfigError(f"config.visft.num_queries={v.num_queries} must be >= config.data.max_objects="
                      f"{d.max_objects} (one query per object)")
  patch = config.vision.patch_size if not config.init_vision_from_hf else None
  if patch and d.image_size % patch:
    raise ConfigError(f"config.data.image_size={d.image_size} must be a multiple of config.vision.patch_size={patch}")
  if d.source == "coco":
    if not d.coco_root:
      raise ConfigError("config.data.coco_root='' : data.source='coco' needs the COCO root directory "
                        "(annotations/instances_SPLIT.json and SPLIT/ images)")
    if not d.train_split:
      raise ConfigError("config.data.train_split='' : data.source='coco' needs a split such as 'train2017'")


def mask_size(cfg, image_size: int) -> int:
  """Side of the segmentation head's masks for `image_size` images."""
  return (image_size // cfg.vision.patch_size) * cfg.segmentation.upsample


def example_fn(cfg, *, tokenizer, seq_len: int, image_size: int, max_objects: int):
  """record -> dict of numpy arrays (the batch fields above without the batch axis). Records
  are shapes image examples or `mmjax.data.coco.CocoSource` items (`image`, `boxes` pixel
  xyxy, `classes`, `masks`, `caption`)."""
  hw = mask_size(cfg, image_size) if cfg.segmentation is not None else 0

  def fn(record):
    if "image" not in record or "boxes" not in record or "classes" not in record:
      raise ValueError(f"visft needs image records with boxes and classes; got keys {sorted(record)}")
    src_hw = np.shape(record["image"])[:2]
    if src_hw != (image_size, image_size):  # boxes and masks are in the source image's pixels
      raise ValueError(f"visft: record {record.get('index')} has a {src_hw} image; data.image_size={image_size} "
                       "needs the source to render or resize its images (and boxes) to that size")
    out = {"images": media.load_image(record["image"], image_size)}
    ex = dict(record)
    if cfg.segmentation is None:
      ex.pop("masks", None)
    t = det.pad_targets([ex], max_objects, masks=cfg.segmentation is not None)
    out["tgt_boxes"] = t["tgt_boxes"][0]
    out["tgt_classes"] = t["tgt_classes"][0]
    out["tgt_valid"] = t["tgt_valid"][0].astype(np.int32)
    if cfg.segmentation is not None:
      out["tgt_masks"] = np.asarray(det.resize_masks(t["tgt_masks"][0], (hw, hw)), np.float32)
    if cfg.caption is not None:
      out.update(caption_row(record.get("caption", ""), tokenizer, seq_len))
    out["example_weight"] = np.ones((1,), np.float32)
    return out
  return fn


def caption_row(caption: str, tokenizer, seq_len: int) -> dict:
  """Teacher-forcing row of a caption: tokens = [start] + ids, targets = ids + [eos], all int32
  [seq_len] (pad after the end, mask 1 on targets; a caption too long for seq_len is cut and
  has no eos, as in `pipeline.tokenize_example`). `start` is the tokenizer's bos, or its pad id
  when it has none, so greedy decoding always has a first token (`heads.greedy_caption`)."""
  start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
  ids = ([start] + list(tokenizer.encode(caption)) + [tokenizer.eos_id])[:seq_len + 1]
  n = len(ids) - 1
  out = {k: np.full(seq_len, tokenizer.pad_id, np.int32) for k in ("caption_tokens", "caption_targets")}
  out["caption_tokens"][:n] = ids[:-1]
  out["caption_targets"][:n] = ids[1:]
  out["caption_mask"] = (np.arange(seq_len) < n).astype(np.int32)
  return out


def blank(example: dict) -> dict:
  """An eval padding row: the same arrays with nothing to score."""
  out = dict(example, example_weight=np.zeros((1,), np.float32), tgt_valid=np.zeros_like(example["tgt_valid"]))
  if "caption_mask" in out:
    out["caption_mask"] = np.zeros_like(example["caption_mask"])
  return out


@dataclasses.dataclass(frozen=True)
class ViSFT(base.Objective):
  w_detection: float = 1.0
  w_segmentation: float = 1.0
  w_caption: float = 1.0
  eos_coef: float = 0.1
  cost_class: float = 1.0
  cost_l1: float = 5.0
  cost_giou: float = 2.0
  w_l1: float = 5.0
  w_giou: float = 2.0
  w_dice: float = 1.0
  w_mask_ce: float = 1.0

  @classmethod
  def from_config(cls, config, model, media=()):
    v = config.visft
    keys = [f.name for f in dataclasses.fields(cls) if f.name not in ("model", "media")]
    return cls(model, **{k: float(v[k]) for k in keys})

  @property
  def cfg(self):
    return self.model.cfg

  @property
  def batch_fields(self):
    out = ("images", "example_weight") + TARGET_FIELDS
    if self.cfg.segmentation is not None:
      out += ("tgt_masks",)
    if self.cfg.caption is not None:
      out += CAPTION_FIELDS
    return out

  def example_fn(self, config, tokenizer):
    """record -> batch arrays (see `example_fn` above)."""
    d = config.data
    return example_fn(self.cfg, tokenizer=tokenizer, seq_len=config.seq_len, image_size=d.image_size,
                      max_objects=d.max_objects)

  def example_fns(self, config, tokenizer) -> dict:
    return {"example_fn": self.example_fn(config, tokenizer), "blank": blank}

  def extra_eval(self, run, variables, tokenizer) -> dict:
    """In-domain task metrics of the heads and out-of-domain probes of the tower."""
    return visft_eval.extra_eval(run, variables, tokenizer)

  def init_args(self, config):
    """Dummy inputs for `model.init` (one image and a caption row)."""
    s = config.data.image_size
    return (jnp.zeros((1, s, s, self.cfg.vision.num_channels), jnp.float32),
            jnp.zeros((1, config.seq_len), jnp.int32))

  def outputs(self, variables, batch, rng=None, train=False):
    text = batch.get("caption_tokens") if self.cfg.caption is not None else None
    return self.model.apply(variables, batch["images"], text, deterministic=not train,
                            rngs={"dropout": rng} if train else {})

  def match(self, out, batch):
    """(tgt_idx [B, Q], matched [B, Q]) of the Hungarian matching, on each data shard."""
    d = out["detection"]
    valid = batch["tgt_valid"] > 0
    cost = det.matching_cost(d["logits"], d["boxes"], batch["tgt_classes"], batch["tgt_boxes"],
                             w_class=self.cost_class, w_l1=self.cost_l1, w_giou=self.cost_giou)
    mesh, axes = _batch_mesh()
    return det.hungarian_match_jax(cost, valid, mesh, axes)

  def loss(self, variables, batch, rng, train: bool):
    out = self.outputs(variables, batch, rng, train)
    weight = batch["example_weight"][:, 0].astype(jnp.float32)
    n = jnp.sum(weight)
    total = jnp.zeros((), jnp.float32)
    sums = {}
    if self.cfg.detection is not None:
      idx, matched = self.match(out, batch)
      valid = batch["tgt_valid"] > 0
      d = out["detection"]
      dl = losses.detr_loss(d["logits"], d["boxes"], batch["tgt_classes"], batch["tgt_boxes"], valid, idx, matched,
                         eos_coef=self.eos_coef, w_l1=self.w_l1, w_giou=self.w_giou)
      total += self.w_detection * dl["loss"]
      sums.update({f"det_{k}": dl[k] * n for k in ("loss", "loss_ce", "loss_l1", "loss_giou", "class_accuracy")})
      if self.cfg.segmentation is not None:
        ml = losses.mask_loss(out["masks"], batch["tgt_masks"], valid, idx, matched, w_dice=self.w_dice,
                           w_ce=self.w_mask_ce, num_targets=dl["num_targets"])
        total += self.w_segmentation * ml["loss"]
        sums.update({f"seg_{k}": ml[k] * n for k in ("loss", "loss_dice", "loss_mask_ce")})
    if self.cfg.caption is not None:
      nll, count, correct = losses.cross_entropy_and_accuracy(out["caption"], batch["caption_targets"],
                                                              batch["caption_mask"])
      count = jnp.maximum(count.astype(jnp.float32), 1.0)
      total += self.w_caption * nll / count
      sums.update(caption_loss=nll / count * n, caption_accuracy=correct / count * n)
    sums["loss"] = total * n
    return total * n, n, sums

  def tokens(self, batch):
    """Images processed (throughput is reported per image for this objective)."""
    return jnp.sum(batch["example_weight"] > 0)  # [B, 1]


def _batch_mesh():
  """(mesh, batch axes) of the traced step's mesh when the batch is split over devices, else
  (None, None): matching then runs on the one device that holds the whole batch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return None, None
  axes = nn.logical_to_mesh_axes(("act_batch",))[0]
  if axes is None:
    return None, None
  return mesh, axes


OBJECTIVE = ViSFT
