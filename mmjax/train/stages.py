"""Recipes as stage lists: each stage is a run of the one loop with its own overrides.

`config.stage_order` names the stages; `config.stages.NAME` holds the keys that stage
changes (objective, data, steps, trainable, lora, optimizer, ...). A stage starts from
the previous stage's result — its params with its adapter merged in — or from the stage
named in its `init_from_stage`; the first stage starts from `init_from_hf` or a seeded
random init. Stage NAME works in `WORKDIR/stages/NAME/`; when it finishes it writes its
merged params to `final/` and its eval metrics to `done.json`, so a restarted recipe skips
finished stages and resumes the current one at its last checkpoint. A finished recipe
prints a table of every stage's held-out metrics and writes it to `results.txt`, the
metrics to `results.json` and the loss curves to `loss_curves.png`.

With no stages, the config itself is the only stage and works in WORKDIR.
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from mmjax.train import loop, plots


def stage_config(config, name: str) -> ml_collections.ConfigDict:
  """The run config of stage `name`: the top-level config with the stage's keys applied."""
  out = ml_collections.ConfigDict(config.to_dict())
  overrides = config.stages[name]
  if "groups" in overrides:  # a stage's groups replace the config's as a whole
    out.groups = ml_collections.ConfigDict(overrides.groups.to_dict())
  for path, value in _leaves(overrides):
    if path.startswith("groups."):
      continue
    node = out
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  out.stages = ml_collections.ConfigDict()
  out.stage_order = ()
  return out


def _leaves(cfg, prefix=""):
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _import_hf(config, run):
  """Base params of a first stage with `init_from_hf` (the language model) and/or
  `init_vision_from_hf` (the vision tower of a VLM or ViSFT model); parts not imported
  (projector, heads) keep their seeded random init."""
  from mmjax.convert import llama as convert_llama
  from mmjax.convert import vision as convert_vision
  if config.model.name == "llama":
    _, params = convert_llama.import_hf(config.init_from_hf, mesh=run.mesh, rules=run.rules,
                                        dtype=config.model.param_dtype)
    return params
  with jax.set_mesh(run.mesh):
    params = dict(loop.random_params(run, jax.random.key(config.seed)))
  if config.init_from_hf:
    _, params["llm"] = convert_llama.import_hf(config.init_from_hf, mesh=run.mesh, rules=run.rules,
                                               dtype=config.model.param_dtype)
  if config.init_vision_from_hf:
    _, params["vision"] = convert_vision.import_hf_vision(config.init_vision_from_hf, mesh=run.mesh, rules=run.rules,
                                                          dtype=config.vision.param_dtype)
  want = jax.tree.map(lambda x: (x.shape, x.dtype), run.abstract_params)
  got = jax.tree.map(lambda x: (x.shape, x.dtype), params)
  if want != got:
    raise ValueError("imported Hugging Face weights do not fit the model the config builds "
                     "(check config.vision / config.model dtypes against the checkpoint)")
  return params


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs every stage in order (or the config as one stage). Returns {stage: summary}."""
  from mmjax import sharding
  from mmjax.data.tokenizer import load_tokenizer

  mesh = sharding.make_mesh(config.mesh)
  names = tuple(config.stage_order) or ("main",)
  results, finals = {}, {}
  prev = None
  for name in names:
    cfg = stage_config(config, name) if config.stage_order else config
    sdir = os.path.join(workdir, "stages", name) if config.stage_order else workdir
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    start_from = cfg.init_from_stage or prev
    base = None
    if start_from is not None:
      base = finals.get(start_from)
      if base is None:
        raise ValueError(f"config.stages.{name}.init_from_stage={start_from!r} names no earlier stage; "
                         f"earlier stages: {', '.join(finals) or 'none'}")
    elif cfg.init_from_hf or cfg.init_vision_from_hf:
      base = "hf"
    done = os.path.join(sdir, "done.json")
    if os.path.exists(done):  # finished before a restart: load its result, don't retrain
      run = loop.build(cfg, mesh, tokenizer)
      finals[name] = _restore_params(os.path.join(sdir, "final"), run)
      results[name] = json.load(open(done))
      prev = name
      continue
    run = loop.build(cfg, mesh, tokenizer)
    base_params = _import_hf(cfg, run) if base == "hf" else base
    if cfg.distill_from_stage:  # rebirth: SFT on an earlier stage's own answers, generated once
      cfg = _with_distill_data(cfg, sdir, run, finals, name, tokenizer, mesh)
    if cfg.select.method:  # error-driven selection: train on pool records chosen once, before training
      from mmjax.select import recipe as select_recipe
      os.makedirs(sdir, exist_ok=True)
      with jax.set_mesh(mesh):
        params = base_params if base_params is not None else loop.random_params(run, jax.random.key(cfg.seed))
        path = select_recipe.select_for_stage(cfg, sdir, run, params, tokenizer, finals,
                                              log=lambda m: print(f"[{name}] {m}", flush=True))
      cfg = select_recipe.with_selection(cfg, path)
    summary = loop.train_stage(cfg, sdir, mesh, tokenizer, base_params,
                               label=name if config.stage_order else "")
    results[name] = summary
    if summary["preempted"]:
      break
    if config.stage_order:
      with jax.set_mesh(mesh):
        finals[name] = summary["run"].merged_params(summary["state"])
      _save_params(os.path.join(sdir, "final"), finals[name])
      if jax.process_index() == 0:
        with open(done, "w") as f:
          json.dump({k: summary.get(k) for k in ("eval_before", "eval_after")}, f)
    prev = name
  finished = not any(isinstance(r, dict) and r.get("preempted") for r in results.values())
  last = results.get(names[-1]) if finished else None
  if last is not None and "state" in last:
    _write_model_dir(os.path.join(workdir, "model"), cfg, last["run"], last["state"])
  if finished and jax.process_index() == 0:
    stage_dirs = [(n, os.path.join(workdir, "stages", n) if config.stage_order else workdir) for n in results]
    png = plots.loss_curves(workdir, stage_dirs)
    if config.stage_order:
      for n, sdir in stage_dirs:  # a DPO round's first-step loss: log 2 for sigmoid (policy = reference)
        first = _first_step(sdir)
        if "dpo_loss" in first and isinstance(results[n], dict):
          results[n]["first_dpo_loss"] = first["dpo_loss"]
      table = _table(results)
      print(table, flush=True)
      with open(os.path.join(workdir, "results.txt"), "w") as f:  # the table as printed
        f.write(table + "\n")
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump({n: {k: r.get(k) for k in ("eval_before", "eval_after", "first_dpo_loss")} for n, r in results.items()},
                  f, indent=1)
    print(f"loss curves: {png}", flush=True)
  return results


def _write_vision_dirs(workdir, cfg, run, state):
  """A ViSFT run's tower, adapter merged: WORKDIR/vision (an mmjax vision directory, see
  `mmjax.convert.vision`) and, when the tower came from a Hugging Face CLIP / SigLIP
  directory, WORKDIR/vision_hf in that family's format."""
  from mmjax import lora as lora_lib
  from mmjax.convert import llama as convert_llama
  from mmjax.convert import vision as convert_vision
  path = os.path.join(workdir, "vision")
  if os.path.exists(os.path.join(path, "params")):
    return  # a finished run re-started keeps its first export
  variables = state.variables
  params = variables["params"]["vision"]
  if "lora" in variables and "vision" in variables["lora"]:
    params = lora_lib.merge(params, variables["lora"]["vision"], cfg.lora.alpha, cfg.lora.rslora)
  vcfg = run.model_cfg.vision
  hf, arch = None, None
  if cfg.init_vision_from_hf:
    hf = convert_llama.read_json(cfg.init_vision_from_hf, "config.json")
    arch = convert_vision.architecture_of(hf)
  convert_vision.save_dir(path, vcfg, params, hf_architecture=arch, hf_config=hf)
  if arch is not None:
    out = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel"}[convert_vision.ARCHITECTURES[arch][0]]
    convert_vision.export_hf_vision(os.path.join(workdir, "vision_hf"), vcfg, params, architecture=out,
                                    dtype=vcfg.param_dtype)


def _write_model_dir(path, cfg, run, state):
  """The final model as an mmjax model directory (base params + adapter) that
  `tools/convert_hf.py export --ckpt PATH` turns into a Hugging Face directory."""
  from mmjax.models.llama import LlamaConfig
  if cfg.model.name == "visft":
    return _write_vision_dirs(os.path.dirname(path), cfg, run, state)
  if not isinstance(run.model_cfg, LlamaConfig) or os.path.exists(os.path.join(path, "params")):
    return  # VLMs have no HF export yet; a finished run re-started keeps its first export
  from mmjax.convert import model_dir
  variables = state.variables
  arch = None
  if cfg.init_from_hf:
    from mmjax.convert import llama as convert_llama
    arch = convert_llama.architecture_of(convert_llama.read_json(cfg.init_from_hf, "config.json"))
  model_dir.save(path, run.model_cfg, variables["params"], variables.get("lora"), hf_architecture=arch,
                 hf_dir=cfg.init_from_hf or None)


def _with_distill_data(cfg, sdir, run, finals, name, tokenizer, mesh):
  from mmjax.train import dpo
  src = cfg.distill_from_stage
  if src not in finals:
    raise ValueError(f"config.stages.{name}.distill_from_stage={src!r} names no earlier stage; "
                     f"earlier stages: {', '.join(finals) or 'none'}")
  with jax.set_mesh(mesh):
    path = dpo.distill_records(cfg, run, finals[src], tokenizer, sdir, name)
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.data.responses_path = path
  return cfg


def _first_step(sdir: str) -> dict:
  """The step-1 train metrics of a stage (from its metrics.jsonl), or {}."""
  rows = plots._rows(os.path.join(sdir, "metrics.jsonl"))
  return next((r for r in rows if r["split"] == "train" and r["step"] == 1), {})


def _save_params(path, params):
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(path), params, force=True)
  ckptr.wait_until_finished()


def _restore_params(path, run):
  return ocp.StandardCheckpointer().restore(os.path.abspath(path), run.abstract_params)


def _agree(a: dict, b: dict) -> bool:
  """Two metric dicts share keys and agree on all of them (a DPO round scores fewer keys)."""
  common = set(a) & set(b)
  return bool(common) and all(a[k] == b[k] for k in common)


def _table(results: dict) -> str:
  """Each stage's eval after training; a `NAME @start` row before a stage whose starting
  metrics are in no row above (a new eval task, e.g. the base model a comparison starts from)."""
  keys = []
  for r in results.values():
    for k in (r.get("eval_after") or {}):
      if k not in keys:
        keys.append(k)
  w = max([14] + [len(k) + 2 for k in keys])
  first = any("first_dpo_loss" in r for r in results.values())
  rows = [f"{'stage':<16}" + "".join(f"{k:>{w}}" for k in keys) + (f"{'first_dpo_loss':>{w}}" if first else "")]
  row = lambda label, ev, extra="": rows.append(f"{label:<16}" + "".join(f"{ev.get(k, float('nan')):>{w}.4f}"
                                                                       for k in keys) + extra)
  shown = []
  for name, r in results.items():
    before = r.get("eval_before") or {}
    if shown and before and not any(_agree(before, x) for x in shown):  # a new eval task or starting point
      row(f"{name} @start", before, f"{'':>{w}}" if first else "")
      shown.append(before)
    ev = r.get("eval_after") or {}
    row(name, ev, f"{r.get('first_dpo_loss', float('nan')):>{w}.4f}" if first else "")
    shown.append(ev)
  return "\n".join(rows)
