"""The vision-tower part: `config.vision` and `config.init_vision_from_hf`, and the tower's
`ViTConfig` built from them (used by the 'vlm' and 'visft' families)."""
from __future__ import annotations

import dataclasses
import os

import ml_collections

from mmjax import files
from mmjax.config.core import ConfigError
from mmjax.convert import eva as convert_eva
from mmjax.convert import vision as convert_vision
from mmjax.convert.common import read_json
from mmjax.families.decoder import lora_fields, with_run_numerics
from mmjax.models import vit


def vision_config_dict(**overrides) -> ml_collections.ConfigDict:
  """`config.vision`: the fields of `ViTConfig` (the tower of the 'vlm' and 'visft' families)."""
  fields = {f.name: f.default for f in dataclasses.fields(vit.ViTConfig)}
  for name in ("lora_alpha", "lora_rslora", "lora_dropout"):  # these come from config.lora
    fields.pop(name)
  fields["layer_scale"] = 0.0  # 0 = off
  cfg = ml_collections.ConfigDict(fields)
  cfg.update(overrides)
  return cfg


def config_dict() -> dict:
  return {
      "vision": vision_config_dict(),  # the vision tower, when model.name is 'vlm' or 'visft'
      # A local HF CLIP / SigLIP directory: its vision tower replaces config.vision's sizes
      # and init (VLM and ViSFT; dtype/remat/attention stay).
      "init_vision_from_hf": "",
  }


def validate(config, env) -> None:
  """Nothing beyond the schema: `ViTConfig` checks its own fields when a family builds it."""


def vit_config(config) -> vit.ViTConfig:
  """The tower's `ViTConfig`: from `config.vision`, or from the config.json of
  `config.init_vision_from_hf` (a CLIP / SigLIP directory), keeping the run's numerics and
  memory settings (dtype, param_dtype, remat, attention) and the LoRA scale."""
  if config.init_vision_from_hf:
    try:
      hf = read_json(config.init_vision_from_hf, "config.json")
      cfg = convert_eva.vit_config_from_eva(hf) if convert_eva.is_eva(hf) else convert_vision.vit_config_from_hf(hf)
    except ValueError as e:
      raise ConfigError(f"config.init_vision_from_hf={config.init_vision_from_hf!r}: {e}") from None
    return with_run_numerics(cfg, config.vision, config)
  v = config.vision.to_dict()
  v["layer_scale"] = v["layer_scale"] or None
  v.update(lora_fields(config))
  return vit.ViTConfig.from_dict(v)


def import_tower(config, mesh, rules) -> dict:
  """The tower's params from `config.init_vision_from_hf` (a CLIP / SigLIP directory or a timm
  EVA one), placed in their shardings."""
  path, dtype = config.init_vision_from_hf, config.vision.param_dtype
  if convert_eva.is_eva(read_json(path, "config.json")):
    return convert_eva.import_eva(path, mesh=mesh, rules=rules, dtype=dtype)[1]
  return convert_vision.import_hf_vision(path, mesh=mesh, rules=rules, dtype=dtype)[1]


def export_tower(workdir: str, config, vcfg, params) -> None:
  """A finished tower (adapter merged): WORKDIR/vision (an mmjax vision directory, see
  `mmjax.convert.vision`) and, when it came from a Hugging Face CLIP / SigLIP directory,
  WORKDIR/vision_hf in that family's format. A finished run re-started keeps its first export."""
  path = os.path.join(workdir, "vision")
  hf, arch = None, None
  if config.init_vision_from_hf:
    hf = read_json(config.init_vision_from_hf, "config.json")
    arch = None if convert_eva.is_eva(hf) else convert_vision.architecture_of(hf)  # EVA: no HF export
  if not os.path.exists(path):
    with files.atomic_dir(path) as tmp:
      convert_vision.save_dir(tmp, vcfg, params, hf_architecture=arch, hf_config=hf)
  hf_path = os.path.join(workdir, "vision_hf")
  if arch is not None and not os.path.exists(hf_path):
    out = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[convert_vision.ARCHITECTURES[arch][0]]
    with files.atomic_dir(hf_path) as tmp:
      convert_vision.export_hf_vision(tmp, vcfg, params, architecture=out, dtype=vcfg.param_dtype)
