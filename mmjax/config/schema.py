"""The run-config schema: `base_config()` assembled from every owner's section, and `validate()`.

Every config file under `configs/` starts from `base_config()` and changes fields; no config
may add keys the schema lacks. Each key has one owner, a module with `config_dict()` (its
keys, with their defaults and a comment each) and `validate(config, env)` (its checks):

  mmjax.train.settings      seed, objective, lora, trainable, optimizer, batch and step counts,
                            evaluation, checkpoints, mesh and rules
  mmjax.families.decoder    model, init_from_hf             (the LLaMA-style decoder)
  mmjax.families.tower      vision, init_vision_from_hf     (the ViT tower)
  mmjax.families.*          the model families' own sections (vlm)
  mmjax.objectives.*        the objectives' own sections (dpo, visft)
  mmjax.data.catalog        data
  mmjax.train.groups        groups, group_schedule, joint   (directed fine-tuning)
  mmjax.recipes.stages      stage_order, stages, init_from_stage
  mmjax.recipes.pairs       distill_from_stage, distill_examples (rebirth)
  mmjax.recipes.select      select                          (error-driven data selection)
  mmjax.recipes.stop        stop                            (a recipe's stop rule for its rounds)
  mmjax.recipes.reuse       reuse_from                      (stages copied from another workdir)

`validate(config, n_devices, process_count, files)` runs before anything is compiled: the
schema (unknown keys, wrong types), then, for each stage of a recipe (or the config), the
objective and model family it names, and every owner's checks; the chosen objective's and
family's own checks run only for them. It raises `ConfigError` with one line naming the key,
the value and what would be valid.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from mmjax.config.core import ConfigError, Env, leaves, stage_config, type_ok
from mmjax.data import catalog
from mmjax.families import decoder, tower
from mmjax.families import registry as families
from mmjax.objectives import registry as objectives
from mmjax.recipes import registry as recipes
from mmjax.recipes import stages
from mmjax.train import groups, settings

# Whole sub-configs the schema does not describe key by key: a stage's keys are run-config
# keys (checked per stage), groups and the selection pool are checked by their owners.
_FREE = ("stages", "groups", "select.pool", "dpo.prompt_data", "distill_data", "visft.probe_sets")


def owners() -> tuple:
  """Every module that owns config keys, in the order their sections appear."""
  return (settings, decoder, tower, *families.modules(), *objectives.modules(), catalog, groups, stages,
          *recipes.OWNERS)


def base_config() -> ml_collections.ConfigDict:
  """Every key a run config may have, with its default (one comment per field in its owner)."""
  c = ml_collections.ConfigDict()
  for owner in owners():
    for key, value in owner.config_dict().items():
      if key in c:
        raise ValueError(f"config key {key!r} is claimed by two owners (the second: {owner.__name__})")
      c[key] = value
  return c


def check_schema(config, schema) -> None:
  """Unknown keys and wrong types, against `base_config()`."""
  known = dict(leaves(schema, skip=_FREE))
  for path, value in leaves(config, skip=_FREE):
    if path not in known:
      parent = path.rpartition(".")[0]
      siblings = sorted(p.rpartition(".")[2] for p in known if p.rpartition(".")[0] == parent)
      raise ConfigError(f"unknown config key {path!r}; valid keys{' under ' + repr(parent) if parent else ''}: "
                        f"{', '.join(siblings)}")
    want = known[path]
    if want is None or value is None:
      continue
    if not type_ok(want, value):
      raise ConfigError(f"config.{path}={value!r} has type {type(value).__name__}; "
                        f"expected {type(want).__name__} (like the default {want!r})")


def explain_override_error(argv) -> str | None:
  """Names the first `--config.KEY=...` override whose KEY the schema lacks, if any."""
  known = dict(leaves(base_config(), skip=_FREE))
  prefixes = {p.rsplit(".", 1)[0] for p in known if "." in p}
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0]
    if path.startswith("stages."):
      stage = path.split(".")[1]
      return (f"config key {path!r} does not exist: a stage override can only change keys the config file "
              f"sets for stage {stage!r}; set the key for every stage with --config.{'.'.join(path.split('.')[2:])} "
              f"or add it to config.stages.{stage} in the config file")
    if path not in known and path not in prefixes:
      parent = path.rpartition(".")[0]
      siblings = sorted({p[len(parent) + 1:].split(".")[0] if parent else p.split(".")[0]
                         for p in known if not parent or p.startswith(parent + ".")})
      return (f"unknown config key {path!r}; valid keys{' under ' + repr(parent) if parent else ''}: "
              f"{', '.join(siblings)}")
  return None


def validate(config, n_devices: int = 1, process_count: int = 1, files: bool = False) -> None:
  """Checks the config (and each stage's config) before any compile. `files`: also check
  that the files and directories the config names exist. Raises ConfigError (one line)."""
  env = Env(n_devices=n_devices, process_count=process_count, files=files)
  schema = base_config()
  check_schema(config, schema)
  if not config.stage_order:
    stages.validate_recipe(config)  # (a headroom check needs stages)
    validate_stage(config, env, schema)
    return
  missing = [n for n in config.stage_order if n not in config.stages]
  if missing:  # stages may define more than stage_order runs (e.g. to run a prefix)
    raise ConfigError(f"config.stage_order names {', '.join(map(repr, missing))}, which config.stages "
                      f"does not define; defined: {', '.join(config.stages) or 'none'}")
  stages.validate_recipe(config)
  for k, name in enumerate(config.stage_order):
    try:
      stage = stage_config(config, name)
    except (KeyError, AttributeError) as e:
      raise ConfigError(f"config.stages.{name} sets an unknown key {e}; stage keys are run-config keys") from None
    try:
      validate_stage(stage, dataclasses.replace(env, earlier_stages=tuple(config.stage_order[:k])), schema)
    except ConfigError as e:
      raise ConfigError(f"stage {name!r}: {e}") from None


def validate_stage(config, env: Env, schema=None) -> None:
  """The checks of one stage's (or a plain run's) config."""
  check_schema(config, schema if schema is not None else base_config())
  objective = objectives.get(config.objective)
  family = families.get(config.model.name)
  if family.NAME not in objective.FAMILIES:
    raise ConfigError(f"config.objective={config.objective!r} with config.model.name={config.model.name!r}: "
                      f"the {objective.NAME!r} objective and the {' or '.join(map(repr, objective.FAMILIES))} "
                      "model go together")
  settings.validate(config, env)
  objective.validate(config, env)
  family.validate(config, env)
  for owner in (decoder, tower, groups, stages, *recipes.OWNERS, catalog):
    owner.validate(config, env)
