"""The 'llama' family: a LLaMA-style decoder (`mmjax.models.llama`), text only.

From `config.model` (or the config.json of `config.init_from_hf`, whose weights it then
imports); its result is exported as an mmjax model directory (`WORKDIR/model`, base params
and adapter) that `tools/convert_hf.py export` turns into a Hugging Face directory.
"""
from __future__ import annotations

import os

from mmjax import files
from mmjax.convert import llama as convert_llama
from mmjax.convert import model_dir
from mmjax.convert.common import read_json
from mmjax.families import base, decoder
from mmjax.models.llama import Llama
from mmjax.train import flops

NAME = "llama"


def config_dict() -> dict:
  return {}  # config.model and config.init_from_hf belong to mmjax.families.decoder


def validate(config, env) -> None:
  decoder.validate_shapes(config)


class LlamaFamily(base.Family):

  def build(self, config, tokenizer):
    cfg = decoder.decoder_config(config, tokenizer)
    return Llama(cfg), cfg, None

  def flops(self, model_cfg, config, abstract_params, patterns, visual_tokens):
    return flops.decoder_flops(model_cfg, config, abstract_params, patterns, None)

  def hf_parts(self, config) -> dict:
    return {None: decoder.import_decoder} if config.init_from_hf else {}

  def export(self, workdir, config, run, variables):
    path = os.path.join(workdir, "model")
    if os.path.exists(path):
      return  # a finished run re-started keeps its first export
    arch = convert_llama.architecture_of(read_json(config.init_from_hf, "config.json")) if config.init_from_hf else None
    with files.atomic_dir(path) as tmp:
      model_dir.save(tmp, run.model_cfg, variables["params"], variables.get("lora"), hf_architecture=arch,
                     hf_dir=config.init_from_hf or None)


FAMILY = LlamaFamily()
