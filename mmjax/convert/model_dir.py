"""The mmjax model directory: what `tools/convert_hf.py import` writes and `export` reads.

  DIR/model_config.json   {"format": "mmjax.llama/v1", "model": LlamaConfig fields,
                           "hf_architecture": "LlamaForCausalLM" | ..., "hf_config": {...} | null}
  DIR/params/             Orbax PyTree checkpoint of the base params (nested dict, `Llama` paths)
  DIR/lora/               optional Orbax PyTree checkpoint of an adapter tree (`mmjax.lora` layout;
                          its scale settings are the lora_* fields of "model")
  DIR/hf_files/           optional tokenizer / generation files copied from the HF directory

Restore places every array in its sharding (from `jax.eval_shape` of init and the rules).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from mmjax import lora as lora_lib
from mmjax import sharding
from mmjax.convert import llama as convert_llama
from mmjax.files import atomic_write
from mmjax.models.llama import LlamaConfig

FORMAT = "mmjax.llama/v1"
CONFIG_FILE = "model_config.json"
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
            "generation_config.json", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
            "processor_config.json", "video_preprocessor_config.json")


def save(path: str, cfg, params: dict, lora: dict | None = None, *, hf_architecture: str | None = None,
         hf_config: dict | None = None, hf_dir: str | None = None, fmt: str = FORMAT) -> None:
  """Writes a model directory (`path` must not hold params/ or lora/ yet) of format `fmt`
  (LLaMA, or another model whose config is a dataclass, e.g. `mmjax.convert.vlm.FORMAT`)."""
  path = os.path.abspath(path)
  save_variables(path, params, lora)
  if jax.process_index() != 0:
    return
  meta = {"format": fmt, "model": dataclasses.asdict(cfg), "hf_architecture": hf_architecture,
          "hf_config": hf_config}
  atomic_write(os.path.join(path, CONFIG_FILE), json.dumps(meta, indent=2))
  if hf_dir:
    copied = [n for n in HF_FILES if os.path.exists(os.path.join(hf_dir, n))]
    if copied:
      os.makedirs(os.path.join(path, "hf_files"), exist_ok=True)
    for name in copied:
      shutil.copy(os.path.join(hf_dir, name), os.path.join(path, "hf_files", name))


def read_meta(path: str, fmt: str | None = FORMAT) -> dict:
  """PATH/model_config.json, which must declare format `fmt` (LLaMA, VLM or vision directory;
  None: any)."""
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.exists(file):
    raise ValueError(f"{path} is not an mmjax model directory: no {CONFIG_FILE}")
  with open(file) as f:
    meta = json.load(f)
  if fmt is not None and meta.get("format") != fmt:
    raise ValueError(f"{file}: format={meta.get('format')!r} is not supported; supported: {fmt}")
  return meta


def _target(shapes: dict, names: dict, mesh, rules) -> dict:
  def one(path):
    s = shapes[path]
    sh = sharding.placement(names[path], s.shape, mesh, rules)
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh)
  return traverse_util.unflatten_dict({p: one(p) for p in shapes}, sep="/")


def load(path: str, *, mesh=None, rules=sharding.DEFAULT_RULES) -> tuple[LlamaConfig, dict, dict | None, dict]:
  """(cfg, params, lora or None, meta) from a model directory, placed on `mesh`."""
  return load_as(path, FORMAT, LlamaConfig, convert_llama.param_specs, mesh, rules)


def load_as(path: str, fmt: str, config_cls, param_specs, mesh=None, rules=sharding.DEFAULT_RULES):
  """(cfg, params, lora or None, meta) of a model directory of format `fmt`: the model config
  `config_cls.from_dict(meta['model'])`, its params and adapter placed on `mesh` by the
  logical names of `param_specs(cfg)` (the family's (shapes, names))."""
  path = os.path.abspath(path)
  meta = read_meta(path, fmt)
  cfg = config_cls.from_dict(meta["model"])
  shapes, names = param_specs(cfg)
  params, lora = restore_variables(path, shapes, names, mesh, rules)
  return cfg, params, lora, meta


def save_variables(path: str, params: dict, lora: dict | None = None) -> None:
  """PATH/params (and PATH/lora) as Orbax PyTree checkpoints; every process calls this."""
  os.makedirs(path, exist_ok=True)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.join(path, "params"), params)
  if lora is not None:
    ckpt.save(os.path.join(path, "lora"), lora)
  ckpt.wait_until_finished()


def restore_variables(path: str, shapes: dict, names: dict, mesh, rules) -> tuple[dict, dict | None]:
  """(params, lora or None) of PATH/params and PATH/lora, each leaf restored into the
  sharding its logical names give on `mesh`. shapes / names: flat {path: ShapeDtypeStruct}
  and {path: logical axes} of the params; the adapter's shapes come from its own metadata."""
  ckpt = ocp.StandardCheckpointer()
  params = ckpt.restore(os.path.join(path, "params"), _target(shapes, names, mesh, rules))
  lora = None
  if os.path.isdir(os.path.join(path, "lora")):
    saved = ckpt.metadata(os.path.join(path, "lora"))
    saved = getattr(saved, "item_metadata", saved)
    flat = traverse_util.flatten_dict(dict(saved.tree) if hasattr(saved, "tree") else saved, sep="/")
    kernel_names = {p: n for p, n in names.items() if p.endswith("/kernel")}
    lshapes = {p: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype) for p, m in flat.items()}
    lnames = traverse_util.flatten_dict(
        lora_lib.logical_axes(kernel_names, traverse_util.unflatten_dict(lshapes, sep="/")), sep="/",
        is_leaf=lambda _, x: isinstance(x, tuple))
    lora = ckpt.restore(os.path.join(path, "lora"), _target(lshapes, lnames, mesh, rules))
  return params, lora
