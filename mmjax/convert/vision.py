"""Hugging Face <-> mmjax for CLIP and SigLIP vision towers (`mmjax.models.vit.ViT`).

Architectures: `CLIPVisionModel`, the vision tower of `CLIPModel`, `SiglipVisionModel`, the
vision tower of `SiglipModel`. Torch is never imported: tensors go through safetensors.

Names (HF tensors sit under `vision_model.`; transformers 5 saves the standalone vision models
without that prefix, and both forms are read; export writes the prefixed form, which
transformers 4.x and 5.x both load):

  embeddings.patch_embedding.weight [D, C, p, p]     patch_embedding/kernel [p*p*C, D] (w.transpose(2,3,1,0))
  embeddings.patch_embedding.bias                    patch_embedding/bias (SigLIP)
  embeddings.class_embedding                         class_embedding (CLIP)
  embeddings.position_embedding.weight               position_embedding
  pre_layrnorm.{weight,bias}                         pre_layernorm/{scale,bias} (CLIP)
  encoder.layers.{i}.<module>.{weight,bias}          layers_{i}/<module>/{kernel (transposed),scale,bias}
  post_layernorm.{weight,bias}                       post_layernorm/{scale,bias}
  head.probe, head.layernorm, head.mlp.*             head/probe, head/layernorm, head/mlp/* (SigLIP)
  head.attention.in_proj_{weight,bias} [3D, D]       head/attention/{q,k,v}_proj (split in three, transposed)
  head.attention.out_proj.*                          head/attention/out_proj/*

The text tower, projections and logit scale/bias of a full `CLIPModel` / `SiglipModel` are
ignored; any other tensor is an error.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from mmjax import lora as lora_lib
from mmjax import sharding
from mmjax.convert import model_dir
from mmjax.convert import safetensors_io as stio
from mmjax.convert.common import (Tensor, check_file, find_architecture, read_json, write_hf_dir,
                                  read_params, unsupported)
from mmjax.files import atomic_write
from mmjax.models.vit import CLIP_LAYOUT, SIGLIP_LAYOUT, ViT, ViTConfig

# HF class -> (family, whether it is a full two-tower model whose config nests `vision_config`).
ARCHITECTURES = {"CLIPVisionModel": ("clip", False), "CLIPModel": ("clip", True),
                 "SiglipVisionModel": ("siglip", False), "SiglipModel": ("siglip", True)}
_MODEL_TYPES = {"clip_vision_model": "CLIPVisionModel", "clip": "CLIPModel",
                "siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipModel"}
EXPORT_ARCHITECTURES = ("CLIPVisionModel", "SiglipVisionModel")
PREFIX = "vision_model."

# HF hidden_act -> mmjax activation (gelu_new is the same tanh approximation as gelu_pytorch_tanh).
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "silu": "silu", "swish": "silu"}
_ACT_OUT = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}

# transformers' defaults for config.json keys that older files may omit.
_DEFAULTS = {
    "clip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                 num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
                   layer_norm_eps=1e-6, vision_use_head=True),
}
# mmjax fields every exportable config must have, per family (beyond CLIP_LAYOUT / SIGLIP_LAYOUT).
_FIXED = dict(mlp="standard", layer_scale=None, attn_bias=True, mlp_bias=True)


def architecture_of(hf: dict) -> str:
  """The HF class name of a config.json dict ('CLIPVisionModel', ...)."""
  return find_architecture(hf, ARCHITECTURES, _MODEL_TYPES)


def vit_config_from_hf(hf: dict) -> ViTConfig:
  """`ViTConfig` from a HF config.json dict of a CLIP / SigLIP model or vision model (the
  `vision_config` of a full model); anything mmjax cannot reproduce is a one-line ValueError."""
  arch = architecture_of(hf)
  family, full = ARCHITECTURES[arch]
  where = "vision_config." if full else ""
  v = hf.get("vision_config") if full else hf
  if full and not isinstance(v, dict):
    raise ValueError(f"config.json of {arch} has no vision_config")
  v = {**_DEFAULTS[family], **{k: x for k, x in v.items() if x is not None}}
  act = v["hidden_act"]
  if act not in _ACTS:
    unsupported(where + "hidden_act", act, ", ".join(_ACTS))
  d, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
  if d % heads:
    unsupported(where + "num_attention_heads", heads, f"a divisor of hidden_size={d}")
  if int(v["image_size"]) % int(v["patch_size"]):
    unsupported(where + "image_size", v["image_size"], f"a multiple of patch_size={v['patch_size']}")
  layout = dict(CLIP_LAYOUT if family == "clip" else SIGLIP_LAYOUT)
  if family == "siglip" and not v.get("vision_use_head", True):
    layout["pool"] = "none"
  layout.update(norm_eps=float(v["layer_norm_eps"]), act=_ACTS[act])
  return ViTConfig(**layout, **_FIXED, image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
                   num_channels=int(v["num_channels"]), d_model=d, n_layers=int(v["num_hidden_layers"]),
                   n_heads=heads, head_dim=d // heads, mlp_dim=int(v["intermediate_size"]))


def family_of(cfg: ViTConfig) -> str:
  """'clip' or 'siglip': the HF family whose layout `cfg` has; else a one-line ValueError."""
  for family, layout in (("clip", CLIP_LAYOUT), ("siglip", SIGLIP_LAYOUT)):
    want = {**layout, **_FIXED}
    want.pop("norm_eps")
    want.pop("act")
    if family == "siglip" and cfg.pool == "none":
      want["pool"] = "none"
    if all(getattr(cfg, k) == x for k, x in want.items()):
      return family
  raise ValueError("ViTConfig layout matches neither CLIP_LAYOUT nor SIGLIP_LAYOUT (with standard MLP, "
                   "biases and no layer scale); it has no Hugging Face counterpart")


def hf_vision_config(cfg: ViTConfig, architecture: str = "CLIPVisionModel", dtype: str = "float32") -> dict:
  """config.json dict of a `CLIPVisionModel` / `SiglipVisionModel` for `cfg`."""
  if architecture not in EXPORT_ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not supported; supported: {', '.join(EXPORT_ARCHITECTURES)}")
  family = family_of(cfg)
  want = ARCHITECTURES[architecture][0]
  if family != want:
    raise ValueError(f"architecture={architecture!r} needs a {want} layout, but cfg has the {family} layout")
  if cfg.n_heads * cfg.head_dim != cfg.d_model:
    raise ValueError(f"n_heads*head_dim={cfg.n_heads * cfg.head_dim} != d_model={cfg.d_model}; "
                     f"{architecture} needs them equal")
  if cfg.act not in _ACT_OUT:
    raise ValueError(f"act={cfg.act!r} has no Hugging Face hidden_act; supported: {', '.join(_ACT_OUT)}")
  out = dict(architectures=[architecture], model_type=f"{family}_vision_model", hidden_size=cfg.d_model,
             intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             num_channels=cfg.num_channels, image_size=cfg.image_size, patch_size=cfg.patch_size,
             hidden_act=_ACT_OUT[cfg.act], layer_norm_eps=cfg.norm_eps, attention_dropout=0.0, dtype=dtype,
             torch_dtype=dtype)
  if family == "siglip":
    out["vision_use_head"] = cfg.pool == "map"
  else:
    out.update(initializer_range=0.02, initializer_factor=1.0)
  return out


# ---------------------------------------------------------------------------------------
# Names

_TOP = {"class_embedding": "embeddings.class_embedding", "position_embedding": "embeddings.position_embedding.weight",
        "patch_embedding/bias": "embeddings.patch_embedding.bias", "head/probe": "head.probe"}
_QKV = re.compile(r"head/attention/([qkv])_proj/(kernel|bias)")


def hf_name(path: str) -> tuple[str, str]:
  """mmjax param path -> (HF tensor name without the `vision_model.` prefix, kind), kind one of
  'copy', 'T' (transposed), 'conv' (patch kernel), 'q' / 'k' / 'v' (third of in_proj, kernels transposed)."""
  if path in _TOP:
    return _TOP[path], "copy"
  if path == "patch_embedding/kernel":
    return "embeddings.patch_embedding.weight", "conv"
  m = _QKV.fullmatch(path)
  if m:
    return f"head.attention.in_proj_{'weight' if m.group(2) == 'kernel' else 'bias'}", m.group(1)
  module, leaf = path.rsplit("/", 1)
  module = re.sub(r"^layers_(\d+)", r"encoder.layers.\1", module).replace("pre_layernorm", "pre_layrnorm")
  module = module.replace("/", ".")
  if leaf in ("kernel", "scale", "bias"):
    return f"{module}.{'bias' if leaf == 'bias' else 'weight'}", "T" if leaf == "kernel" else "copy"
  raise ValueError(f"param {path!r} has no Hugging Face name")


def _hf_shape(shape, kind: str, cfg: ViTConfig) -> tuple:
  if kind == "T" or (kind in ("q", "k", "v") and len(shape) == 2):
    shape = tuple(shape[::-1])
  if kind == "conv":
    return (cfg.d_model, cfg.num_channels, cfg.patch_size, cfg.patch_size)
  if kind in ("q", "k", "v"):
    return (3 * shape[0],) + tuple(shape[1:])
  return tuple(shape)


def param_specs(cfg: ViTConfig) -> tuple[dict, dict]:
  """Flat {path: ShapeDtypeStruct} and {path: logical axis names} of `ViT(cfg)` params."""
  images = jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, cfg.num_channels), jnp.float32)
  boxed = jax.eval_shape(ViT(cfg).init, jax.random.key(0), images)["params"]
  names = traverse_util.flatten_dict(sharding.logical_axes_tree(boxed), sep="/",
                                     is_leaf=lambda _, x: x is None or isinstance(x, tuple))
  return traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/"), names


def tensor_plan(cfg: ViTConfig, prefix: str = PREFIX) -> list[Tensor]:
  """Every param of `ViT(cfg)` and its HF tensor (names under `prefix`)."""
  plan = []
  for p, s in sorted(param_specs(cfg)[0].items()):
    name, kind = hf_name(p)
    packed = kind in ("q", "k", "v")  # a third of the MAP head's in_proj
    plan.append(Tensor(p, prefix + name, "part" if packed else kind, tuple(s.shape), _hf_shape(s.shape, kind, cfg),
                       patch=cfg.patch_size, channels=cfg.num_channels, d=cfg.d_model,
                       part="qkv".index(kind) if packed else 0, parts=3 if packed else 1))
  return plan


# ---------------------------------------------------------------------------------------
# Import / export

def import_hf_vision(path: str, *, mesh=None, rules=sharding.DEFAULT_RULES, dtype: str = "float32"
                     ) -> tuple[ViTConfig, dict]:
  """Reads the vision tower of a HF CLIP / SigLIP directory (config.json + safetensors).

  Returns (cfg, params) for `ViT(cfg)`, `cfg.dtype` = `cfg.param_dtype` = `dtype`, each tensor
  placed in its sharding on `mesh` (or the first local device) as it is read. Missing,
  unexpected (inside the vision tower) and mis-shaped tensors raise one-line ValueErrors.
  """
  hf = read_json(path, "config.json")
  arch = architecture_of(hf)
  full = ARCHITECTURES[arch][1]
  cfg = dataclasses.replace(vit_config_from_hf(hf), dtype=dtype, param_dtype=dtype)
  with stio.open_dir(path) as reader:
    prefixed = full or any(n.startswith(PREFIX) for n in reader.tensors)
    plan = tensor_plan(cfg, PREFIX if prefixed else "")
    # A full model's text tower, projections and logit scale / bias are not read.
    check_file(path, reader, plan, f"{arch} with this config.json", owned=lambda n: not full or n.startswith(PREFIX),
               ignored=lambda n: n.endswith("position_ids"))  # a buffer older transformers saved
    params = read_params(reader, plan, param_specs(cfg)[1], mesh, rules, stio.np_dtype(dtype))
  return cfg, params


def export_hf_vision(path: str, cfg: ViTConfig, params: dict, lora: dict | None = None, merge: bool = True,
                     architecture: str = "CLIPVisionModel", dtype: str = "float32") -> None:
  """Writes config.json + model.safetensors of a `CLIPVisionModel` / `SiglipVisionModel` that
  `transformers.AutoModel.from_pretrained` loads with no missing or unexpected weights. An
  adapter is merged into the kernels (merge=False is not supported for vision towers).
  Tensors are gathered to the host one at a time; on many hosts every process calls this and
  process 0 writes."""
  config = hf_vision_config(cfg, architecture, dtype)
  if lora is not None:
    if not merge:
      raise ValueError("export_hf_vision: merge=False is not supported; vision adapters are exported merged")
    params = lora_lib.merge(params, lora, cfg.lora_alpha, cfg.lora_rslora)
  write_hf_dir(path, params, param_specs(cfg)[0], tensor_plan(cfg), dtype, config)


# ---------------------------------------------------------------------------------------
# mmjax vision model directories (what `tools/convert_hf.py import-vision` writes)
#
#   DIR/model_config.json  {"format": "mmjax.vit/v1", "model": ViTConfig fields,
#                           "hf_architecture": "CLIPModel" | ..., "hf_config": {...} | null}
#   DIR/params/            Orbax PyTree checkpoint of the ViT params
#   DIR/lora/              optional Orbax PyTree checkpoint of an adapter tree

FORMAT = "mmjax.vit/v1"
CONFIG_FILE = "model_config.json"


def save_dir(path: str, cfg: ViTConfig, params: dict, lora: dict | None = None, *,
             hf_architecture: str | None = None, hf_config: dict | None = None) -> None:
  path = os.path.abspath(path)
  model_dir.save_variables(path, params, lora)
  if jax.process_index() == 0:
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "hf_architecture": hf_architecture,
            "hf_config": hf_config}
    atomic_write(os.path.join(path, CONFIG_FILE), json.dumps(meta, indent=2))


def load_dir(path: str, *, mesh=None, rules=sharding.DEFAULT_RULES) -> tuple[ViTConfig, dict, dict | None, dict]:
  """(cfg, params, lora or None, meta) from a vision model directory, placed on `mesh`."""
  return model_dir.load_as(path, FORMAT, ViTConfig, param_specs, mesh, rules)
