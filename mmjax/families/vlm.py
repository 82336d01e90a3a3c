"""The 'vlm' family: a ViT tower, a projector and a LLaMA-style decoder (`mmjax.models.vlm`).

Owns `config.vlm` (how the tower feeds the decoder); the tower comes from `config.vision` or
`config.init_vision_from_hf` (`mmjax.families.tower`), the decoder from `config.model` or
`config.init_from_hf` (`mmjax.families.decoder`); imported parts replace the seeded random
init of those parts. Its batches carry the pixels the data source gives (`images` or
`frames`, `mmjax.data.catalog.media_fields`). No Hugging Face export yet.
"""
from __future__ import annotations

import ml_collections

from mmjax.config.core import ConfigError, check_choice
from mmjax.data import catalog
from mmjax.families import base, decoder, tower
from mmjax.models import vlm
from mmjax.train import flops

NAME = "vlm"
PROJECTORS = ("linear", "mlp2")
FEATURES = ("patches", "all", "pooled")


def vlm_config_dict(**overrides) -> ml_collections.ConfigDict:
  """`config.vlm`: how the tower feeds the language model."""
  cfg = ml_collections.ConfigDict(dict(
      projector="mlp2",  # 'linear' or 'mlp2' (linear, GELU, linear)
      projector_hidden=0,  # mlp2 hidden width; 0 = the language model's d_model
      max_frames=8,  # frames per video the temporal embedding covers
      temporal_pool=1,  # average frames over time in groups of this many
      feature="patches",  # 'patches', 'all' (with the class token) or 'pooled' (one token per frame)
      feature_layer=ml_collections.config_dict.placeholder(int),  # None: the tower's output; int: a hidden state (HF vision_feature_layer)
  ))
  cfg.update(overrides)
  return cfg


def config_dict() -> dict:
  return {"vlm": vlm_config_dict()}


def validate(config, env) -> None:
  check_choice("vlm.projector", config.vlm.projector, PROJECTORS)
  check_choice("vlm.feature", config.vlm.feature, FEATURES)
  decoder.validate_shapes(config)


class VLMFamily(base.Family):

  def build(self, config, tokenizer):
    if getattr(tokenizer, "image_id", None) is None:
      raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r} has no '<image>' token, which a VLM needs")
    x = config.vlm
    cfg = vlm.VLMConfig(
        vision=tower.vit_config(config), llm=decoder.decoder_config(config, tokenizer),
        projector=x.projector, projector_hidden=x.projector_hidden or None, image_token_id=tokenizer.image_id,
        max_frames=x.max_frames, temporal_pool=x.temporal_pool, feature=x.feature, feature_layer=x.feature_layer)
    size = config.data.image_size
    visual = {"image": vlm.num_visual_tokens(cfg, "image", image_size=size)}
    if cfg.max_frames:
      visual["video"] = vlm.num_visual_tokens(cfg, "video", n_frames=config.data.video_frames, image_size=size)
    return vlm.VLM(cfg), cfg, visual

  def media_fields(self, config):
    return catalog.media_fields(config.data)

  def flops(self, model_cfg, config, abstract_params, patterns, visual_tokens):
    return flops.decoder_flops(model_cfg, config, abstract_params, patterns, visual_tokens,
                               self.media_fields(config))

  def hf_parts(self, config) -> dict:
    parts = {}
    if config.init_from_hf:
      parts["llm"] = decoder.import_decoder
    if config.init_vision_from_hf:
      parts["vision"] = tower.import_tower
    return parts


FAMILY = VLMFamily()
