"""What every Hugging Face converter shares: reading config.json, naming the architecture,
one-line errors for unsupported settings and a check of param shapes against a config."""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from flax import traverse_util

from mmjax import sharding
from mmjax.convert import safetensors_io as stio


def read_json(path: str, file: str) -> dict:
  """PATH/FILE as a dict; a one-line ValueError when it is missing or not JSON."""
  full = os.path.join(path, file)
  if not os.path.exists(full):
    raise ValueError(f"no {file} in {path}")
  with open(full) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{full} is not valid JSON ({e.msg} at line {e.lineno})") from None


def unsupported(field: str, value, supported: str):
  """Raises the one-line error for a config.json setting mmjax does not convert."""
  raise ValueError(f"config.json {field}={value!r} is not supported; supported: {supported}")


def find_architecture(hf: dict, architectures, model_types: dict) -> str:
  """The first of config.json's `architectures` that is in `architectures`, else the class
  `model_types` maps its `model_type` to; anything else is a one-line ValueError."""
  archs = hf.get("architectures") or []
  for a in archs:
    if a in architectures:
      return a
  if archs:
    unsupported("architectures", archs, ", ".join(architectures))
  if hf.get("model_type") in model_types:
    return model_types[hf["model_type"]]
  unsupported("model_type", hf.get("model_type"), ", ".join(model_types))


def check_param_shapes(flat: dict, want: dict) -> None:
  """Flat params against the flat specs a model config implies; a one-line ValueError
  naming the first param that is absent, extra or mis-shaped."""
  for p in sorted(set(want) | set(flat)):
    if p not in flat or p not in want or tuple(flat[p].shape) != tuple(want[p].shape):
      got = tuple(flat[p].shape) if p in flat else "absent"
      raise ValueError(f"params {p!r} has shape {got}, but cfg implies "
                       f"{tuple(want[p].shape) if p in want else 'no such param'}")


# ---------------------------------------------------------------------------------------
# Tensor plans: which Hugging Face tensor each mmjax param is, and how it is laid out.


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One mmjax param and the Hugging Face tensor it is stored as.

  kind: 'copy' (same layout), 'T' (transposed: HF [out, in] weight vs mmjax [in, out]
  kernel), 'conv' (a ViT patch kernel: HF [D, C, p, p] vs mmjax [p*p*C, D]), 'part' (row block
  `part` of `parts` blocks of `d` rows in a packed HF weight [parts*d, in], transposed, or bias
  [parts*d]: SigLIP's in_proj, timm's fused qkv and SwiGLU fc1), or 'reshape' (the same values
  in another shape: timm's [1, 1, D] class token)."""
  path: str
  name: str
  kind: str
  shape: tuple
  hf_shape: tuple
  patch: int = 0
  channels: int = 0
  d: int = 0
  part: int = 0
  parts: int = 1

  def renamed(self, name: str) -> "Tensor":
    return dataclasses.replace(self, name=name)

  def moved(self, prefix: str) -> "Tensor":
    """The same tensor under a params subtree (`prefix` + '/' + path)."""
    return dataclasses.replace(self, path=f"{prefix}/{self.path}")


def _shift(sl: slice, n: int, off: int) -> slice:
  start, stop, step = sl.indices(n)
  return slice(start + off, stop + off, step)


def read_tensor(reader, t: Tensor, sharding, dtype) -> jax.Array:
  """The param of `t` straight into `sharding`: each device reads only its own slice (a
  patch kernel is small and read whole)."""
  def read(index):
    index = tuple(index)
    if t.kind == "copy":
      x = reader.read(t.name, index)
    elif t.kind == "T":
      x = reader.read(t.name, index[::-1]).T
    elif t.kind == "conv":
      w = reader.read(t.name)
      x = w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])[index]
    elif t.kind == "reshape":
      x = reader.read(t.name).reshape(t.shape)[index]
    else:  # 'part': rows [off, off + d) of a packed [parts * d, in] weight (or of the bias)
      off = t.part * t.d
      if len(t.shape) == 1:
        x = reader.read(t.name, (_shift(index[0], t.shape[0], off),))
      else:
        x = reader.read(t.name, (_shift(index[1], t.shape[1], off), index[0])).T
    return np.asarray(x, dtype=dtype)
  return jax.make_array_from_callback(tuple(t.shape), sharding, read)


def check_file(path: str, reader, plan, what: str, owned=lambda name: True, ignored=lambda name: False) -> None:
  """The checkpoint at `path` against a plan: a missing tensor, an unexpected one (among the
  names `owned` selects and `ignored` does not), a shape other than the plan's or a dtype that
  is not a float is a one-line ValueError naming the tensor."""
  expected = {t.name: t.hf_shape for t in plan}
  for name in sorted(expected):
    if name not in reader.tensors:
      raise ValueError(f"{path}: missing tensor {name!r} (expected shape {expected[name]})")
  for name, info in sorted(reader.tensors.items()):
    if name not in expected:
      if owned(name) and not ignored(name):
        raise ValueError(f"{path}: unexpected tensor {name!r} with shape {info.shape}; {what} has no such weight")
      continue
    if info.shape != expected[name]:
      raise ValueError(f"{path}: tensor {name!r} has shape {info.shape} in the checkpoint, "
                       f"but config.json implies {expected[name]}")
    if info.dtype not in stio.FLOAT_CODES:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info.dtype}; supported: {', '.join(stio.FLOAT_CODES)}")


def read_params(reader, plan, names: dict, mesh, rules, dtype) -> dict:
  """The nested params of a plan, each tensor read into the sharding its logical `names`
  (flat {path: axes}) give on `mesh` (the first local device without a mesh)."""
  np_dt = np.dtype(dtype)
  flat = {t.path: read_tensor(reader, t, sharding.placement(names[t.path], t.shape, mesh, rules), np_dt)
          for t in plan}
  jax.block_until_ready(flat)
  return traverse_util.unflatten_dict(flat, sep="/")


def entries(flat: dict, plan, dtype) -> list:
  """safetensors entries of flat params {path: array} by a plan (inverse of `read_tensor`;
  the three thirds of a packed in_proj become one tensor). Arrays are gathered to the host
  one at a time, when written."""
  np_dt = np.dtype(dtype)
  out, packed = [], {}
  for t in plan:
    x = flat[t.path]
    if t.kind == "part":
      packed.setdefault(t.name, {})[t.part] = (x, t)
      continue
    if t.kind == "conv":
      get = (lambda x=x, t=t: sharding.to_host(x).reshape(t.patch, t.patch, t.channels, -1).transpose(3, 2, 0, 1))
    elif t.kind == "T":
      get = (lambda x=x: sharding.to_host(x).T)
    elif t.kind == "reshape":
      get = (lambda x=x, t=t: sharding.to_host(x).reshape(t.hf_shape))
    else:
      get = (lambda x=x: sharding.to_host(x))
    out.append(stio.Entry(t.name, t.hf_shape, np_dt, get))
  for name, parts in sorted(packed.items()):
    get = (lambda parts=parts: np.concatenate([sharding.to_host(parts[k][0]).T for k in sorted(parts)], axis=0))
    out.append(stio.Entry(name, parts[0][1].hf_shape, np_dt, get))
  return sorted(out)


def write_hf_dir(path: str, params: dict, specs: dict, plan, dtype: str, config: dict,
                 max_shard_bytes: int | None = None) -> None:
  """A Hugging Face model directory: the tensors of `plan` from nested `params` (checked
  against the flat shapes `specs` first) as safetensors shards in `dtype`, and config.json.
  Tensors are gathered to the host one at a time; every process calls this, process 0 writes."""
  flat = traverse_util.flatten_dict(params, sep="/")
  check_param_shapes(flat, specs)
  write = jax.process_index() == 0
  stio.write_dir(path, entries(flat, plan, stio.np_dtype(dtype)), max_shard_bytes=max_shard_bytes, write=write)
  if write:
    from mmjax.files import atomic_write
    atomic_write(os.path.join(path, "config.json"), json.dumps(config, indent=2))


def write_peft_dir(path: str, lora: dict, hf_names: dict, dtype: str, config: dict) -> None:
  """A PEFT adapter directory: adapter_model.safetensors with each adapted module's factors
  (`hf_names`: mmjax module path -> the Hugging Face module name under `base_model.model.`)
  and adapter_config.json, `config` plus the LoRA keys PEFT needs: r (the most common rank),
  rank_pattern (modules of another rank), target_modules (unless `config` has them) and the
  fixed defaults. Every process calls this; process 0 writes."""
  flat = traverse_util.flatten_dict(lora, sep="/")
  modules = sorted({p.rsplit("/", 1)[0] for p in flat})
  ranks = {m: flat[m + "/a"].shape[-1] for m in modules}
  r = max(set(ranks.values()), key=list(ranks.values()).count)
  np_dt = stio.np_dtype(dtype)
  tensors = []
  for m in modules:
    a, b = flat[m + "/a"], flat[m + "/b"]
    base = "base_model.model." + hf_names[m]
    tensors.append(stio.Entry(base + ".lora_A.weight", tuple(a.shape[::-1]), np_dt, lambda a=a: sharding.to_host(a).T))
    tensors.append(stio.Entry(base + ".lora_B.weight", tuple(b.shape[::-1]), np_dt, lambda b=b: sharding.to_host(b).T))
  write = jax.process_index() == 0
  stio.write_dir(path, sorted(tensors), stem="adapter_model", write=write)
  full = dict(peft_type="LORA", r=r, target_modules=sorted({hf_names[m] for m in modules}),
              rank_pattern={hf_names[m]: k for m, k in ranks.items() if k != r}, alpha_pattern={}, bias="none",
              fan_in_fan_out=False, modules_to_save=None, init_lora_weights=True, use_dora=False, inference_mode=True)
  full.update(config)
  if write:
    from mmjax.files import atomic_write
    atomic_write(os.path.join(path, "adapter_config.json"), json.dumps(full, indent=2))
