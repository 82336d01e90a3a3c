"""Device mesh, logical-to-mesh rules and shardings for state and batches.

Parameters carry logical axis names (see `mmjax.models.layers`); the run config holds
the rules mapping them to mesh axes `data`, `fsdp`, `tensor`. Shardings are derived
from `jax.eval_shape` of init, never written per weight. A mesh axis that does not
divide a dimension is dropped for that dimension (the dimension is replicated over it),
so odd test sizes and small vocabularies still shard.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over data+fsdp; weights' embed axis over fsdp (ZeRO-3 style);
# heads / mlp / vocab over tensor (Megatron style). Activations have their own names.
DEFAULT_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("lora_rank", None),
)


def mesh_shape(axes: dict, n_devices: int) -> tuple[int, ...]:
  """Resolves sizes of (data, fsdp, tensor); one of them may be -1 (fills the rest)."""
  sizes = [int(axes[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or n_devices % known:
      raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} cannot fill {n_devices} devices "
                       f"(the fixed axes must divide {n_devices})")
    sizes[sizes.index(-1)] = n_devices // known
  if math.prod(sizes) != n_devices:
    raise ValueError(f"mesh: {dict(zip(MESH_AXES, sizes))} multiplies to {math.prod(sizes)}, "
                     f"but there are {n_devices} devices; make the product {n_devices} or set one axis to -1")
  return tuple(sizes)


def make_mesh(axes: dict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(axes, len(devices))
  try:
    dev = jax.experimental.mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # CPU fake devices or unusual topologies: plain order
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES)


def rules_from_config(rules) -> tuple:
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes) for name, axes in rules)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules) -> P:
  """Mesh PartitionSpec for an array with these logical names, dropping non-dividing axes."""
  if logical is None:
    return P()
  table = dict(rules)
  used, out = set(), []
  for name, dim in zip(logical, shape):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    keep = []
    size = 1
    for a in axes:
      n = mesh.shape[a]
      if a in used or n == 1 or dim % (size * n):
        continue
      keep.append(a)
      size *= n
    used.update(keep)
    out.append(tuple(keep) if len(keep) > 1 else (keep[0] if keep else None))
  return P(*out)


def logical_axes_tree(boxed_tree):
  """Logical names of each leaf of a tree from `init` (boxed `nn.LogicallyPartitioned`)."""
  return jax.tree.map(
      lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None,
      boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def tree_shardings(shapes, logical, mesh: Mesh, rules):
  """NamedShardings for a tree of ShapeDtypeStructs given a matching tree of logical names."""
  return jax.tree.map(
      lambda s, names: NamedSharding(mesh, logical_to_spec(names, s.shape, mesh, rules)),
      shapes, logical, is_leaf=lambda x: x is None or isinstance(x, tuple))


def batch_sharding(mesh: Mesh, rules, ndim: int = 2) -> NamedSharding:
  """Sharding of a batch array: leading axis like `act_batch`, the rest replicated."""
  axes = dict(rules).get("act_batch")
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh, rules) -> int:
  axes = dict(rules).get("act_batch") or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def in_context(fn, mesh: Mesh | None, rules):
  """`fn` traced with the mesh and the logical-axis rules active, so activation constraints
  (`nn.with_logical_constraint`) resolve to mesh axes; `fn` itself when there is no mesh."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


def to_host(x) -> np.ndarray:
  """A (possibly sharded, possibly multi-host) array as one numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def from_full(x: np.ndarray, mesh: Mesh, rules) -> jax.Array:
  """An array that every process holds whole, as a global array split over the batch axis
  like a batch (each device takes its rows of `x`)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh, rules, x.ndim), lambda index: x[index])


def placement(names, shape, mesh: Mesh | None, rules):
  """Where an array with these logical names goes: its NamedSharding on `mesh`, or the first
  local device without a mesh."""
  if mesh is None:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))
