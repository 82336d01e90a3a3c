"""Stage kinds: what a stage of a recipe prepares before it trains.

Plain training prepares nothing (`StageKind` itself). Every other kind writes one data file
into the stage's directory, once, before training (`prepare`, through
`mmjax.files.write_once`: atomic, and reused by a resumed stage):

  online pairs  `mmjax.recipes.pairs.OnlinePairs`  DPO pairs sampled from the stage's start
  rebirth data  `mmjax.recipes.pairs.Rebirth`      an earlier stage's answers to train prompts
  selection     `mmjax.recipes.select.Selection`   pool records chosen from a student's errors

A kind may also change the stage's config so that training reads its file (`configure`,
applied before the stage's `Run` is built; it must not depend on the file's content), and
names the earlier stages whose results it reads (`reads`: rebirth the stage it distils,
selection its model teacher), so that `mmjax.recipes.reuse` copies a stage only with them. The
objective finds the prepared files by kind name in `DataContext.prepared`.
`mmjax.recipes.registry` lists the kinds; `mmjax.recipes.stages` applies those whose
`applies(config)` holds, in that order, with no per-kind branches.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from mmjax import files


@dataclasses.dataclass
class StageContext:
  """What a kind needs to prepare a stage: the stage's name, run config and directory, its
  `Run`, tokenizer and mesh, its starting params (None: the seeded random init), the
  final params of the stages before it and the adapter it continues (if any)."""
  name: str
  config: Any
  sdir: str
  run: Any
  tokenizer: Any
  mesh: Any
  base_params: Any = None
  finals: dict = dataclasses.field(default_factory=dict)
  adapter: Any = None  # the LoRA tree the stage continues (`continue_adapter`), else None (a fresh one)
  _start: dict = dataclasses.field(default_factory=dict, repr=False)

  def start_variables(self) -> dict:
    """The stage's starting variables, built exactly as the loop builds them (with the fresh
    adapter, whose zero `b` leaves the model unchanged, or the continued one)."""
    if "variables" not in self._start:
      rng = jax.random.key(self.config.seed)
      with jax.set_mesh(self.mesh):
        if self.adapter is not None:
          state = self.run.init_from_adapter(rng, self.base_params, self.adapter)
        else:
          state = (self.run.init_state(rng) if self.base_params is None else
                   self.run.init_from_params(rng, self.base_params))
      self._start["variables"] = state.variables
    return self._start["variables"]

  def log(self, message: str) -> None:
    if jax.process_index() == 0:
      print(f"[{self.name}] {message}" if self.name else message, flush=True)


class StageKind:
  """Plain training: applies to no stage by itself (it is what every stage does) and
  prepares nothing. Subclasses name their file and produce its content."""
  name = "train"
  file = ""  # the file written in the stage directory

  def applies(self, config) -> bool:
    return False

  def configure(self, config, path: str):
    """The stage config that trains on the file at `path` (default: unchanged)."""
    return config

  def reads(self, config) -> set:
    """The earlier stages whose final weights the file is made from (besides the stage's start)."""
    return set()

  def produce(self, ctx: StageContext) -> str | bytes:
    """The file's content (called on every process when the file is missing)."""
    raise NotImplementedError


def reads(kinds, config) -> set:
  """The earlier stages the kinds of a stage read."""
  return set().union(*(kind.reads(config) for kind in kinds))


def configure(kinds, config, sdir: str):
  """`config` with every kind's `configure` applied (before the stage's Run is built)."""
  for kind in kinds:
    config = kind.configure(config, os.path.join(sdir, kind.file))
  return config


def prepare(kinds, ctx: StageContext) -> dict:
  """Writes each kind's file once (see the module docstring); returns {kind name: path}."""
  prepared = {}
  for kind in kinds:
    path = os.path.join(ctx.sdir, kind.file)
    files.write_once(path, lambda kind=kind: kind.produce(ctx))
    prepared[kind.name] = path
  return prepared

