"""Hugging Face <-> mmjax for LLaMA-family decoders and their PEFT LoRA adapters.

Architectures: `LlamaForCausalLM` (Llama 2 / 3.x: GQA, llama3 RoPE scaling, tied or untied
embeddings), `MistralForCausalLM` (without an active sliding window) and
`Qwen2ForCausalLM` (q/k/v bias). Torch is never imported: tensors go through safetensors.

Names (an HF weight is [out, in], an mmjax kernel [in, out]: kernels are transposed; both
use the half-split RoPE layout, so q/k weights need no permutation):

  model.embed_tokens.weight                              embed/embedding
  model.layers.{i}.input_layernorm.weight                layers_{i}/input_norm/scale
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight|bias  layers_{i}/attn/{q,k,v,o}_proj/kernel|bias
  model.layers.{i}.post_attention_layernorm.weight       layers_{i}/post_attn_norm/scale
  model.layers.{i}.mlp.{gate,up,down}_proj.weight        layers_{i}/mlp/{gate,up,down}_proj/kernel
  model.norm.weight                                      final_norm/scale
  lm_head.weight                                         lm_head/kernel (absent when tied)

PEFT adapters: `base_model.model.<hf module>.lora_A.weight` [R, in] = a.T and
`...lora_B.weight` [out, R] = b.T, with `r`, `lora_alpha`, `use_rslora` in adapter_config.json.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mmjax import lora as lora_lib
from mmjax import sharding
from mmjax.convert import safetensors_io as stio
from mmjax.convert.common import (Tensor, check_file, find_architecture, read_json, write_hf_dir, write_peft_dir,
                                  read_params, read_tensor, unsupported)
from mmjax.models.llama import Llama, LlamaConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
_SUPPORTED = ", ".join(ARCHITECTURES)
_PEFT_PREFIX = "base_model.model."


def architecture_of(hf: dict) -> str:
  """The HF class name of a config.json dict ('LlamaForCausalLM', ...)."""
  return find_architecture(hf, ARCHITECTURES, {v: k for k, v in ARCHITECTURES.items()})


def _rope(hf: dict) -> tuple[float, dict | None]:
  """(theta, llama3 scaling or None) from `rope_parameters` (transformers 5) or the
  older `rope_theta` + `rope_scaling`."""
  field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  rp = dict(hf.get(field) or {})
  if rp and all(isinstance(v, dict) for v in rp.values()):
    unsupported(field, "per-layer-type RoPE", "one RoPE for all layers")
  theta = float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))
  key = "rope_type" if "rope_type" in rp else "type"
  kind = rp.get(key, "default")
  prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if prf not in (None, 1, 1.0):
    unsupported("partial_rotary_factor", prf, "1.0")
  if kind in (None, "default"):
    return theta, None
  if kind != "llama3":
    unsupported(f"{field}.{key}", kind, "default (none), llama3")
  scaling = {
      "factor": float(rp["factor"]), "low_freq_factor": float(rp["low_freq_factor"]),
      "high_freq_factor": float(rp["high_freq_factor"]),
      "original_max_position_embeddings": int(rp.get("original_max_position_embeddings")
                                              or hf["max_position_embeddings"])}
  return theta, scaling


def config_from_hf(hf: dict) -> LlamaConfig:
  """`LlamaConfig` from a Hugging Face config.json dict; anything mmjax cannot reproduce
  exactly raises a one-line ValueError naming the field, its value and what is supported."""
  arch = architecture_of(hf)
  family = ARCHITECTURES[arch]
  act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
  if act != "silu":
    unsupported("hidden_act", act, "silu")
  if hf.get("mlp_bias"):
    unsupported("mlp_bias", hf["mlp_bias"], "false")
  if family != "qwen2" and hf.get("attention_bias"):
    unsupported("attention_bias", hf["attention_bias"],
                 f"false for {arch} (it also biases o_proj, which mmjax lacks); q/k/v-only bias is Qwen2ForCausalLM")
  layer_types = hf.get("layer_types") or []
  if any(t != "full_attention" for t in layer_types):
    unsupported("layer_types", sorted(set(layer_types)), "'full_attention' only (no sliding window)")
  if family == "qwen2" and hf.get("use_sliding_window"):
    unsupported("use_sliding_window", hf["use_sliding_window"], "false (full attention)")
  if family == "mistral" and hf.get("sliding_window") is not None:
    max_pos = hf.get("max_position_embeddings")
    if max_pos is None or hf["sliding_window"] < max_pos:
      unsupported("sliding_window", hf["sliding_window"],
                   f"null or >= max_position_embeddings ({max_pos}), i.e. full attention")
  try:
    n_heads = int(hf["num_attention_heads"])
    theta, scaling = _rope(hf)
    return LlamaConfig(
        vocab_size=int(hf["vocab_size"]), d_model=int(hf["hidden_size"]), n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads), mlp_dim=int(hf["intermediate_size"]),
        rope_theta=theta, rope_scaling=scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=family == "qwen2")
  except KeyError as e:
    raise ValueError(f"config.json lacks {e.args[0]!r}, which {arch} needs") from None


def hf_config(cfg: LlamaConfig, architecture: str = "LlamaForCausalLM", dtype: str = "float32",
              **extra) -> dict:
  """A config.json dict for `cfg` (RoPE in the `rope_theta` + `rope_scaling` form that
  transformers 4.x and 5.x both read). `extra` keys (e.g. max_position_embeddings,
  bos_token_id, eos_token_id) are added or override."""
  if architecture not in ARCHITECTURES:
    raise ValueError(f"architecture={architecture!r} is not supported; supported: {_SUPPORTED}")
  family = ARCHITECTURES[architecture]
  if family == "qwen2" and not cfg.qkv_bias:
    raise ValueError(f"architecture={architecture!r} needs qkv_bias=True (Qwen2 always has q/k/v bias); "
                     f"use LlamaForCausalLM or MistralForCausalLM")
  if family != "qwen2" and cfg.qkv_bias:
    raise ValueError(f"architecture={architecture!r} cannot hold qkv_bias=True (its attention_bias also biases "
                     f"o_proj); use Qwen2ForCausalLM")
  out = dict(
      architectures=[architecture], model_type=family, vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
      intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
      num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu", rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta,
      rope_scaling=None if not cfg.rope_scaling else {"rope_type": "llama3", **cfg.rope_scaling},
      tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=4096, attention_dropout=0.0,
      initializer_range=0.02, use_cache=True, torch_dtype=dtype)
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  elif family == "mistral":
    out.update(sliding_window=None)
  else:
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
  out.update(extra)
  return out


# ---------------------------------------------------------------------------------------
# Names and shardings

_LAYER_RE = re.compile(r"layers_(\d+)/(.+)")
_IN_LAYER = {"input_norm/scale": "input_layernorm.weight", "post_attn_norm/scale": "post_attention_layernorm.weight"}
_TOP = {"embed/embedding": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight"}


def hf_module(module: str) -> str:
  """mmjax module path of a dense layer -> HF module name ('layers_0/attn/q_proj' ->
  'model.layers.0.self_attn.q_proj'; 'lm_head' -> 'lm_head')."""
  if module == "lm_head":
    return module
  m = _LAYER_RE.fullmatch(module)
  if not m:
    raise ValueError(f"module {module!r} has no Hugging Face name")
  rest = m.group(2).replace("attn/", "self_attn.").replace("mlp/", "mlp.")
  return f"model.layers.{m.group(1)}.{rest}"


def hf_name(path: str) -> tuple[str, bool]:
  """mmjax param path -> (HF tensor name, whether the HF tensor is the transpose)."""
  if path in _TOP:
    return _TOP[path], False
  module, leaf = path.rsplit("/", 1)
  m = _LAYER_RE.fullmatch(path)
  if m and m.group(2) in _IN_LAYER:
    return f"model.layers.{m.group(1)}.{_IN_LAYER[m.group(2)]}", False
  if leaf == "kernel":
    return hf_module(module) + ".weight", True
  if leaf == "bias":
    return hf_module(module) + ".bias", False
  raise ValueError(f"param {path!r} has no Hugging Face name")


def param_specs(cfg: LlamaConfig) -> tuple[dict, dict]:
  """Flat {path: ShapeDtypeStruct} and {path: logical axis names} of `Llama(cfg)` params."""
  boxed = jax.eval_shape(Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
  names = traverse_util.flatten_dict(sharding.logical_axes_tree(boxed), sep="/",
                                     is_leaf=lambda _, x: x is None or isinstance(x, tuple))
  return traverse_util.flatten_dict(nn.meta.unbox(boxed), sep="/"), names


def tensor_plan(cfg: LlamaConfig, prefix: str = "") -> list[Tensor]:
  """Every param of `Llama(cfg)` and its HF tensor (names under `prefix`)."""
  plan = []
  for p, x in sorted(param_specs(cfg)[0].items()):
    name, transpose = hf_name(p)
    shape = tuple(x.shape)
    plan.append(Tensor(p, prefix + name, "T" if transpose else "copy", shape, shape[::-1] if transpose else shape))
  return plan


# ---------------------------------------------------------------------------------------
# Models

def import_hf(path: str, *, mesh=None, rules=sharding.DEFAULT_RULES, dtype: str = "float32"
              ) -> tuple[LlamaConfig, dict]:
  """Reads a HF model directory (config.json + model.safetensors or a sharded index).

  Returns (cfg, params): `cfg.dtype` and `cfg.param_dtype` are `dtype`; params is the
  nested dict for `Llama(cfg)`, each tensor placed in its sharding on `mesh` (logical
  names from `jax.eval_shape` of init, mapped by `rules`) as it is read, or on the first
  local device without a mesh. Missing, unexpected and mis-shaped tensors raise ValueError.
  """
  hf = read_json(path, "config.json")
  cfg = dataclasses.replace(config_from_hf(hf), dtype=dtype, param_dtype=dtype)
  plan = tensor_plan(cfg)
  with stio.open_dir(path) as reader:
    check_file(path, reader, plan, f"{architecture_of(hf)} with this config.json",
               ignored=lambda n: n.endswith("rotary_emb.inv_freq") or (  # some tied checkpoints keep a copy
                   cfg.tie_embeddings and n == "lm_head.weight"))
    params = read_params(reader, plan, param_specs(cfg)[1], mesh, rules, stio.np_dtype(dtype))
  return cfg, params


def export_hf(path: str, cfg: LlamaConfig, params: dict, lora: dict | None = None, merge: bool = True,
              architecture: str = "LlamaForCausalLM", dtype: str = "float32",
              max_shard_bytes: int | None = None, config_overrides: dict | None = None) -> None:
  """Writes config.json + model.safetensors (sharded with an index past `max_shard_bytes`)
  that `transformers.AutoModelForCausalLM.from_pretrained` loads without warnings.

  With `lora` and merge=True the adapter is folded into the kernels first; with
  merge=False the base model goes to `path` and the adapter to `path/adapter` (PEFT format,
  see `export_peft`). Tensors are gathered to the host one at a time; on many hosts every
  process must call this and process 0 writes. `config_overrides` go into config.json
  (e.g. max_position_embeddings, bos_token_id, eos_token_id).
  """
  config = hf_config(cfg, architecture, dtype, **(config_overrides or {}))
  if lora is not None and merge:
    params = lora_lib.merge(params, lora, cfg.lora_alpha, cfg.lora_rslora)
  write_hf_dir(path, params, param_specs(cfg)[0], tensor_plan(cfg), dtype, config, max_shard_bytes)
  if lora is not None and not merge:
    export_peft(os.path.join(path, "adapter"), cfg, lora, base_model_name_or_path=os.path.abspath(path),
                dtype=dtype)


# ---------------------------------------------------------------------------------------
# PEFT LoRA adapters

_PEFT_RE = re.compile(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight")


def import_peft(path: str, cfg: LlamaConfig, params: dict, *, mesh=None, rules=sharding.DEFAULT_RULES,
                dtype: str = "float32") -> tuple[LlamaConfig, dict]:
  """Reads a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors).

  Returns (cfg, lora): `cfg` with lora_alpha, lora_rslora and lora_dropout from
  adapter_config.json (the rank is the adapter's shape); `lora` the mmjax adapter tree
  (`.../a` [in, R] = lora_A.T, `.../b` [R, out] = lora_B.T) placed like the kernels it adapts.
  """
  ac = read_json(path, "adapter_config.json")
  checks = (("peft_type", ac.get("peft_type", "LORA"), ("LORA",)), ("use_dora", bool(ac.get("use_dora")), (False,)),
            ("bias", ac.get("bias", "none"), ("none",)), ("fan_in_fan_out", bool(ac.get("fan_in_fan_out")), (False,)),
            ("modules_to_save", ac.get("modules_to_save") or None, (None,)),
            ("alpha_pattern", ac.get("alpha_pattern") or None, (None,)),
            ("lora_bias", bool(ac.get("lora_bias")), (False,)),
            ("target_parameters", ac.get("target_parameters") or None, (None,)))
  # Variants whose forward pass differs from plain LoRA.
  checks += tuple((k, ac.get(k) or None, (None,)) for k in (
      "use_qalora", "layer_replication", "trainable_token_indices", "alora_invocation_tokens", "use_bdlora",
      "kasa_config", "monteclora_config", "velora_config"))
  for field, value, ok in checks:
    if value not in ok:
      raise ValueError(f"adapter_config.json {field}={value!r} is not supported; supported: "
                       f"{', '.join(repr(v) for v in ok)}")
  cfg = dataclasses.replace(cfg, lora_alpha=float(ac["lora_alpha"]), lora_rslora=bool(ac.get("use_rslora")),
                            lora_dropout=float(ac.get("lora_dropout") or 0.0))
  np_dt = stio.np_dtype(dtype)
  kernels = {p[: -len("/kernel")]: x.shape for p, x in traverse_util.flatten_dict(params, sep="/").items()
             if p.endswith("/kernel")}
  by_hf = {hf_module(m): m for m in kernels}
  _, names = param_specs(cfg)
  kernel_names = {p: n for p, n in names.items() if p.endswith("/kernel")}
  flat_params = traverse_util.flatten_dict(params, sep="/")
  base_tensors = {hf_name(p)[0]: p for p in flat_params}
  flat = {}
  with stio.open_dir(path, stem="adapter_model") as reader:
    found = {}
    for name, info in sorted(reader.tensors.items()):
      m = _PEFT_RE.fullmatch(name)
      base = name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
      if not m and base in base_tensors:
        # PEFT saves a copy of lm_head / embed_tokens when they are targeted; accept it only
        # when it is the base model's own weight.
        p = base_tensors[base]
        x = reader.read(name)
        want = sharding.to_host(flat_params[p])
        want = want.T if hf_name(p)[1] else want
        if x.shape != want.shape or not np.array_equal(x.astype(np.float32), want.astype(np.float32)):
          raise ValueError(f"{path}: tensor {name!r} differs from the base model's {base!r}; adapters that "
                           f"change base weights (modules_to_save, resized embeddings) are not supported")
        continue
      if not m:
        raise ValueError(f"{path}: unexpected tensor {name!r} with shape {info.shape}; only lora_A / lora_B "
                         f"weights of dense layers are supported")
      module = by_hf.get(m.group(1))
      if module is None:
        raise ValueError(f"{path}: tensor {name!r} adapts {m.group(1)!r}, which this model lacks")
      found.setdefault(module, {})[m.group(2)] = (name, info)
    for module, ab in sorted(found.items()):
      for half in "AB":
        if half not in ab:
          raise ValueError(f"{path}: {hf_module(module)!r} has no lora_{half} weight")
      d_in, d_out = kernels[module]
      (a_name, a_info), (b_name, b_info) = ab["A"], ab["B"]
      rank = a_info.shape[0]
      for name, info, want in ((a_name, a_info, (rank, d_in)), (b_name, b_info, (d_out, rank))):
        if info.shape != want:
          raise ValueError(f"{path}: tensor {name!r} has shape {info.shape} in the adapter, but the model "
                           f"implies {want}")
      if not ac.get("rank_pattern") and ac.get("r") is not None and rank != ac["r"]:
        raise ValueError(f"{path}: tensor {a_name!r} has rank {rank}, but adapter_config.json r={ac['r']}")
      axes = lora_lib.logical_axes(kernel_names, {module: {"a": None, "b": None}})
      axes = traverse_util.flatten_dict(axes, sep="/")
      for leaf, name in (("a", a_name), ("b", b_name)):
        shape = (d_in, rank) if leaf == "a" else (rank, d_out)
        sh = sharding.placement(axes[f"{module}/{leaf}"], shape, mesh, rules)
        flat[f"{module}/{leaf}"] = read_tensor(reader, Tensor(f"{module}/{leaf}", name, "T", shape, shape[::-1]), sh,
                                               np_dt)
    if not flat:
      raise ValueError(f"{path}: adapter_model.safetensors holds no LoRA weights")
    jax.block_until_ready(flat)
  return cfg, traverse_util.unflatten_dict(flat, sep="/")


def _target_modules(cfg: LlamaConfig, modules: list[str]) -> list[str]:
  """PEFT `target_modules`: a leaf name ('q_proj') when every layer has it adapted, else
  the full HF module names, so PEFT injects exactly the adapted modules."""
  out = []
  by_leaf = {}
  for m in modules:
    by_leaf.setdefault(m.rsplit("/", 1)[-1], []).append(m)
  for leaf, ms in sorted(by_leaf.items()):
    if leaf != "lm_head" and len(ms) == cfg.n_layers:
      out.append(leaf)
    else:
      out.extend(hf_module(m) for m in sorted(ms))
  return out


def export_peft(path: str, cfg: LlamaConfig, lora: dict, base_model_name_or_path: str | None = None,
                dtype: str = "float32") -> None:
  """Writes adapter_config.json + adapter_model.safetensors that
  `peft.PeftModel.from_pretrained(hf_model, path)` loads (scale from cfg.lora_alpha and
  cfg.lora_rslora; per-module ranks that differ go to `rank_pattern`)."""
  modules = sorted({p.rsplit("/", 1)[0] for p in traverse_util.flatten_dict(lora, sep="/")})
  write_peft_dir(path, lora, {m: hf_module(m) for m in modules}, dtype, dict(
      task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path, lora_alpha=cfg.lora_alpha,
      use_rslora=cfg.lora_rslora, lora_dropout=cfg.lora_dropout, target_modules=_target_modules(cfg, modules)))
