"""Checkpoints through Orbax: `WORKDIR/checkpoints/<step>/{state, data}`.

A checkpoint holds the trainable variables, the optimizer state, the step, the objective's
own state (`TrainState.aux`, e.g. DPO's reference copy) and the Grain iterator state; the frozen base is rebuilt from its source (seeded init or a Hugging Face
directory) and is not re-saved every step. Step directories are finalised atomically by
Orbax, so a run killed mid-save restarts from the last complete step.
"""
from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


def _saved(state) -> dict:
  out = {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state}
  if state.aux:  # objective state the step changes (DPO's reference copy)
    out["aux"] = state.aux
  return out


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for a train state plus a data iterator."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state, data_iter, force: bool = False) -> None:
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    args = {"state": ocp.args.StandardSave(_saved(state))}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self.manager.save(step, args=ocp.args.Composite(**args), force=force)
    self.manager.wait_until_finished()

  def restore(self, abstract_state, data_iter, step: int | None = None):
    """The state at `step` (default: latest) laid out like `abstract_state` (ShapeDtypeStructs
    with shardings); the data iterator is restored in place. Returns the state."""
    step = self.latest_step() if step is None else step
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _saved(abstract_state))
    args = {"state": ocp.args.StandardRestore(target)}
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    saved = restored["state"]
    return abstract_state.replace(step=saved["step"], trainable=saved["trainable"], opt_state=saved["opt_state"],
                                  aux=saved.get("aux", abstract_state.aux))

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
