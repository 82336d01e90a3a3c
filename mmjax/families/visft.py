"""The 'visft' family: a ViT with detection, segmentation and caption heads
(`mmjax.models.heads.VisionTaskModel`), the model of the 'visft' objective.

The tower comes from `config.vision` or `config.init_vision_from_hf` (`mmjax.families.tower`);
which heads exist and their sizes from `config.visft` (the ViSFT objective's section: the
heads and their task weights go together), the heads' numerics from `config.model`. Only the
tower is imported from Hugging Face; its result (adapter merged) is exported as
WORKDIR/vision and, for an imported CLIP / SigLIP tower, WORKDIR/vision_hf.
"""
from __future__ import annotations

from mmjax import lora as lora_lib
from mmjax.data import coco, shapes
from mmjax.families import base, decoder, tower
from mmjax.models import heads
from mmjax.train import flops

NAME = "visft"


def config_dict() -> dict:
  return {}  # the heads live in config.visft (mmjax.objectives.visft)


def validate(config, env) -> None:
  """Head checks are the ViSFT objective's (`mmjax.objectives.visft.validate`)."""


def data_num_classes(data_cfg) -> int:
  """Object classes of the data source: shapes' shape names or the COCO categories."""
  if data_cfg.source == "coco":
    return len(coco.CocoSource(data_cfg.coco_root, data_cfg.train_split, data_cfg.image_size,
                               data_cfg.max_objects).class_names)
  return shapes.ShapesConfig().num_classes


def task_config(config, tokenizer) -> heads.VisionTaskConfig:
  """`VisionTaskConfig` from the run config (classes from `visft.num_classes` or, when it is
  -1, from the data source)."""
  v, m = config.visft, config.model
  lora = decoder.lora_fields(config)
  common = dict(d_model=v.d_model, n_layers=v.n_layers, n_heads=v.n_heads, head_dim=v.head_dim,
                mlp_dim=v.mlp_dim, dtype=m.dtype, param_dtype=m.param_dtype, **lora)
  n_cls = v.num_classes if v.num_classes > 0 else data_num_classes(config.data)
  return heads.VisionTaskConfig(
      vision=tower.vit_config(config),
      detection=heads.DetectionConfig(**common, num_classes=n_cls, num_queries=v.num_queries) if v.detection else None,
      segmentation=heads.SegmentationConfig(mask_dim=v.mask_dim, upsample=v.mask_upsample, dtype=m.dtype,
                                            param_dtype=m.param_dtype, **lora) if v.segmentation else None,
      caption=heads.CaptionConfig(**common, vocab_size=tokenizer.vocab_size, max_len=config.seq_len)
      if v.caption else None)


class ViSFTFamily(base.Family):

  def build(self, config, tokenizer):
    cfg = task_config(config, tokenizer)
    return heads.VisionTaskModel(cfg), cfg, None

  def flops(self, model_cfg, config, abstract_params, patterns, visual_tokens):
    return 0.0, flops.vit_heads_flops(model_cfg, config, abstract_params, patterns)

  def hf_parts(self, config) -> dict:
    return {"vision": tower.import_tower} if config.init_vision_from_hf else {}

  def export(self, workdir, config, run, variables):
    params = variables["params"]["vision"]
    if "lora" in variables and "vision" in variables["lora"]:
      params = lora_lib.merge(params, variables["lora"]["vision"], config.lora.alpha, config.lora.rslora)
    tower.export_tower(workdir, config, run.model_cfg.vision, params)


FAMILY = ViSFTFamily()
