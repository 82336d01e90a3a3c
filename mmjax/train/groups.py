"""Directed fine-tuning: named groups of trainable leaves, each trained on its own data.

A stage with `config.groups` trains each group's leaves on the group's own Grain data set:

  config.groups.NAME = dict(trainable=(regexes over variable paths,), data=dict(overrides of config.data))
  config.group_schedule = "image:100,video:100,text:100"   which group each step trains (below)
  config.joint = False                                     True: every step trains all groups' leaves

The stage's trainable leaves are the union of the groups' (`config.trainable` is not used);
step s draws its batch from group `group_at(schedule, s)`'s data and, unless `joint`,
updates only that group's leaves — their params and optimizer moments; the other groups'
leaves and moments stay exactly as they were (their gradient is not even computed). With
`joint=True` the data schedule is the same and every step updates every group's leaves:
the joint baseline on equal steps and equal data. `config.data` stays the stage's eval
data (the target task), so every stage of a recipe is scored on the same held-out set.

Schedule: comma-separated `NAME` or `NAME:K` items (K consecutive steps, default 1),
cycled over the stage's steps. "image,video,text" interleaves per step;
"image:100,video:100,text:100" over 300 steps trains the groups one after another;
"" means every group once per cycle, in the order of `config.groups`.
"""
from __future__ import annotations

import json
import re

import ml_collections
from flax import traverse_util

from mmjax.config.core import ConfigError, derive
from mmjax.data import catalog
from mmjax.train import state as state_lib

GROUP_KEYS = ("trainable", "data")


class GroupError(ValueError):
  """A bad group or schedule setting (one line)."""


def config_dict() -> dict:
  return dict(
      # groups.NAME = dict(trainable=(regexes,), data=dict(data overrides)); each step trains one
      # group's leaves on its own data (see mmjax/train/groups.py)
      groups=ml_collections.ConfigDict(),
      group_schedule="",  # 'NAME' or 'NAME:K' items, cycled; '' = each group once per cycle
      joint=False,  # every step trains all groups' leaves (the joint baseline, same data schedule)
  )


def names(config) -> tuple[str, ...]:
  return tuple(config.groups.keys())


def parse_schedule(spec: str, group_names) -> list[tuple[str, int]]:
  """[(group, steps)] of a schedule string (see the module docstring)."""
  group_names = tuple(group_names)
  if not spec.strip():
    return [(n, 1) for n in group_names]
  blocks = []
  for item in spec.split(","):
    name, sep, count = item.strip().partition(":")
    if name not in group_names:
      raise GroupError(f"config.group_schedule={spec!r} names group {name!r}; defined groups: "
                       f"{', '.join(group_names) or 'none'}")
    try:
      k = int(count) if sep else 1
    except ValueError:
      k = 0
    if k <= 0:
      raise GroupError(f"config.group_schedule={spec!r}: {item.strip()!r} needs a positive step count "
                       "(NAME or NAME:K)")
    blocks.append((name, k))
  return blocks


def group_at(blocks, step: int) -> str:
  """The group that trains at 0-based `step` of a cycled schedule."""
  period = sum(k for _, k in blocks)
  r = step % period
  for name, k in blocks:
    if r < k:
      return name
    r -= k
  raise AssertionError("unreachable")


def steps_per_group(blocks, total: int) -> dict[str, int]:
  """How many of `total` steps each group trains."""
  out = {n: 0 for n, _ in blocks}
  for s in range(total):
    out[group_at(blocks, s)] += 1
  return out


def trainable_patterns(config) -> tuple[str, ...]:
  """The stage's trainable regexes: the union of its groups' (or `config.trainable`)."""
  if not config.groups:
    return tuple(config.trainable)
  out = []
  for g in config.groups.values():
    out += [p for p in g.trainable if p not in out]
  return tuple(out)


def data_config(config, name: str) -> ml_collections.ConfigDict:
  """config.data with group `name`'s data overrides."""
  return derive(config.data, config.groups[name].get("data", {}))


def data_configs(config) -> dict:
  """{group: its data config} of a directed stage, else {'': config.data} (the one group)."""
  return {n: data_config(config, n) for n in names(config)} or {"": config.data}


def group_config(config, name: str) -> ml_collections.ConfigDict:
  """The run config as group `name` sees it: its data and its trainable regexes."""
  return derive(config, data=data_config(config, name), trainable=tuple(config.groups[name].trainable),
                groups=ml_collections.ConfigDict())


def one_group(config, name: str, data_cfg) -> ml_collections.ConfigDict:
  """The stage config that trains its `trainable` leaves on `data_cfg` while `config.data`
  stays its evaluation data: one group `name` holding the keys where the two differ."""
  base = config.data.to_dict()
  group = dict(trainable=tuple(config.trainable), data={k: v for k, v in data_cfg.to_dict().items() if base.get(k) != v})
  return derive(config, groups=ml_collections.ConfigDict({name: group}), group_schedule="")


def update_mask(trainable_tree, patterns) -> dict:
  """A tree like `trainable_tree` of bools: True on the leaves the regexes match."""
  flat = traverse_util.flatten_dict(trainable_tree, sep="/")
  return traverse_util.unflatten_dict({p: state_lib.is_trainable(p, patterns) for p in flat}, sep="/")


def validate(config, env) -> None:
  """The groups keys of a run config, and each group's data as data in its own right;
  raises `ConfigError` (one line)."""
  try:
    check(config, set(catalog.default_data_config().keys()))
  except GroupError as e:
    raise ConfigError(str(e)) from None
  for name in names(config):
    try:
      (catalog.validate_data_config if env.files else catalog.check_values)(data_config(config, name))
    except ValueError as e:
      raise ConfigError(f"config.groups.{name}: {e}") from None


def check(config, known_data_keys) -> None:
  """Raises GroupError (one line) for a malformed group or schedule."""
  if not config.groups:
    if config.joint or config.group_schedule:
      raise GroupError("config.joint / config.group_schedule need config.groups (none are defined)")
    return
  for name, g in config.groups.items():
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
      raise GroupError(f"config.groups has a group named {name!r}; names are identifiers")
    if not isinstance(g, ml_collections.ConfigDict):
      raise GroupError(f"config.groups.{name}={g!r} must be a dict with keys {', '.join(GROUP_KEYS)}")
    bad = [k for k in g.keys() if k not in GROUP_KEYS]
    if bad:
      raise GroupError(f"config.groups.{name} has unknown key {bad[0]!r}; valid keys: {', '.join(GROUP_KEYS)}")
    if not isinstance(g.get("trainable"), (tuple, list)) or not g.trainable:
      raise GroupError(f"config.groups.{name}.trainable={g.get('trainable')!r} must be a non-empty tuple of regexes")
    for p in g.trainable:
      try:
        re.compile(p)
      except re.error as e:
        raise GroupError(f"config.groups.{name}.trainable has an invalid regex {p!r}: {e}") from None
    for key in g.get("data", {}).keys():
      if key not in known_data_keys:
        raise GroupError(f"config.groups.{name}.data.{key} is not a data key; valid: {', '.join(sorted(known_data_keys))}")
  parse_schedule(config.group_schedule, names(config))


class MultiIterator:
  """Batches of several Grain iterators in schedule order: `next()` returns (group, batch).

  Checkpointed like one Grain iterator (`get_state` / `set_state` / `start_prefetch`, what
  `grain.checkpoint.CheckpointSave` calls): the state is every member's state plus the
  step, so a restarted stage resumes each data set and the schedule exactly."""

  def __init__(self, iterators: dict, blocks, step: int = 0):
    self.iterators, self.blocks, self.step = dict(iterators), list(blocks), int(step)

  def __iter__(self):
    return self

  def __next__(self):
    name = group_at(self.blocks, self.step)
    batch = next(self.iterators[name])
    self.step += 1
    return name, batch

  def get_state(self) -> bytes:
    return json.dumps({"step": self.step, "iterators": {n: it.get_state() for n, it in self.iterators.items()}}).encode()

  def set_state(self, state: bytes) -> None:
    s = json.loads(state.decode() if isinstance(state, bytes) else state)
    self.step = int(s["step"])
    for n, it in self.iterators.items():
      it.set_state(s["iterators"][n])

  def start_prefetch(self) -> None:
    for it in self.iterators.values():
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()
