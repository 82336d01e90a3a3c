"""Hugging Face <-> mmjax for whole vision-language models (`mmjax.models.vlm.VLM`).

Architectures: `LlavaForConditionalGeneration` (a CLIP or SigLIP tower, the two-layer
`multi_modal_projector`, a Llama / Mistral / Qwen2 language model) and
`VideoLlavaForConditionalGeneration` (an `image_tower` and a `video_tower` of the same
config sharing one projector; video frames keep every token of the tower). Torch is never
imported: tensors go through safetensors, each read into its sharding.

Names (the layout `save_pretrained` writes, which is what export writes; import also reads
the older form with `vision_model.` inside each tower and transformers 5's in-memory form
under `model.`):

  vision_tower.<CLIP/SigLIP name> | image_tower.<...>   vision/...        (mmjax.convert.vision names)
  video_tower.<...>                                     video_tower/...
  multi_modal_projector.linear_{1,2}.{weight,bias}      projector/linear_{1,2}/{kernel (transposed),bias}
  language_model.model.<...>, language_model.lm_head.*  llm/...           (mmjax.convert.llama names)

Config: `vision_feature_layer` (an index or a list) -> `feature_layer`; the select strategy
'default' / 'full' -> `feature` 'patches' / 'all'; `image_token_index` / `video_token_index`
-> the placeholder ids; `video_seq_length` / tokens per frame -> `max_frames`;
`projector_hidden_act`, `multimodal_projector_bias` -> the projector.

PEFT adapters of these models name modules as transformers builds them (`model.image_tower.
encoder.layers.0.self_attn.q_proj`, `model.language_model.layers.0.self_attn.q_proj`,
`model.multi_modal_projector.linear_1`, `lm_head`): `export_peft` writes that layout.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from mmjax import lora as lora_lib
from mmjax import sharding
from mmjax.convert import llama as convert_llama
from mmjax.convert import model_dir
from mmjax.convert import safetensors_io as stio
from mmjax.convert import vision as convert_vision
from mmjax.convert.common import (Tensor, check_file, find_architecture, read_json, write_hf_dir, write_peft_dir,
                                  read_params, unsupported)
from mmjax.models import vlm as vlm_lib
from mmjax.models.vlm import VLM, VLMConfig

ARCHITECTURES = {"LlavaForConditionalGeneration": "llava", "VideoLlavaForConditionalGeneration": "video_llava"}
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
# mmjax param subtree of each tower -> the HF prefix, per architecture.
TOWERS = {"llava": {"vision": "vision_tower"}, "video_llava": {"vision": "image_tower", "video_tower": "video_tower"}}
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
         "silu": "silu", "relu": "relu"}
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "quick_gelu": "quick_gelu", "silu": "silu",
            "relu": "relu"}
FORMAT = "mmjax.vlm/v1"


def architecture_of(hf: dict) -> str:
  """The HF class name of a config.json dict ('LlavaForConditionalGeneration', ...)."""
  return find_architecture(hf, ARCHITECTURES, _MODEL_TYPES)


def is_vlm(hf: dict) -> bool:
  """Whether a config.json dict is one of the VLM architectures above."""
  return any(a in ARCHITECTURES for a in hf.get("architectures") or []) or hf.get("model_type") in _MODEL_TYPES


# ---------------------------------------------------------------------------------------
# Configs


def vlm_config_from_hf(hf: dict) -> VLMConfig:
  """`VLMConfig` from a LLaVA / Video-LLaVA config.json dict; what mmjax cannot reproduce
  is a one-line ValueError naming the field."""
  arch = architecture_of(hf)
  kind = ARCHITECTURES[arch]
  vision_hf = dict(hf.get("vision_config") or {})
  vision_hf.setdefault("model_type", "clip_vision_model")
  vision_hf.pop("architectures", None)
  try:
    vision = convert_vision.vit_config_from_hf(vision_hf)
  except ValueError as e:
    raise ValueError(f"vision_config: {e}") from None
  text_hf = dict(hf.get("text_config") or {})
  text_hf.setdefault("model_type", "llama")
  text_hf.pop("architectures", None)
  if hf.get("tie_word_embeddings"):
    text_hf["tie_word_embeddings"] = True
  try:
    llm = convert_llama.config_from_hf(text_hf)
  except ValueError as e:
    raise ValueError(f"text_config: {e}") from None
  strategy = hf.get("vision_feature_select_strategy", "default")
  if strategy not in ("default", "full"):
    unsupported("vision_feature_select_strategy", strategy, "default, full")
  if strategy == "default" and not vision.class_token:  # transformers would drop a patch token
    unsupported("vision_feature_select_strategy", strategy, "'full' for a tower without a class token")
  layer = hf.get("vision_feature_layer", -2)
  act = hf.get("projector_hidden_act", "gelu")
  if act not in _ACTS:
    unsupported("projector_hidden_act", act, ", ".join(_ACTS))
  common = dict(vision=vision, llm=llm, projector="mlp2", projector_hidden=None,
                image_token_id=int(hf.get("image_token_index", 32000)),
                feature="patches" if strategy == "default" else "all",
                feature_layer=tuple(layer) if isinstance(layer, list) else int(layer),
                temporal_embedding=False, projector_act=_ACTS[act],
                projector_bias=bool(hf.get("multimodal_projector_bias", True)))
  if kind == "llava":
    return VLMConfig(**common, max_frames=0)
  per_frame = vision.num_patches() + int(vision.class_token)
  seq = int(hf.get("video_seq_length", 8 * per_frame))
  if seq % per_frame:
    unsupported("video_seq_length", seq, f"a multiple of the {per_frame} tokens of a frame")
  return VLMConfig(**common, max_frames=seq // per_frame, video_tower=True, video_feature="all",
                   video_token_id=int(hf.get("video_token_index", 32001)))


def architecture_for(cfg: VLMConfig) -> str:
  """The HF class a `VLMConfig` exports to; a one-line ValueError when it has none."""
  problems = []
  if cfg.projector != "mlp2" or cfg.projector_hidden not in (None, cfg.llm.d_model):
    problems.append("projector='mlp2' with projector_hidden = the language model's width")
  if cfg.temporal_embedding and cfg.max_frames:
    problems.append("no temporal embedding (vlm.temporal_embedding=False)")
  if cfg.temporal_pool != 1:
    problems.append("temporal_pool=1")
  if cfg.feature == "pooled" or cfg.video_feature == "pooled":
    problems.append("feature 'patches' or 'all'")
  if cfg.video_tower and (cfg.video_feature != "all" or cfg.video_token_id is None):
    problems.append("a video tower with video_feature='all' and a video_token_id")
  if not cfg.video_tower and cfg.video_token_id is not None:
    problems.append("a separate video tower for a separate video token")
  if problems:
    raise ValueError("this VLM has no Hugging Face counterpart (LLaVA / Video-LLaVA need " + "; ".join(problems) + ")")
  return "VideoLlavaForConditionalGeneration" if cfg.video_tower else "LlavaForConditionalGeneration"


def hf_vlm_config(cfg: VLMConfig, text_architecture: str = "LlamaForCausalLM", dtype: str = "float32",
                  text_extra: dict | None = None) -> dict:
  """config.json dict of the LLaVA / Video-LLaVA model `cfg` exports to."""
  arch = architecture_for(cfg)
  vision_arch = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[convert_vision.family_of(cfg.vision)]
  vision = convert_vision.hf_vision_config(cfg.vision, vision_arch, dtype)
  text = convert_llama.hf_config(cfg.llm, text_architecture, dtype, **(text_extra or {}))
  for d in (vision, text):
    for k in ("architectures", "torch_dtype", "dtype"):
      d.pop(k, None)
  layer = cfg.feature_layer if cfg.feature_layer is not None else -1
  out = dict(architectures=[arch], model_type=ARCHITECTURES[arch], vision_config=vision, text_config=text,
             image_token_index=cfg.image_token_id, image_seq_length=vlm_lib.num_visual_tokens(cfg, "image"),
             projector_hidden_act=_ACT_OUT[cfg.projector_act],
             vision_feature_select_strategy="default" if cfg.feature == "patches" else "full",
             vision_feature_layer=list(layer) if isinstance(layer, tuple) else int(layer),
             multimodal_projector_bias=cfg.projector_bias, tie_word_embeddings=cfg.llm.tie_embeddings,
             torch_dtype=dtype)
  if cfg.video_tower:
    out.update(video_token_index=cfg.video_token_id,
               video_seq_length=vlm_lib.num_visual_tokens(cfg, "video", n_frames=cfg.max_frames))
  if cfg.feature_layer is None:  # the tower's output: its last hidden state (SigLIP post-norms it)
    if cfg.vision.post_norm == "tokens":
      raise ValueError("feature_layer=None on a tower that post-norms its tokens has no HF counterpart; "
                       "set vlm.feature_layer")
  return out


# ---------------------------------------------------------------------------------------
# Names


def param_specs(cfg: VLMConfig) -> tuple[dict, dict]:
  """Flat {path: ShapeDtypeStruct} and {path: logical axis names} of `VLM(cfg)` params."""
  boxed = jax.eval_shape(VLM(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  names = traverse_util.flatten_dict(sharding.logical_axes_tree(boxed), sep="/",
                                     is_leaf=lambda _, x: x is None or isinstance(x, tuple))
  return traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/"), names


def tensor_plan(cfg: VLMConfig) -> list[Tensor]:
  """Every param of `VLM(cfg)` and its HF tensor in the `save_pretrained` layout."""
  kind = ARCHITECTURES[architecture_for(cfg)]
  plan = []
  for sub, prefix in TOWERS[kind].items():
    plan += [t.moved(sub).renamed(f"{prefix}.{t.name}") for t in convert_vision.tensor_plan(cfg.vision, prefix="")]
  plan += [t.moved("llm").renamed(f"language_model.{t.name}") for t in convert_llama.tensor_plan(cfg.llm)]
  for p, x in sorted(param_specs(cfg)[0].items()):
    if p.startswith("projector/"):
      module, leaf = p[len("projector/"):].rsplit("/", 1)
      shape = tuple(x.shape)
      t = leaf == "kernel"
      plan.append(Tensor(p, f"multi_modal_projector.{module}.{'weight' if t else 'bias'}", "T" if t else "copy",
                         shape, shape[::-1] if t else shape))
  return plan


def _aliases(name: str) -> list[str]:
  """The names a tensor of the save layout may have in a file: that one, the older one with
  `vision_model.` inside a tower, and transformers 5's in-memory one."""
  out = [name]
  for tower in ("vision_tower", "image_tower", "video_tower"):
    if name.startswith(tower + "."):
      out.append(f"{tower}.vision_model.{name[len(tower) + 1:]}")
  if name.startswith("language_model.model."):
    out.append("model.language_model." + name[len("language_model.model."):])
  elif name == "language_model.lm_head.weight":
    out.append("lm_head.weight")
  else:
    out += ["model." + n for n in out]
  return out


def _resolve(plan, reader) -> list[Tensor]:
  """The plan with each tensor's name as the file has it (the save layout when absent)."""
  return [t.renamed(next((a for a in _aliases(t.name) if a in reader.tensors), t.name)) for t in plan]


def hf_module(path: str, kind: str) -> str:
  """mmjax module path of a dense layer -> the module name transformers builds (for PEFT)."""
  part, _, rest = path.partition("/")
  if part in TOWERS[kind]:
    name, _ = convert_vision.hf_name(rest + "/kernel")
    return f"model.{TOWERS[kind][part]}.{name.rsplit('.', 1)[0]}"
  if part == "projector":
    return f"model.multi_modal_projector.{rest}"
  if part == "llm":
    name = convert_llama.hf_module(rest)
    return name if name == "lm_head" else "model.language_model." + name.removeprefix("model.")
  raise ValueError(f"module {path!r} has no Hugging Face name")


# ---------------------------------------------------------------------------------------
# Import / export


def import_hf_vlm(path: str, *, mesh=None, rules=sharding.DEFAULT_RULES, dtype: str = "float32",
                  cfg: VLMConfig | None = None) -> tuple[VLMConfig, dict]:
  """Reads a LLaVA / Video-LLaVA directory (config.json + safetensors).

  Returns (cfg, params) for `VLM(cfg)`, each tensor placed in its sharding on `mesh` (or the
  first local device) as it is read: by default every part in `dtype`; with `cfg` (the
  directory's config with a run's numerics, `vlm_config_from_hf` + dtypes) the towers in
  `cfg.vision.param_dtype` and the rest in `cfg.llm.param_dtype`. Missing, unexpected and
  mis-shaped tensors raise one-line ValueErrors."""
  hf = read_json(path, "config.json")
  if cfg is None:
    cfg = vlm_config_from_hf(hf)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, dtype=dtype, param_dtype=dtype),
                              llm=dataclasses.replace(cfg.llm, dtype=dtype, param_dtype=dtype))
  with stio.open_dir(path) as reader:
    plan = _resolve(tensor_plan(cfg), reader)
    tied = cfg.llm.tie_embeddings
    check_file(path, reader, plan, f"{architecture_of(hf)} with this config.json",
               ignored=lambda n: n.endswith(("position_ids", "rotary_emb.inv_freq")) or (
                   tied and n in ("language_model.lm_head.weight", "lm_head.weight")))
    names = param_specs(cfg)[1]
    towers = tuple(TOWERS[ARCHITECTURES[architecture_for(cfg)]])
    params = {}
    for part_plan, dt in (([t for t in plan if t.path.split("/")[0] in towers], cfg.vision.param_dtype),
                          ([t for t in plan if t.path.split("/")[0] not in towers], cfg.llm.param_dtype)):
      params.update(read_params(reader, part_plan, names, mesh, rules, stio.np_dtype(dt)))
  return cfg, params


def export_hf_vlm(path: str, cfg: VLMConfig, params: dict, lora: dict | None = None, *,
                  text_architecture: str = "LlamaForCausalLM", dtype: str = "float32",
                  max_shard_bytes: int | None = None, text_extra: dict | None = None) -> None:
  """Writes config.json + safetensors of the LLaVA / Video-LLaVA model `cfg` maps to (an
  adapter is merged in first), which transformers loads with no missing or unexpected
  weights. Tensors are gathered to the host one at a time; on many hosts every process calls
  this and process 0 writes. `text_extra` goes into text_config (e.g. bos / eos token ids)."""
  config = hf_vlm_config(cfg, text_architecture, dtype, text_extra)
  if lora is not None:
    params = merge(cfg, params, lora)
  write_hf_dir(path, params, param_specs(cfg)[0], tensor_plan(cfg), dtype, config, max_shard_bytes)


def merge(cfg: VLMConfig, params: dict, lora: dict) -> dict:
  """`params` with an adapter folded in (each part with its own LoRA scale settings)."""
  out = dict(params)
  for part, sub in (("vision", cfg.vision), ("video_tower", cfg.vision), ("projector", cfg.llm), ("llm", cfg.llm)):
    if part in lora:
      out[part] = lora_lib.merge(params[part], lora[part], sub.lora_alpha, sub.lora_rslora)
  return out


def export_peft(path: str, cfg: VLMConfig, lora: dict, base_model_name_or_path: str | None = None,
                dtype: str = "float32") -> None:
  """Writes adapter_config.json + adapter_model.safetensors that
  `peft.PeftModel.from_pretrained(hf_model, path)` loads onto the LLaVA / Video-LLaVA model
  (module names as transformers builds them; scale from the language model's LoRA settings,
  per-module ranks that differ go to `rank_pattern`)."""
  kind = ARCHITECTURES[architecture_for(cfg)]
  modules = sorted({p.rsplit("/", 1)[0] for p in traverse_util.flatten_dict(lora, sep="/")})
  write_peft_dir(path, lora, {m: hf_module(m, kind) for m in modules}, dtype, dict(
      task_type=None, base_model_name_or_path=base_model_name_or_path, lora_alpha=cfg.llm.lora_alpha,
      use_rslora=cfg.llm.lora_rslora, lora_dropout=cfg.llm.lora_dropout))


# ---------------------------------------------------------------------------------------
# mmjax VLM model directories: model_config.json {"format": "mmjax.vlm/v1", "model": VLMConfig
# fields, "hf_architecture", "hf_config"}, Orbax `params/` and optional `lora/` (as the LLaMA
# directories of `mmjax.convert.model_dir`).


def save_dir(path: str, cfg: VLMConfig, params: dict, lora: dict | None = None, *,
             hf_architecture: str | None = None, hf_config: dict | None = None, hf_dir: str | None = None) -> None:
  model_dir.save(path, cfg, params, lora, hf_architecture=hf_architecture, hf_config=hf_config, hf_dir=hf_dir,
                 fmt=FORMAT)


def load_dir(path: str, *, mesh=None, rules=sharding.DEFAULT_RULES) -> tuple[VLMConfig, dict, dict | None, dict]:
  """(cfg, params, lora or None, meta) from a VLM model directory, placed on `mesh`."""
  return model_dir.load_as(path, FORMAT, VLMConfig, param_specs, mesh, rules)

