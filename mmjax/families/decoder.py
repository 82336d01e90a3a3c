"""The LLaMA-style decoder part: `config.model` and `config.init_from_hf`, and the decoder's
`LlamaConfig` built from them (used by the 'llama' and 'vlm' families; the 'visft' family
takes only the numerics, `model.dtype` / `param_dtype`, from this section)."""
from __future__ import annotations

import dataclasses

import ml_collections

from mmjax.config.core import ConfigError, check_choice
from mmjax.convert import llama as convert_llama
from mmjax.convert.common import read_json
from mmjax.models import llama


def model_config_dict(**overrides) -> ml_collections.ConfigDict:
  """`config.model`: the fields of `LlamaConfig`, plus `name` and a flat llama3 rope scaling."""
  fields = {f.name: f.default for f in dataclasses.fields(llama.LlamaConfig)}
  for name in ("rope_scaling", "lora_alpha", "lora_rslora", "lora_dropout",  # lora_* come from config.lora,
               "packed_rows"):  # packed_rows from the data configs (with_run_rows)
    fields.pop(name)
  fields.update(
      name="llama",  # model family: a name in mmjax/families/registry.py ('llama', 'vlm', 'visft')
      vocab_size=-1,  # -1: take the tokenizer's vocabulary size
      rope_scaling=ml_collections.ConfigDict(dict(
          type="none",  # 'none' or 'llama3'
          factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
          original_max_position_embeddings=8192)),
  )
  cfg = ml_collections.ConfigDict(fields)
  cfg.update(overrides)
  return cfg


def config_dict() -> dict:
  return {
      "model": model_config_dict(),
      # A local HF LLaMA/Mistral/Qwen2 directory: its config.json replaces the model sizes in
      # config.model (dtype/remat/attention stay) and its weights the init.
      "init_from_hf": "",
  }


def validate(config, env) -> None:
  m = config.model
  check_choice("model.dtype", m.dtype, tuple(llama.DTYPES))
  check_choice("model.param_dtype", m.param_dtype, tuple(llama.DTYPES))
  check_choice("model.remat", m.remat, tuple(llama.REMAT_POLICIES))
  check_choice("model.attention", m.attention, ("auto", "xla", "cudnn"))
  check_choice("model.rope_scaling.type", m.rope_scaling.type, ("none", "llama3"))
  if m.logits_chunk < 0:
    raise ConfigError(f"config.model.logits_chunk={m.logits_chunk} must be >= 0 (0 = logits of the whole sequence)")
  if m.head_dim % 2:
    raise ConfigError(f"config.model.head_dim={m.head_dim} must be even (rotary embeddings rotate pairs)")


def validate_shapes(config) -> None:
  """Checks of the decoder's sizes (families that build one)."""
  m = config.model
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(f"config.model.n_heads={m.n_heads} must be a multiple of config.model.n_kv_heads={m.n_kv_heads}")


def lora_fields(config) -> dict:
  """The LoRA scale settings every model config takes from `config.lora`."""
  return dict(lora_alpha=config.lora.alpha, lora_rslora=config.lora.rslora, lora_dropout=config.lora.dropout)


def with_run_numerics(cfg, section, config):
  """A model config read from a checkpoint, with the run's numerics and memory settings
  (`section`'s dtype, param_dtype, remat, attention) and the LoRA scale."""
  return dataclasses.replace(cfg, dtype=section.dtype, param_dtype=section.param_dtype, remat=section.remat,
                             attention=section.attention, **lora_fields(config))


def llama_config(model_cfg, vocab_size: int | None = None, lora_cfg=None) -> llama.LlamaConfig:
  """The model's own config from `config.model` (and the LoRA scale settings)."""
  d = model_cfg.to_dict()
  rs = d.pop("rope_scaling")
  d["rope_scaling"] = None if rs["type"] == "none" else {k: v for k, v in rs.items() if k != "type"}
  if d["vocab_size"] == -1:
    d["vocab_size"] = vocab_size
  if lora_cfg is not None:
    d.update(lora_alpha=lora_cfg.alpha, lora_rslora=lora_cfg.rslora, lora_dropout=lora_cfg.dropout)
  return llama.LlamaConfig.from_dict(d)


def hf_llama_config(config) -> llama.LlamaConfig:
  """The decoder config of `config.init_from_hf`'s config.json; the run config keeps the
  numerics and memory settings (dtype, param_dtype, remat, attention) and the LoRA scale."""
  try:
    cfg = convert_llama.config_from_hf(read_json(config.init_from_hf, "config.json"))
  except ValueError as e:
    raise ConfigError(f"config.init_from_hf={config.init_from_hf!r}: {e}") from None
  return with_run_numerics(cfg, config.model, config)


def decoder_config(config, tokenizer) -> llama.LlamaConfig:
  """The decoder of a run: from `init_from_hf`'s config.json, else from `config.model` (the
  vocabulary size from the tokenizer when `model.vocab_size` is -1)."""
  if config.init_from_hf:
    return with_run_rows(hf_llama_config(config), config)
  return with_run_rows(llama_config(config.model, tokenizer.vocab_size, config.lora), config)


def with_run_rows(cfg: llama.LlamaConfig, config) -> llama.LlamaConfig:
  """The decoder config with the run's loss chunking and row layout: `packed_rows` unless no
  data config of the run (its own, a stage's or a group's) packs examples, so that only
  right-padded one-example rows take the fused attention's sequence-length path."""
  packed = any(k.endswith("packing") and bool(v) for k, v in _leaves(config.to_dict()))
  return dataclasses.replace(cfg, logits_chunk=config.model.logits_chunk, packed_rows=packed)


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def import_decoder(config, mesh, rules) -> dict:
  """The decoder's params from `config.init_from_hf`, placed in their shardings."""
  _, params = convert_llama.import_hf(config.init_from_hf, mesh=mesh, rules=rules, dtype=config.model.param_dtype)
  return params
