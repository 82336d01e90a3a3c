"""Run assembly: everything a stage needs to step its model, built once from a config and a mesh.

`build(config, mesh, tokenizer)` asks the model family (`config.model.name`) for the model
and the objective (`config.objective`) for its loss, batch fields and state; derives every
sharding from `jax.eval_shape` of init and the logical-axis rules; and jits the train step
(one per group of a directed fine-tuning stage), the eval step, the init functions and the
adapter merge. It touches no data and no disk.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from mmjax import lora as lora_lib
from mmjax import sharding
from mmjax.config.core import ConfigError
from mmjax.families import registry as families
from mmjax.objectives import registry as objectives
from mmjax.train import groups as groups_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib


@dataclasses.dataclass
class Run:
  """Everything needed to step a model, built from a config and a mesh."""
  config: Any
  mesh: Any
  rules: tuple
  family: Any  # the model family (`mmjax.families.base.Family`)
  model_cfg: Any
  model: nn.Module
  objective: Any  # `mmjax.objectives.base.Objective`
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Any  # jitted rng -> TrainState, created directly in its shardings
  abstract_state: Any  # TrainState of ShapeDtypeStructs with shardings
  state_shardings: Any
  batch_sharding: NamedSharding
  train_step: Any  # jitted (state, batch, rng) -> (state, metrics)
  eval_step: Any  # jitted (state, batch) -> metric sums
  flops_per_token: float  # analytic training FLOPs per token of the language model
  flops_per_example: float  # analytic training FLOPs of the vision tower per example (0 for text)
  init_from_params: Any  # jitted (rng, params) -> TrainState: given base params, fresh adapter
  merged_params: Any  # jitted state -> params with the adapter merged in
  abstract_params: Any  # params tree of ShapeDtypeStructs with shardings
  visual_tokens: dict | None  # placeholders per 'image' / 'video' for the data pipeline (VLM)
  group_steps: dict  # directed fine-tuning: group -> (objective, jitted train step of its leaves)
  init_from_adapter: Any  # jitted (rng, params, lora) -> TrainState: given base params and adapter (continued)
  cache: dict = dataclasses.field(default_factory=dict)  # components' compiled helpers, built on first use

  @property
  def steps(self) -> dict:
    """{group: (objective, jitted train step)}: the groups of a directed stage, else {'': the run's}."""
    return self.group_steps or {"": (self.objective, self.train_step)}

  def global_batch(self, local: dict, objective=None) -> dict:
    """Places this process's rows of a batch as one global array per field (the fields of
    `objective`, default the run's)."""
    out = {}
    for k in (objective or self.objective).batch_fields:
      x = np.asarray(local[k])
      sh = self.batch_sharding if x.ndim == 2 else sharding.batch_sharding(self.mesh, self.rules, x.ndim)
      out[k] = jax.make_array_from_process_local_data(sh, x)
    return out

  def flops_per_step(self) -> float:
    return self.objective.flops_per_step(self.config, self.flops_per_token, self.flops_per_example)

  def random_params(self, rng) -> dict:
    """The model's seeded random params, created directly in their shardings (call under
    `jax.set_mesh(run.mesh)`)."""
    dummy = self.objective.init_args(self.config)
    init = sharding.in_context(lambda r: nn.meta.unbox(self.model.init(r, *dummy)["params"]), self.mesh, self.rules)
    return jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, self.abstract_params))(rng)


def init_variables(rng, model, dummy, lora_cfg, params=None, lora=None) -> dict:
  """Base params (given, or random from `model.init(rng, *dummy)`) and, when
  `lora_cfg.targets` is set, the given adapter `lora` or a fresh one."""
  p_rng, l_rng = jax.random.split(rng)
  if params is None:
    params = nn.meta.unbox(model.init(p_rng, *dummy)["params"])
  variables = {"params": params}
  dtype = jnp.dtype(lora_cfg.dtype) if lora_cfg.get("dtype") else None
  if lora_cfg.targets and lora is not None:
    fresh = jax.eval_shape(lambda: lora_lib.init(l_rng, params, lora_cfg.targets, lora_cfg.rank, dtype=dtype))
    if jax.tree.structure(fresh) != jax.tree.structure(lora) or any(
        a.shape != b.shape for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(lora))):
      raise ValueError(f"the continued adapter does not fit config.lora (targets={lora_cfg.targets!r}, "
                       f"rank={lora_cfg.rank}); continue_adapter needs the same lora settings as the stage it continues")
    variables["lora"] = jax.tree.map(lambda a, f: a.astype(f.dtype), lora, fresh)
  elif lora_cfg.targets:
    variables["lora"] = lora_lib.init(l_rng, params, lora_cfg.targets, lora_cfg.rank, dtype=dtype)
  return variables


def make_objective(config, model, family):
  """The objective of `config` for `model`, fed the pixel fields the family's batches carry."""
  return objectives.get(config.objective).OBJECTIVE.from_config(config, model, family.media_fields(config))


def build(config, mesh, tokenizer) -> Run:
  """Everything to step the model of `config` on `mesh`; `tokenizer` gives the vocabulary
  size (when `model.vocab_size == -1`) and the VLM's image placeholder id. A plain int is
  taken as the vocabulary size of a text-only model."""
  if isinstance(tokenizer, int):
    tokenizer = types.SimpleNamespace(vocab_size=tokenizer, image_id=None)
  rules = sharding.rules_from_config(config.rules)
  family = families.get(config.model.name).FAMILY
  model, model_cfg, visual_tokens = family.build(config, tokenizer)
  objective = make_objective(config, model, family)
  dummy = objective.init_args(config)
  boxed = jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.key(0), *dummy)
  param_names, abstract_params = sharding.logical_axes_tree(boxed["params"]), nn.meta.unbox(boxed["params"])
  check_targets(config, abstract_params)

  tx, schedule = state_lib.make_optimizer(config.optimizer, config.steps)
  patterns = groups_lib.trainable_patterns(config)

  def make_state(rng, params=None, lora=None):
    variables = init_variables(rng, model, dummy, config.lora, params, lora)
    return state_lib.create_state(variables, patterns, tx, objective.init_aux(variables))

  def final_params(state):
    """The stage's result as plain params: the adapter (if any) merged into the base."""
    variables = state.variables
    if "lora" not in variables:
      return variables["params"]
    return lora_lib.merge(variables["params"], variables["lora"], config.lora.alpha, config.lora.rslora)

  shapes = jax.eval_shape(make_state, jax.random.key(0))
  names = {"params": param_names}
  if config.lora.targets:
    flat_names = traverse_util.flatten_dict(param_names, sep="/", is_leaf=lambda _, x: isinstance(x, tuple))
    variables_shape = state_lib.merge_trees(shapes.trainable, shapes.frozen)
    names["lora"] = lora_lib.logical_axes(flat_names, variables_shape["lora"])
  train_names, frozen_names = _split_names(names, patterns)
  repl = NamedSharding(mesh, P())
  train_sh = sharding.tree_shardings(shapes.trainable, train_names, mesh, rules)
  frozen_sh = sharding.tree_shardings(shapes.frozen, frozen_names, mesh, rules)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, shapes.opt_state, train_sh,
                                 transform_non_params=lambda _: repl)
  aux_sh = sharding.tree_shardings(shapes.aux, objective.aux_names(param_names), mesh, rules)
  state_sh = state_lib.TrainState(step=repl, trainable=train_sh, frozen=frozen_sh, opt_state=opt_sh, aux=aux_sh)
  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, state_sh)
  batch_sh = sharding.batch_sharding(mesh, rules)

  in_ctx = functools.partial(sharding.in_context, mesh=mesh, rules=rules)
  params_sh = sharding.tree_shardings(abstract_params, param_names, mesh, rules)
  init_state = jax.jit(in_ctx(make_state), out_shardings=state_sh)
  init_from_params = jax.jit(in_ctx(make_state), in_shardings=(repl, params_sh), out_shardings=state_sh)
  merged_params = jax.jit(in_ctx(final_params), in_shardings=(state_sh,), out_shardings=params_sh)
  init_from_adapter = jax.jit(in_ctx(make_state), out_shardings=state_sh)
  abstract_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                 abstract_params, params_sh)

  def jit_train_step(obj, update_mask=None):
    fn = functools.partial(step_lib.train_step, objective=obj, tx=tx, accum_steps=config.grad_accum,
                           update_mask=update_mask)
    return jax.jit(in_ctx(fn), in_shardings=(state_sh, batch_sh, repl), out_shardings=(state_sh, repl),
                   donate_argnums=0)

  train_step = jit_train_step(objective)
  group_steps = {}
  for g in groups_lib.names(config):  # directed fine-tuning: one step per group, its data and leaves
    gcfg = groups_lib.group_config(config, g)
    mask = None if config.joint else groups_lib.update_mask(shapes.trainable, gcfg.trainable)
    gobj = make_objective(gcfg, model, family)
    group_steps[g] = (gobj, jit_train_step(gobj, mask))
  eval_step = jax.jit(in_ctx(functools.partial(step_lib.eval_step, objective=objective)),
                      in_shardings=(state_sh, batch_sh), out_shardings=repl)
  flops, flops_ex = family.flops(model_cfg, config, abstract_params, patterns, visual_tokens)
  return Run(config, mesh, rules, family, model_cfg, model, objective, tx, schedule, init_state, abstract_state,
             state_sh, batch_sh, train_step, eval_step, flops, flops_ex, init_from_params, merged_params,
             abstract_params, visual_tokens, group_steps, init_from_adapter)


def _split_names(names, patterns):
  flat = traverse_util.flatten_dict(names, sep="/", is_leaf=lambda _, x: isinstance(x, tuple) or x is None)
  train = {p: v for p, v in flat.items() if state_lib.is_trainable(p, patterns)}
  frozen = {p: v for p, v in flat.items() if not state_lib.is_trainable(p, patterns)}
  return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def check_targets(config, abstract_params) -> None:
  """LoRA targets and trainable regexes must each match something (ConfigError otherwise)."""
  if config.lora.targets:
    if not lora_lib.target_paths(abstract_params, config.lora.targets):
      modules = sorted({p.rsplit("/", 1)[0] for p in traverse_util.flatten_dict(abstract_params, sep="/")
                        if p.endswith("/kernel")})
      examples = ", ".join(modules[:6])
      raise ConfigError(f"config.lora.targets={config.lora.targets!r} matches no module; module paths look like: {examples}")
  paths = ["params/" + p for p in traverse_util.flatten_dict(abstract_params, sep="/")]
  if config.lora.targets:
    paths += ["lora/" + m + "/" + x for m in lora_lib.target_paths(abstract_params, config.lora.targets) for x in "ab"]
  owners = [("config.trainable", config.trainable)] if not config.groups else \
      [(f"config.groups.{n}.trainable", g.trainable) for n, g in config.groups.items()]
  for owner, patterns in owners:
    for pattern in patterns:
      if not any(state_lib.is_trainable(p, [pattern]) for p in paths):
        raise ConfigError(f"{owner} entry {pattern!r} matches no variable; paths look like: "
                          f"{', '.join(paths[:3])}, ..., {paths[-1]}")
