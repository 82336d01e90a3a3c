"""The config core: the one error type, `get_config(arg)` parsing, the one derive helper and
the small checks every config owner uses. It imports nothing from mmjax, so any module may
import it (see `mmjax.config.schema` for the owners and how their sections are assembled).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterator

import ml_collections


class ConfigError(ValueError):
  """A bad config value; the message is one line naming the key, the value and what is valid."""


@dataclasses.dataclass(frozen=True)
class Env:
  """What checks may need besides the config: the devices and processes the run will use,
  (for a stage of a recipe) the names of the stages before it, and whether to check that
  the files and directories the config names exist."""
  n_devices: int = 1
  process_count: int = 1
  earlier_stages: tuple = ()
  files: bool = False


class Registry:
  """Component modules by their NAME (objectives, model families): the config key that names
  one, `get` (a ConfigError listing the valid names for an unknown one), `register` (at run
  time, e.g. a test's own component) and `unregister`."""

  def __init__(self, key: str, modules=()):
    self.key = key
    self._modules = {m.NAME: m for m in modules}

  def register(self, module) -> None:
    if module.NAME in self._modules and self._modules[module.NAME] is not module:
      raise ValueError(f"{self.key}: {module.NAME!r} is already registered")
    self._modules[module.NAME] = module

  def unregister(self, name: str) -> None:
    self._modules.pop(name, None)

  def names(self) -> tuple[str, ...]:
    return tuple(self._modules)

  def modules(self) -> tuple:
    return tuple(self._modules.values())

  def get(self, name: str):
    if name not in self._modules:
      raise ConfigError(f"config.{self.key}={name!r} is not valid; choose one of "
                        f"{', '.join(map(repr, self._modules))}")
    return self._modules[name]


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key2=value2' config args (big_vision style) over typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"config arg {key!r} is unknown; valid args: {', '.join(sorted(defaults))}")
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes", "")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(f"config arg {key}={value!r} is not a valid {kind.__name__}") from None
  return out


def apply_seed(config, seed: int):
  """A recipe's `seed` arg: the run seed (initialisation, dropout, data order) and the
  generated data sets (`data.split_seed`) both follow it. Returns `config`."""
  if seed < 0:
    raise ConfigError(f"config arg seed={seed} is not valid; expected an integer >= 0")
  config.seed = seed
  config.data.split_seed = seed
  return config


def leaves(cfg, prefix: str = "", skip=()) -> Iterator[tuple[str, object]]:
  """(dotted path, value) of every non-dict value of a ConfigDict (or dict), depth first;
  paths in `skip` are not descended into (nor yielded)."""
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if path in skip:
      continue
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, path + ".", skip)
    else:
      yield path, value


def get(cfg, path: str):
  """The value at dotted `path` of a config."""
  for k in path.split("."):
    cfg = cfg[k]
  return cfg


def derive(cfg, overrides=None, *, replace: tuple = (), **fields) -> ml_collections.ConfigDict:
  """A new ConfigDict: a deep copy of `cfg` with `overrides` applied, then `fields`.

  `overrides` is a (nested) ConfigDict / dict whose leaves set the same dotted paths of the
  copy, or a flat dict of dotted paths (a missing parent is a KeyError; a new leaf is added,
  for the schema check to name); `fields` set top-level keys. A top-level key named in `replace` is taken
  from `overrides` as a whole instead of leaf by leaf (a stage's `groups`)."""
  out = ml_collections.ConfigDict(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
  overrides = overrides if overrides is not None else {}
  items = overrides.items() if not hasattr(overrides, "to_dict") else overrides.to_dict().items()
  for key in replace:
    if key in overrides:
      value = overrides[key]
      out[key] = ml_collections.ConfigDict(value.to_dict() if hasattr(value, "to_dict") else dict(value))
  for path, value in leaves(dict(items), skip=replace):
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  for key, value in fields.items():
    out[key] = value
  return out


INIT_STAGE = "init"  # init_from_stage: the recipe's starting model (the HF import or the seeded init), no stage


def stage_config(config, name: str) -> ml_collections.ConfigDict:
  """The run config of stage `name` of a recipe: the top-level config with the stage's keys
  applied (its `groups`, if any, replace the config's as a whole), without the stage list."""
  return derive(config, config.stages[name], replace=("groups",), stages=ml_collections.ConfigDict(),
                stage_order=())


def check_regex(key: str, pattern) -> None:
  try:
    re.compile(pattern)
  except (re.error, TypeError) as e:
    raise ConfigError(f"config.{key}={pattern!r} is not a valid regex ({e})") from None


def check_choice(key: str, value, options) -> None:
  if value not in options:
    raise ConfigError(f"config.{key}={value!r} is not valid; choose one of {', '.join(map(repr, options))}")


def check_positive(config, *paths: str) -> None:
  for path in paths:
    value = get(config, path)
    if not value > 0:
      raise ConfigError(f"config.{path}={value!r} must be > 0")


def check_at_least(config, minimum, *paths: str) -> None:
  for path in paths:
    value = get(config, path)
    if not value >= minimum:
      raise ConfigError(f"config.{path}={value!r} must be >= {minimum}")


def type_ok(want, value) -> bool:
  """Whether `value` may replace a default `want` (bools stay bools, ints may not be floats)."""
  if isinstance(want, bool):
    return isinstance(value, bool)
  if isinstance(want, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(want, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(want, str):
    return isinstance(value, str)
  if isinstance(want, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True
