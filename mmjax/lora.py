"""LoRA adapters as their own parameter tree (collection `lora`).

For every module whose path matches the target regex and that owns a 2-D `kernel`,
the adapter tree holds `a` [in, R] (random) and `b` [R, out] (zeros) at the same
module path, e.g. `layers_0/attn/q_proj/{a,b}`. A fresh adapter changes nothing,
and applying a model without the `lora` collection gives the base model.

All functions are pure: they take and return nested dicts.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from mmjax.models.layers import lora_scale


def target_paths(params: dict, targets: str) -> list[str]:
  """Module paths ('a/b/c') owning a 2-D kernel whose path fully matches `targets`."""
  out = []
  for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
    if path.endswith("/kernel") and len(leaf.shape) == 2:
      module = path[: -len("/kernel")]
      if re.fullmatch(targets, module):
        out.append(module)
  return sorted(out)


def init(rng: jax.Array, params: dict, targets: str, rank: int, dtype=None) -> dict:
  """New adapter tree for `params`: `a` ~ kaiming-uniform (as PEFT), `b` = 0.

  Works on arrays or `jax.ShapeDtypeStruct`s (under `jax.eval_shape`).
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  modules = target_paths(params, targets)
  if not modules:
    raise ValueError(f"lora.targets={targets!r} matches no module with a 2-D kernel")
  out = {}
  for i, module in enumerate(modules):
    kernel = flat[module + "/kernel"]
    d_in, d_out = kernel.shape
    dt = dtype or kernel.dtype
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) on an [R, in] matrix, as PEFT
    a = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, rank), dt, -bound, bound)
    out[module + "/a"] = a
    out[module + "/b"] = jnp.zeros((rank, d_out), dt)
  return traverse_util.unflatten_dict(out, sep="/")


def reset(rng: jax.Array, lora: dict) -> dict:
  """A fresh adapter with the same targets and rank: new random `a`, zero `b`."""
  flat = traverse_util.flatten_dict(lora, sep="/")
  out = {}
  for i, module in enumerate(sorted({p.rsplit("/", 1)[0] for p in flat})):
    a = flat[module + "/a"]
    bound = 1.0 / math.sqrt(a.shape[0])
    out[module + "/a"] = jax.random.uniform(jax.random.fold_in(rng, i), a.shape, a.dtype, -bound, bound)
    out[module + "/b"] = jnp.zeros_like(flat[module + "/b"])
  return traverse_util.unflatten_dict(out, sep="/")


def merge(params: dict, lora: dict, alpha: float, rslora: bool = False) -> dict:
  """Base params with `scale * a @ b` added to each adapted kernel (computed in float32)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  flat_l = traverse_util.flatten_dict(lora, sep="/")
  out = dict(flat)
  for module in {p.rsplit("/", 1)[0] for p in flat_l}:
    a = flat_l[module + "/a"].astype(jnp.float32)
    b = flat_l[module + "/b"].astype(jnp.float32)
    key = module + "/kernel"
    if key not in flat:
      raise ValueError(f"adapter at {module!r} has no kernel in params")
    scale = lora_scale(alpha, a.shape[-1], rslora)
    out[key] = (flat[key].astype(jnp.float32) + scale * (a @ b)).astype(flat[key].dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def count(tree: dict) -> int:
  """Number of scalars in a tree (adapter or base)."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def logical_axes(param_axes: dict, lora: dict) -> dict:
  """Logical axis names for the adapter tree from the kernels' names.

  `param_axes` maps flat kernel paths to (in_name, out_name); `a` is sharded like the
  kernel's input axis, `b` like its output axis, the rank axis never.
  """
  out = {}
  for path in traverse_util.flatten_dict(lora, sep="/"):
    module, leaf = path.rsplit("/", 1)
    in_name, out_name = param_axes[module + "/kernel"]
    out[path] = (in_name, "lora_rank") if leaf == "a" else ("lora_rank", out_name)
  return traverse_util.unflatten_dict(out, sep="/")
