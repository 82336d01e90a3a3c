"""Recipes as stage lists: each stage is a run of the one loop with its own overrides.

`config.stage_order` names the stages; `config.stages.NAME` holds the keys that stage
changes (objective, data, steps, trainable, lora, optimizer, ...). A stage starts from
the previous stage's result — its params with its adapter merged in — or from the stage
named in its `init_from_stage` (with `continue_adapter`, that stage's params and adapter
unmerged, saved as its `final_adapter/`: one adapter trained on across stages); the first
stage starts from the model family's Hugging Face import (`init_from_hf`,
`init_vision_from_hf`) or a seeded random init, and so does a stage with
`init_from_stage='init'` (e.g. rebirth SFT of the model a recipe started from). Before it
trains, a stage prepares the data files its kinds ask for (online DPO pairs, rebirth answers, a data
selection: `mmjax.recipes.kinds`). Stage NAME works in `WORKDIR/stages/NAME/`; when it
finishes it writes its merged params to `final/` and its eval metrics to `done.json`, so a
restarted recipe skips finished stages and resumes the current one at its last checkpoint.
A finished recipe prints a table of every stage's held-out metrics and writes it to
`results.txt`, the metrics to `results.json` and the loss curves to `loss_curves.png`
(`mmjax.recipes.results`). The last stage's model is exported by its family before that stage's
`done.json` is written, each output directory atomically, so a kill at any point leaves nothing
half-written and the rerun of the same command completes what is missing.

With `config.stop` (`mmjax.recipes.stop`), a round whose validation metric degrades is
rejected and ends the rounds: from then on the model it started from stands for it and for
the later rounds, which are not trained.

Stages that start from the same stage and evaluate alike (`eval_key`: same eval data,
generation settings and model) start from the same params, so the first one's step-0
evaluation is reused by the others instead of being computed again (a recipe's arms).

With `config.reuse_from` (`mmjax.recipes.reuse`), a stage another workdir finished with the
same stage config is copied in instead of trained.

With no stages, the config itself is the only stage and works in WORKDIR.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from mmjax import sharding
from mmjax.config.core import INIT_STAGE, ConfigError, stage_config
from mmjax.data.tokenizer import load_tokenizer
from mmjax.files import atomic_write
from mmjax.recipes import kinds, registry, results as results_lib
from mmjax.recipes import reuse as reuse_lib
from mmjax.recipes import stop as stop_lib
from mmjax.train import loop
from mmjax.train import run as run_lib
from mmjax.train import state as state_lib



def config_dict() -> dict:
  return dict(
      # Recipes: stage_order names the stages; stages.NAME holds the keys that stage changes.
      # Empty = the config itself is the only stage.
      stage_order=(),
      stages=ml_collections.ConfigDict(),
      init_from_stage="",  # start from this earlier stage's result instead of the previous one; 'init' = the
      #                      recipe's starting model (the Hugging Face import or the seeded random init)
      continue_adapter=False,  # start from that stage's params and its adapter, not merged: one adapter trained
      #                          on across stages (fresh optimizer moments; same lora settings needed)
      # A recipe's validity check, printed under its table: the ceiling stage's `metric` minus the
      # floor stage's (eval after training); below `min` the experiment is marked INVALID (no room
      # for the compared methods to differ). metric '' = no check.
      # lower_is_better: the metric is an error rate, the headroom is floor's minus ceiling's.
      headroom=ml_collections.ConfigDict(dict(metric="", floor="", ceiling="", min=0.15, lower_is_better=False)),
  )


def validate_recipe(config) -> None:
  """Checks of the whole recipe (before its stages are checked one by one)."""
  stop_lib.validate_recipe(config, continued(config))
  h = config.headroom
  if h.metric:
    for key in ("floor", "ceiling"):
      if h[key] not in config.stage_order:
        raise ConfigError(f"config.headroom.{key}={h[key]!r} names no stage of the recipe; stages: "
                          f"{', '.join(config.stage_order) or 'none'}")


def validate(config, env) -> None:
  if config.init_from_stage not in ("", INIT_STAGE) + tuple(env.earlier_stages):
    raise ConfigError(f"config.init_from_stage={config.init_from_stage!r} names no earlier stage; "
                      f"earlier stages: {', '.join(env.earlier_stages) or 'none'} "
                      f"(or {INIT_STAGE!r}, the starting model)")
  if config.continue_adapter and (not config.lora.targets or config.init_from_stage == INIT_STAGE
                                  or not env.earlier_stages):
    raise ConfigError("config.continue_adapter=True continues an earlier stage's adapter: it needs config.lora.targets "
                      "and a start from an earlier stage of the recipe (not the first stage, not init_from_stage='init')")


def continued(config) -> set:
  """The stages whose adapter a later stage continues (`continue_adapter`); a ConfigError when
  such a stage trains no adapter."""
  out, prev, cfgs = set(), None, {}
  for name in config.stage_order:
    try:
      cfgs[name] = cfg = stage_config(config, name)
    except (KeyError, AttributeError):  # an unknown stage key: the stage's own check names it
      prev = name
      continue
    start = cfg.init_from_stage or prev
    if cfg.continue_adapter and start in cfgs and not cfgs[start].lora.targets:
      raise ConfigError(f"stage {name!r}: config.continue_adapter=True, but stage {start!r} trains no adapter "
                        "(its lora.targets is empty)")
    if cfg.continue_adapter:
      out.add(start)
    prev = name
  return out


def abstract_adapter(run) -> dict:
  """{'params', 'lora'} of ShapeDtypeStructs with shardings: a stage's unmerged result."""
  variables = state_lib.merge_trees(run.abstract_state.trainable, run.abstract_state.frozen)
  return {"params": run.abstract_params, "lora": variables["lora"]}


# What only training reads: the rest of a stage's config (new keys included) shapes its evaluation.
TRAIN_ONLY = ("steps", "optimizer", "lora", "trainable", "groups", "group_schedule", "joint", "select", "batch_size",
              "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every", "eval_at_start",
              "stage_order", "stages", "init_from_stage", "headroom", "stop")
TRAIN_ONLY_DATA = ("num_train_examples", "train_path", "train_split", "indices_path", "responses_path", "shuffle",
                   "worker_count")


def eval_key(start: str, config) -> str:
  """What a stage's step-0 evaluation depends on: the stage it starts from and every setting
  but those only its training reads (`TRAIN_ONLY`; the LoRA settings too, as a fresh
  adapter adds exactly zero)."""
  plain = lambda v: v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
  sections = {k: plain(v) for k, v in config.items() if k not in TRAIN_ONLY}
  sections["data"] = {k: v for k, v in sections["data"].items() if k not in TRAIN_ONLY_DATA}
  return json.dumps([start, sections], sort_keys=True, default=str)


def save_params(path: str, params) -> None:
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), params, force=True)
  ckptr.wait_until_finished()


def restore_tree(path: str, abstract):
  """A tree saved by `save_params`, placed like `abstract` (ShapeDtypeStructs with shardings)."""
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), abstract)


def restore_params(path: str, run) -> dict:
  """A finished stage's `final/` params, placed like `run.abstract_params`."""
  return restore_tree(path, run.abstract_params)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs every stage in order (or the config as one stage). Returns {stage: summary}."""
  mesh = sharding.make_mesh(config.mesh)
  recipe = bool(config.stage_order)
  names = tuple(config.stage_order) or ("main",)
  results, finals, start_evals = {}, {}, {}  # start_evals: eval_key -> a step-0 evaluation
  keep_adapter = continued(config) if recipe else set()
  adapters = {}  # stage -> {'params', 'lora'} unmerged, for the stages a later stage continues
  rule = stop_lib.Rule.of(config)  # the recipe's stop rule for its rounds (config.stop), if any
  reuse = reuse_lib.Reuse(config, workdir) if recipe else None  # stages finished in config.reuse_from

  def watch(name, cfg, run, tokenizer, start_from, value=None) -> float | None:
    """The stop rule's validation value of a finished stage it watches (scored when not given);
    a round it rejects stands for the model it started from from here on."""
    if rule is None or not rule.watches(name):
      return None
    if value is None:
      with jax.set_mesh(mesh):
        value = rule.score(cfg, run, finals[name], tokenizer)
    rule.record(name, value, str(start_from))
    return value

  prev = None
  for name in names:
    cfg = stage_config(config, name) if recipe else config
    sdir = os.path.join(workdir, "stages", name) if recipe else workdir
    label = name if recipe else ""
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    stage_kinds = registry.kinds_for(cfg)
    cfg = kinds.configure(stage_kinds, cfg, sdir)
    run = run_lib.build(cfg, mesh, tokenizer)
    if rule is not None and rule.skips(name):  # a round after the one that ended the rounds: not trained
      kept = rule.kept(name)
      finals[name] = finals[kept]
      results[name] = {"eval_before": None, "eval_after": dict(results[kept].get("eval_after") or {}),
                       "skipped_for": kept}
      if name == names[-1]:
        run.family.export(workdir, cfg, run, {"params": finals[name]})
      prev = name
      continue
    done = os.path.join(sdir, "done.json")
    if reuse is not None:
      reuse.bring(config, name, prev, sdir, stage_kinds)
    start_from = cfg.init_from_stage or prev
    key = eval_key(str(start_from), cfg)
    if os.path.exists(done):  # finished before a restart: load its result, don't retrain
      finals[name] = restore_params(os.path.join(sdir, "final"), run)
      if name in keep_adapter:
        adapters[name] = restore_tree(os.path.join(sdir, "final_adapter"), abstract_adapter(run))
      with open(done) as f:
        results[name] = json.load(f)
      if results[name].get("eval_before"):
        start_evals.setdefault(key, results[name]["eval_before"])
      results[name]["validation"] = watch(name, cfg, run, tokenizer, start_from, results[name].get("validation"))
      if rule is not None and rule.kept(name):
        finals[name] = finals[rule.kept(name)]
      prev = name
      continue
    adapter = None
    if cfg.continue_adapter:  # the earlier stage's unmerged params, and its adapter trained on
      base, adapter = adapters[start_from]["params"], adapters[start_from]["lora"]
    elif start_from in (None, INIT_STAGE):
      base = run.family.import_hf(cfg, run)
    else:
      with jax.set_mesh(mesh):
        base = run.family.start_from(cfg, run, finals[start_from])
    ctx = kinds.StageContext(label, cfg, sdir, run, tokenizer, mesh, base, finals, adapter)
    with jax.set_mesh(mesh):
      prepared = kinds.prepare(stage_kinds, ctx)
    del ctx  # its starting variables are rebuilt by the loop
    summary = loop.train_stage(cfg, sdir, mesh, tokenizer, base, label, run=run, prepared=prepared,
                               eval_before=start_evals.get(key) if recipe else None, adapter=adapter)
    results[name] = summary
    if summary.get("eval_before") and summary["start_step"] == 0:
      start_evals.setdefault(key, summary["eval_before"])
    if summary["preempted"]:
      break
    variables = summary["state"].variables
    if recipe:
      with jax.set_mesh(mesh):
        finals[name] = summary["run"].merged_params(summary["state"])
      save_params(os.path.join(sdir, "final"), finals[name])
      if name in keep_adapter:
        adapters[name] = {"params": variables["params"], "lora": variables["lora"]}
        save_params(os.path.join(sdir, "final_adapter"), adapters[name])
      summary["validation"] = watch(name, cfg, run, tokenizer, start_from)
      if rule is not None and rule.kept(name):  # a rejected round: the model it started from stands for it
        finals[name] = finals[rule.kept(name)]
        variables = {"params": finals[name]}
    if name == names[-1]:  # the model, before done.json: a rerun after a kill here exports it again
      run.family.export(workdir, cfg, run, variables)
    if recipe and jax.process_index() == 0:
      atomic_write(done, json.dumps({k: summary.get(k) for k in ("eval_before", "eval_after", "validation")}))
    prev = name
  finished = not any(isinstance(r, dict) and r.get("preempted") for r in results.values())
  if finished and jax.process_index() == 0:
    stage_dirs = [(n, os.path.join(workdir, "stages", n) if recipe else workdir) for n in results]
    results_lib.write(workdir, results, stage_dirs, recipe, check_cfg=config.headroom,
                      stop=rule.summary() if rule is not None else None)
  return results
