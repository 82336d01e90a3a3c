"""The 'vlm' family: a ViT tower, a projector and a LLaMA-style decoder (`mmjax.models.vlm`).

Owns `config.vlm` (how the tower feeds the decoder). Either the whole model comes from a
Hugging Face LLaVA / Video-LLaVA directory (`config.init_from_hf`; its config.json sets the
towers, projector, language model and placeholder ids, the run config keeps the numerics,
`mmjax.convert.vlm`), or the tower comes from `config.vision` / `config.init_vision_from_hf`
(`mmjax.families.tower`) and the decoder from `config.model` / `config.init_from_hf` of a
LLaMA directory (`mmjax.families.decoder`), imported parts replacing the seeded random init
of those parts. Its batches carry the pixels the data gives (`images` and / or `frames`,
`mmjax.data.catalog.media_fields`). The finished run is written to WORKDIR/model (an mmjax
VLM directory that `tools/convert_hf.py export` turns into LLaVA / Video-LLaVA).
"""
from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import files
from mmjax.config.core import ConfigError, check_choice
from mmjax.convert import vlm as convert_vlm
from mmjax.convert.common import read_json
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
      video_tower=False,  # frames go through a second ViT `video_tower/` (config.vision's shape), images
      #                     through `vision/`: separate image and video paths (as Video-LLaVA's two towers)
  ))
  cfg.update(overrides)
  return cfg


def config_dict() -> dict:
  return {"vlm": vlm_config_dict()}


def validate(config, env) -> None:
  check_choice("vlm.projector", config.vlm.projector, PROJECTORS)
  check_choice("vlm.feature", config.vlm.feature, FEATURES)
  decoder.validate_shapes(config)
  if hf_vlm(config) is not None and config.init_vision_from_hf:
    raise ConfigError(f"config.init_from_hf={config.init_from_hf!r} is a whole VLM (its towers included); "
                      f"leave config.init_vision_from_hf empty (it is {config.init_vision_from_hf!r})")


def hf_vlm(config) -> dict | None:
  """The config.json of `config.init_from_hf` when it is a LLaVA / Video-LLaVA directory."""
  if not config.init_from_hf:
    return None
  try:
    hf = read_json(config.init_from_hf, "config.json")
  except ValueError as e:
    raise ConfigError(f"config.init_from_hf={config.init_from_hf!r}: {e}") from None
  return hf if convert_vlm.is_vlm(hf) else None


def hf_vlm_config(config, hf: dict) -> vlm.VLMConfig:
  """The VLM of a Hugging Face directory with the run's numerics and LoRA scale."""
  try:
    cfg = convert_vlm.vlm_config_from_hf(hf)
  except ValueError as e:
    raise ConfigError(f"config.init_from_hf={config.init_from_hf!r}: {e}") from None
  return dataclasses.replace(cfg, vision=decoder.with_run_numerics(cfg.vision, config.vision, config),
                             llm=decoder.with_run_rows(
                                 decoder.with_run_numerics(cfg.llm, config.model, config), config))


def _check_placeholders(config, tokenizer, cfg) -> None:
  for kind, want in (("image", cfg.image_token_id), ("video", cfg.video_token_id)):
    got = getattr(tokenizer, f"{kind}_id", None)
    if want is not None and got != want:
      raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r} maps <{kind}> to {got}, but the model's "
                        f"{kind} placeholder is {want}; use the model directory's own tokenizer")


class VLMFamily(base.Family):

  def build(self, config, tokenizer):
    hf = hf_vlm(config)
    if hf is not None:
      cfg = hf_vlm_config(config, hf)
      _check_placeholders(config, tokenizer, cfg)
    else:
      if getattr(tokenizer, "image_id", None) is None:
        raise ConfigError(f"config.data.tokenizer={config.data.tokenizer!r} has no '<image>' token, which a VLM needs")
      x = config.vlm
      cfg = vlm.VLMConfig(
          vision=tower.vit_config(config), llm=decoder.decoder_config(config, tokenizer),
          projector=x.projector, projector_hidden=x.projector_hidden or None, image_token_id=tokenizer.image_id,
          max_frames=x.max_frames, temporal_pool=x.temporal_pool, feature=x.feature, feature_layer=x.feature_layer,
          video_tower=bool(x.video_tower))
    size = config.data.image_size
    visual = {"image": (cfg.image_token_id, vlm.num_visual_tokens(cfg, "image", image_size=size))}
    if cfg.max_frames:
      n = vlm.num_visual_tokens(cfg, "video", n_frames=config.data.video_frames, image_size=size)
      visual["video"] = (cfg.video_token_id if cfg.video_token_id is not None else cfg.image_token_id, n)
    return vlm.VLM(cfg), cfg, visual

  def media_fields(self, config):
    return catalog.media_fields(config.data)

  def flops(self, model_cfg, config, abstract_params, patterns, visual_tokens):
    return flops.decoder_flops(model_cfg, config, abstract_params, patterns, visual_tokens,
                               self.media_fields(config))

  def hf_parts(self, config) -> dict:
    if hf_vlm(config) is not None:
      return {None: _import_whole}
    parts = {}
    if config.init_from_hf:
      parts["llm"] = decoder.import_decoder
    if config.init_vision_from_hf:
      parts["vision"] = tower.import_tower
    return parts

  def start_from(self, config, run, params):
    """A stage that adds the video tower (`vlm.video_tower`) to an earlier stage's one-tower
    model starts it as a copy of the image tower, as Video-LLaVA's LanguageBind video tower
    starts from its image encoder: the two paths are aligned at the start and drift apart
    only by what each is trained on."""
    if run.model_cfg.video_tower and "video_tower" not in params and "vision" in params:
      return dict(params, video_tower=jax.tree.map(jnp.copy, params["vision"]))
    return params

  def export(self, workdir, config, run, variables):
    path = os.path.join(workdir, "model")
    if os.path.exists(path):
      return  # a finished run re-started keeps its first export
    hf = hf_vlm(config)
    arch = convert_vlm.architecture_of(hf) if hf is not None else None
    with files.atomic_dir(path) as tmp:
      convert_vlm.save_dir(tmp, run.model_cfg, variables["params"], variables.get("lora"), hf_architecture=arch,
                           hf_config=hf, hf_dir=config.init_from_hf or None)


def _import_whole(config, mesh, rules) -> dict:
  cfg = hf_vlm_config(config, hf_vlm(config))
  _, params = convert_vlm.import_hf_vlm(config.init_from_hf, mesh=mesh, rules=rules, cfg=cfg)
  return params


FAMILY = VLMFamily()
