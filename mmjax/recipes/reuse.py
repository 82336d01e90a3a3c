"""Stages finished in another workdir, copied instead of trained (`config.reuse_from`).

An ablation of a recipe often changes only its later stages (the DPO rounds' candidates, a
control's steps) while its first stage (SFT, a pretrained tower) is the slow part. With
`config.reuse_from=OTHER` (the workdir of an earlier run of a recipe), a stage that OTHER
finished (`OTHER/stages/NAME/done.json`) is copied into this workdir instead of trained when

  - its stage config equals this run's, apart from `reuse_from` itself and the sections of
    objectives the stage does not train with (a DPO setting does not change an SFT stage), and
  - every stage it reads (the one it starts from, and those its stage kinds read:
    `distill_from_stage`, `select.teacher_stage`; `StageKind.reads`) was reused too.

OTHER's configs come from its `config.json`; a key it lacks (one added to mmjax since) counts
as a difference. A stage that differs is trained here, and so is every later stage that
reads it; the log names the first key that differs. A copied stage's directory holds
`reused_from.json` (its source), so a rerun after a kill knows it for one. The copy is made
in a temporary directory and renamed (by process 0 of a multi-host run, into the shared
workdir), so a kill leaves either no stage or the whole one.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections

from mmjax.config.core import INIT_STAGE, ConfigError, stage_config
from mmjax.files import atomic_write, barrier
from mmjax.objectives import registry as objectives
from mmjax.recipes import kinds

MARK = "reused_from.json"  # in a copied stage's directory: where it came from


def config_dict() -> dict:
  return dict(
      reuse_from="",  # another run's workdir: its finished stages with the same stage config (objectives' unused
      #                 sections aside) and reused inputs are copied in instead of trained ('' = train every stage)
  )


def validate(config, env) -> None:
  if config.reuse_from and env.files:
    check_source(config.reuse_from)


def is_run(path: str) -> bool:
  """Whether `path` is the workdir of a run (it holds the config.json mmjax.main writes)."""
  return os.path.isfile(os.path.join(path, "config.json"))


def check_source(path: str) -> None:
  if not is_run(path):
    raise ConfigError(f"config.reuse_from={path!r} is not the workdir of a run (it has no config.json); give the "
                      "--workdir of an earlier run of the recipe, or '' to train every stage")


def _plain(cfg) -> dict:
  """A config as JSON values (tuples as lists), as config.json stores it."""
  return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg, default=str))


def comparable(cfg) -> dict:
  """What a stage's result depends on: its config without `reuse_from` and the sections of the
  objectives it does not use."""
  skip = {"reuse_from"}
  for module in objectives.modules():
    if module.NAME != cfg.objective:
      skip |= set(module.config_dict())
  return {k: v for k, v in _plain(cfg).items() if k not in skip}


def first_difference(a, b, prefix: str = "") -> str | None:
  """The dotted path of the first key whose values differ (None when equal)."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b)):
      if key not in a or key not in b:
        return f"{prefix}{key}"
      found = first_difference(a[key], b[key], f"{prefix}{key}.")
      if found:
        return found
    return None
  return None if a == b else prefix.rstrip(".")


def inputs(cfg, prev: str | None, stage_kinds) -> set:
  """The stages whose results a stage reads: the one it starts from and those its kinds read."""
  out = {cfg.init_from_stage or prev} | kinds.reads(stage_kinds, cfg)
  return {s for s in out if s and s != INIT_STAGE}


class Reuse:
  """The stages of one recipe run that come from `config.reuse_from`."""

  def __init__(self, config, workdir: str):
    self.other = config.reuse_from
    self.reused: set = set()
    self.other_config = None
    if not self.other:
      return
    if os.path.realpath(self.other) == os.path.realpath(workdir):
      raise ConfigError(f"config.reuse_from={self.other!r} is this run's own workdir; give another run's")
    check_source(self.other)
    with open(os.path.join(self.other, "config.json")) as f:
      self.other_config = ml_collections.ConfigDict(json.load(f))

  def bring(self, config, name: str, prev: str | None, sdir: str, stage_kinds, log=print) -> bool:
    """Copies OTHER's finished stage `name` to `sdir` when it may stand for this run's (the stage
    kinds that apply to it name the stages it reads besides its start); True
    when it did (`sdir/done.json` then exists), or when an earlier attempt of this run did
    (its `reused_from.json`). A stage this run finished itself is left as it is."""
    if not self.other:
      return False
    if os.path.isfile(os.path.join(sdir, "done.json")):
      if os.path.isfile(os.path.join(sdir, MARK)):
        self.reused.add(name)
        return True
      return False
    src = os.path.join(self.other, "stages", name)
    if not os.path.isfile(os.path.join(src, "done.json")) or name not in self.other_config.stages:
      return False
    cfg = stage_config(ml_collections.ConfigDict(_plain(config)), name)
    missing = sorted(inputs(cfg, prev, stage_kinds) - self.reused)
    if missing:
      log(f"[{name}] not reused from {self.other}: it reads {', '.join(map(repr, missing))}, which this run did not "
          "take from there")
      return False
    diff = first_difference(comparable(cfg), comparable(stage_config(self.other_config, name)))
    if diff is not None:
      log(f"[{name}] not reused from {self.other}: its config differs at {diff!r}")
      return False
    if jax.process_index() == 0:  # every process decides alike; one copies (a shared workdir, as checkpoints need)
      tmp = f"{sdir}.reuse"
      shutil.rmtree(tmp, ignore_errors=True)
      shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("checkpoints"))
      atomic_write(os.path.join(tmp, MARK), json.dumps({"source": os.path.abspath(src)}))
      shutil.rmtree(sdir, ignore_errors=True)  # a partial start of this stage here: replaced by the finished one
      os.makedirs(os.path.dirname(sdir), exist_ok=True)
      os.replace(tmp, sdir)
    barrier(f"reuse {sdir}")
    self.reused.add(name)
    log(f"[{name}] reused from {src} (same stage config)")
    return True
