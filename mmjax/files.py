"""Files written atomically, and data files written once.

`atomic_write(path, data)`: bytes or text go to a temporary file in the same directory,
which is then renamed over `path` (`os.replace`), so a reader (or a run killed mid-write)
sees either the old file or the whole new one, never a torn one. `data` may also be a
function `f(file_object)` that streams the content (binary mode).

`write_once(path, produce)`: the data file a stage prepares (online DPO pairs, rebirth
answers, a data selection). When `path` is missing on any process, every process calls
`produce()` (it may run collective computations, e.g. sampling from a sharded model) and
writes the same bytes atomically, so the file is there on local disks and a shared one
alike; then the processes meet at a barrier. A resumed stage finds the file and reuses it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Callable

import jax
import numpy as np


def atomic_write(path: str, data) -> str:
  """Writes `data` (bytes, str, or a function of a binary file object) to `path` atomically."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp.{jax.process_index()}.{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def barrier(name: str) -> None:
  """Waits for every process (nothing to wait for with one)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_dir(path: str):
  """Yields `path + '.partial'`, a fresh directory the block writes (every process may write
  into it), which becomes `path` when the block ends without an error; a leftover of an
  interrupted write is removed first. So `path` exists only complete."""
  path = os.path.abspath(path)
  tmp = path + ".partial"
  if jax.process_index() == 0 and os.path.exists(tmp):
    shutil.rmtree(tmp)
  barrier(f"atomic_dir start {path}")
  os.makedirs(tmp, exist_ok=True)
  yield tmp
  barrier(f"atomic_dir written {path}")
  if jax.process_index() == 0:
    os.replace(tmp, path)
  barrier(f"atomic_dir done {path}")


def jsonl(records) -> str:
  """JSON lines of `records` (keys starting with '_' left out)."""
  return "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n" for r in records)


def write_once(path: str, produce: Callable[[], bytes | str]) -> bool:
  """Writes `produce()` to `path` (atomically, on every process) unless every process already
  has it; returns whether it was written. See the module docstring."""
  have = os.path.exists(path)
  if jax.process_count() > 1:  # all processes take the same branch (produce may hold collectives)
    from jax.experimental import multihost_utils
    have = bool(np.all(multihost_utils.process_allgather(np.array(have))))
  if have:
    return False
  atomic_write(path, produce())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"write_once {path}")
  return True
