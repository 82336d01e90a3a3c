"""Safetensors checkpoints read and written one tensor at a time.

Reading parses the safetensors header itself and reads each requested part of a tensor with
`os.pread` into a fresh buffer (the rows its leading-axis slice spans; later axes are sliced
in memory): nothing is memory-mapped, so a process's resident memory holds only the tensor
being placed, not the pages of a file it has read (bf16 comes back as `ml_dtypes.bfloat16`).
A header or data region that does not fit the file is a one-line ValueError. Writing streams: the header is computed from shapes and dtypes alone, then each tensor
is materialised on the host, written and dropped, so a host never holds the whole model.

Directory layouts, as Hugging Face writes them:
  model.safetensors                                   one file
  model.safetensors.index.json + model-0000k-of-0000n.safetensors   sharded (`weight_map`)
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, NamedTuple

import ml_dtypes
import numpy as np

from mmjax.files import atomic_write

# safetensors dtype codes <-> numpy dtypes.
_CODES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_DTYPE_CODES = {v: k for k, v in _CODES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def np_dtype(name: str) -> np.dtype:
  """'float32' | 'bfloat16' | 'float16' -> numpy dtype (bf16 via ml_dtypes)."""
  table = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
  if name not in table:
    raise ValueError(f"dtype={name!r} is not supported; supported: {', '.join(table)}")
  return np.dtype(table[name])


class TensorInfo(NamedTuple):
  shape: tuple[int, ...]
  dtype: str  # safetensors code, e.g. 'BF16'
  file: str
  start: int = 0  # absolute byte offset of the data in `file`
  end: int = 0


def read_header(file: str) -> dict[str, TensorInfo]:
  """The tensors of one safetensors file (name -> shape, dtype, byte range); a one-line
  ValueError when the file is not a whole safetensors file."""
  size = os.path.getsize(file)
  with open(file, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f"{file} is not a safetensors file (only {size} bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 * 2**20:
      raise ValueError(f"{file} is truncated or not a safetensors file (a {n}-byte header in {size} bytes)")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{file} has an unreadable safetensors header ({e})") from None
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      start, end = (8 + n + int(x) for x in info["data_offsets"])
      shape, code = tuple(int(d) for d in info["shape"]), str(info["dtype"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{file}: tensor {name!r} has a malformed header entry") from None
    if code not in _CODES:
      raise ValueError(f"{file}: tensor {name!r} has dtype {code}; supported: {', '.join(_CODES)}")
    if end - start != math.prod(shape) * _CODES[code].itemsize or end > size:
      raise ValueError(f"{file} is truncated: tensor {name!r} needs bytes {start}-{end} of a {size}-byte file")
    out[name] = TensorInfo(shape, code, file, start, end)
  return out


class Reader:
  """All tensors of a (possibly sharded) safetensors checkpoint, read on demand.

  `read(name, index)` returns a numpy array of `tensor[index]` (index: tuple of slices in
  the file's layout), reading from disk only the rows the first slice spans.
  """

  def __init__(self, files: Iterable[str]):
    self._fds = {}
    self.tensors: dict[str, TensorInfo] = {}
    for file in files:
      self.tensors.update(read_header(file))

  def _fd(self, file: str) -> int:
    if file not in self._fds:
      self._fds[file] = os.open(file, os.O_RDONLY)
    return self._fds[file]

  def read(self, name: str, index: tuple | None = None) -> np.ndarray:
    info = self.tensors[name]
    dtype = _CODES[info.dtype]
    if not info.shape:
      return np.frombuffer(os.pread(self._fd(info.file), info.end - info.start, info.start), dtype).reshape(())
    index = tuple(index) if index is not None else ()
    index += (slice(None),) * (len(info.shape) - len(index))
    lo, hi, step = index[0].indices(info.shape[0])
    hi = max(hi, lo)
    row = math.prod(info.shape[1:]) * dtype.itemsize
    buf = os.pread(self._fd(info.file), (hi - lo) * row, info.start + lo * row)
    if len(buf) != (hi - lo) * row:
      raise ValueError(f"{info.file} is truncated: tensor {name!r} ends past the end of the file")
    x = np.frombuffer(buf, dtype).reshape((hi - lo,) + info.shape[1:])
    return x[(slice(None, None, step),) + index[1:]]

  def close(self):
    for fd in self._fds.values():
      os.close(fd)
    self._fds.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_dir(path: str, stem: str = "model") -> Reader:
  """Reader over `{stem}.safetensors` or `{stem}.safetensors.index.json` in `path`."""
  single = os.path.join(path, f"{stem}.safetensors")
  index = os.path.join(path, f"{stem}.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted({os.path.join(path, v) for v in weight_map.values()})
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise ValueError(f"{index} names shard {os.path.basename(missing[0])!r}, which does not exist")
    return Reader(files)
  if os.path.exists(single):
    return Reader([single])
  others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))] if os.path.isdir(path) else []
  hint = f" (found {others[0]!r}: convert it to safetensors first; torch files are not read)" if others else ""
  raise ValueError(f"no {stem}.safetensors or {stem}.safetensors.index.json in {path}{hint}")


class Entry(NamedTuple):
  """One tensor to write: `get()` returns its host array (called once, when it is written)."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  get: Callable[[], np.ndarray]


def _nbytes(e: Entry) -> int:
  return int(math.prod(e.shape)) * np.dtype(e.dtype).itemsize


def _write_file(file: str, entries: list[Entry], metadata: dict[str, str]) -> None:
  header, offset = {}, 0
  for e in entries:
    if np.dtype(e.dtype) not in _DTYPE_CODES:
      raise ValueError(f"tensor {e.name!r}: dtype {e.dtype} cannot be written to safetensors")
    n = _nbytes(e)
    header[e.name] = {"dtype": _DTYPE_CODES[np.dtype(e.dtype)], "shape": list(e.shape),
                      "data_offsets": [offset, offset + n]}
    offset += n
  header["__metadata__"] = metadata
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned

  def stream(f):
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for e in entries:
      x = np.ascontiguousarray(e.get(), dtype=e.dtype)
      if x.shape != tuple(e.shape):
        raise ValueError(f"tensor {e.name!r}: got shape {x.shape}, declared {tuple(e.shape)}")
      f.write(x.tobytes())
      del x
  atomic_write(file, stream)


def write_dir(path: str, entries: list[Entry], stem: str = "model", max_shard_bytes: int | None = None,
              metadata: dict[str, str] | None = None, write: bool = True) -> list[str]:
  """Writes `{stem}.safetensors`, or shards plus `{stem}.safetensors.index.json` when the
  tensors exceed `max_shard_bytes`. Returns the files written. With write=False (processes
  other than 0) every `Entry.get` is still called, in the same order, and nothing is written."""
  if not write:
    for e in entries:
      e.get()
    return []
  os.makedirs(path, exist_ok=True)
  metadata = {"format": "pt", **(metadata or {})}  # transformers requires format 'pt'
  shards: list[list[Entry]] = [[]]
  size = 0
  for e in entries:
    if max_shard_bytes and shards[-1] and size + _nbytes(e) > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(e)
    size += _nbytes(e)
  index_file = os.path.join(path, f"{stem}.safetensors.index.json")
  for stale in (index_file, os.path.join(path, f"{stem}.safetensors")):  # from an earlier export
    if os.path.exists(stale):
      os.remove(stale)
  if len(shards) == 1:
    file = os.path.join(path, f"{stem}.safetensors")
    _write_file(file, shards[0], metadata)
    return [file]
  files, weight_map = [], {}
  for k, shard in enumerate(shards):
    name = f"{stem}-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    _write_file(os.path.join(path, name), shard, metadata)
    files.append(os.path.join(path, name))
    weight_map.update({e.name: name for e in shard})
  index = {"metadata": {"total_size": sum(_nbytes(e) for e in entries)}, "weight_map": weight_map}
  atomic_write(index_file, json.dumps(index, indent=2))
  return files
