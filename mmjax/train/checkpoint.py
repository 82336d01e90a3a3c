"""Checkpoints through Orbax: `WORKDIR/checkpoints/<step>/{state, data}`.

A checkpoint holds the trainable variables, the optimizer state, the step, the objective's
own state (`TrainState.aux`, e.g. DPO's reference copy) and the Grain iterator state; the
frozen base is rebuilt from its source (seeded init or a Hugging Face directory) and is not
re-saved every step. Saves are asynchronous: the arrays are copied off the devices and
training goes on while a background thread writes them; the next save (or the end of the
stage) waits for it. Step directories are finalised atomically by Orbax, so a run killed
mid-save restarts from the last complete step.

Each finished step also gets `mmjax_files.json`, the size of every file in it. On restore a
step whose files are missing or of the wrong size (or that Orbax fails to read) is reported
in one line, moved aside to `<step>.damaged`, and the next older step is used.
"""
from __future__ import annotations

import gc
import json
import os
import sys

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from mmjax.files import atomic_write, barrier

MANIFEST = "mmjax_files.json"


def _saved(state) -> dict:
  out = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}
  if state.aux:  # objective state the step changes (DPO's reference copy)
    out["aux"] = state.aux
  return out


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for a train state plus a data iterator."""

  def __init__(self, directory: str, keep: int, use_async: bool = True):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=use_async),
        item_names=("state", "data"))
    self._unsealed = None  # the step being written in the background

  def latest_step(self) -> int | None:
    """The newest finished step (waits for a save in progress)."""
    self.wait()
    return self.manager.latest_step()

  def wait(self) -> None:
    """Waits for the save in progress, then records its files' sizes."""
    self.manager.wait_until_finished()
    step, self._unsealed = self._unsealed, None
    if step is not None and jax.process_index() == 0:
      path = os.path.join(self.directory, str(step))
      if os.path.isdir(path):  # (not when max_to_keep removed it already)
        atomic_write(os.path.join(path, MANIFEST), json.dumps(_file_sizes(path), indent=0))

  def save(self, state, data_iter, force: bool = False) -> None:
    """Starts saving `state` (and the iterator's position) at its step; returns once the arrays
    are copied off the devices. A step already saved is kept."""
    step = int(jax.device_get(state.step))
    self.wait()
    if step in self.manager.all_steps():
      return
    args = {"state": ocp.args.StandardSave(_saved(state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    if self.manager.save(step, args=ocp.args.Composite(**args), force=force):
      self._unsealed = step

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """The state at `step` (default: the newest intact one) laid out like `abstract_state`
    (ShapeDtypeStructs with shardings); the data iterator is restored in place. Returns the
    state, or None when there is no checkpoint.

    A newer step that fails to read (a truncated or missing file, damaged metadata) is reported
    in one line on stderr and, once an older step has been read, moved aside to
    `<step>.damaged` (kept for inspection; the run saves that step again when it gets there).
    Raises DamagedCheckpoints, moving nothing, when checkpoints exist but none can be read."""
    if step is not None:
      return self._restore(abstract_state, data_iter, step)
    self.wait()
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      reason = _check_sizes(os.path.join(self.directory, str(step)))
      state = None
      if reason is None:
        state, reason = self._try_restore(abstract_state, data_iter, step)
      if not _all_processes(reason is None):
        damaged.append((step, reason or "damaged on another process"))
        continue
      for bad, why in damaged:
        self._set_aside(bad, why, step)
      return state
    if damaged:
      raise DamagedCheckpoints(
          f"no checkpoint in {self.directory} can be read ("
          + "; ".join(f"step {s}: {why}" for s, why in damaged) + "); move the directory away to start from step 0")
    return None

  def _try_restore(self, abstract_state, data_iter, step: int):
    """(state, None), or (None, why) when Orbax fails to read the step."""
    hook = sys.unraisablehook  # Orbax's failed parallel reads leave exceptions nobody retrieved
    sys.unraisablehook = lambda unraisable: None
    try:
      return self._restore(abstract_state, data_iter, step), None
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds for damaged files
      return None, _one_line(e)
    finally:
      gc.collect()
      sys.unraisablehook = hook

  def _restore(self, abstract_state, data_iter, step: int):
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saved(abstract_state))
    args = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    saved = restored["state"]
    return abstract_state.replace(step=saved["step"], trainable=saved["trainable"], opt_state=saved["opt_state"],
                                  aux=saved.get("aux", abstract_state.aux))

  def _set_aside(self, step: int, reason: str, resumed: int) -> None:
    """Moves a damaged step to `<step>.damaged` (nothing is deleted) and says so in one line."""
    path = os.path.join(self.directory, str(step))
    target, n = path + ".damaged", 1
    while os.path.exists(target):
      n += 1
      target = f"{path}.damaged{n}"
    if jax.process_index() == 0:
      os.replace(path, target)
      print(f"warning: checkpoint {path} cannot be read ({reason}); resuming from step {resumed}, the damaged "
            f"one moved to {target}", file=sys.stderr, flush=True)
    barrier(f"checkpoint moved aside {path}")
    self.manager.reload()

  def close(self) -> None:
    self.wait()
    self.manager.close()


class DamagedCheckpoints(Exception):
  """Checkpoints exist but none can be read (never a silent start from step 0)."""


def _file_sizes(step_dir: str) -> dict:
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST:
        out[rel] = os.path.getsize(os.path.join(root, name))
  return out


def _check_sizes(step_dir: str) -> str | None:
  """Why a step's files disagree with its manifest, or None (also when it has none: a step
  finished just before a kill, left to Orbax to read)."""
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      want = json.load(f)
  except (OSError, ValueError):
    return None
  have = _file_sizes(step_dir)
  for rel, size in sorted(want.items()):
    if rel not in have:
      return f"{rel} is missing"
    if have[rel] != size:
      return f"{rel} has {have[rel]} of its {size} bytes"
  return None


def _one_line(e: Exception) -> str:
  text = str(e).strip().split(" See full TensorStore details")[0]
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))
