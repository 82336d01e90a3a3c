"""The one training loop: init or restore, data, jitted step, eval, log, checkpoint, preemption.

`build(config, mesh)` assembles everything a run needs (model, objective, optimizer,
shardings, jitted functions) without touching data or disk; `train_stage(config,
workdir)` runs it. Tests import both.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import time
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
import optax

from mmjax import config_lib, lora as lora_lib, sharding
from mmjax.evals import generation
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import groups as groups_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib
from mmjax.train.dpo import DPO
from mmjax.train.sft import SFT
from mmjax.train.visft import ViSFT


class NonFiniteLoss(RuntimeError):
  """Training produced a NaN/Inf loss; nothing from that step was saved."""


OBJECTIVES = {"sft": SFT, "dpo": DPO, "visft": ViSFT}


@dataclasses.dataclass
class Run:
  """Everything needed to step a model, built from a config and a mesh."""
  config: Any
  mesh: Any
  rules: tuple
  model_cfg: Any
  model: nn.Module
  objective: Any
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
    c = self.config
    rows = c.batch_size * getattr(self.objective, "flops_factor", 1.0)  # DPO: rows per pair + reference
    return self.flops_per_token * rows * c.seq_len + self.flops_per_example * rows


def _param_logical_axes(model, dummy):
  boxed = jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.key(0), *dummy)
  return sharding.logical_axes_tree(boxed["params"]), nn.meta.unbox(boxed["params"])


def init_variables(rng, model, dummy, lora_cfg, params=None) -> dict:
  """Base params (given, or random from `model.init(rng, *dummy)`) and, when
  `lora_cfg.targets` is set, a fresh adapter."""
  p_rng, l_rng = jax.random.split(rng)
  if params is None:
    params = nn.meta.unbox(model.init(p_rng, *dummy)["params"])
  variables = {"params": params}
  if lora_cfg.targets:
    variables["lora"] = lora_lib.init(l_rng, params, lora_cfg.targets, lora_cfg.rank)
  return variables


def build(config, mesh, tokenizer) -> Run:
  """Everything to step the model of `config` on `mesh`; `tokenizer` gives the vocabulary
  size (when `model.vocab_size == -1`) and the VLM's image placeholder id. A plain int is
  taken as the vocabulary size of a text-only model."""
  if isinstance(tokenizer, int):
    tokenizer = types.SimpleNamespace(vocab_size=tokenizer, image_id=None)
  rules = sharding.rules_from_config(config.rules)
  model, model_cfg, visual_tokens = config_lib.model_from_config(config, tokenizer)
  cls = OBJECTIVES[config.objective]

  def make_objective(cfg):
    media = config_lib.media_fields(cfg)
    return cls.from_config(cfg, model, media) if hasattr(cls, "from_config") else cls(model, media=media)

  objective = make_objective(config)
  dummy = _init_args(objective, config)
  param_names, abstract_params = _param_logical_axes(model, dummy)
  config_lib.check_targets(config, abstract_params)

  tx, schedule = state_lib.make_optimizer(config.optimizer, config.steps)
  patterns = groups_lib.trainable_patterns(config)

  def make_state(rng, params=None):
    variables = init_variables(rng, model, dummy, config.lora, params)
    aux = objective.init_aux(variables) if hasattr(objective, "init_aux") else {}
    return state_lib.create_state(variables, patterns, tx, aux)

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
  aux_names = objective.aux_names(param_names) if hasattr(objective, "aux_names") else {}
  aux_sh = sharding.tree_shardings(shapes.aux, aux_names, mesh, rules)
  state_sh = state_lib.TrainState(step=repl, trainable=train_sh, frozen=frozen_sh, opt_state=opt_sh, aux=aux_sh)
  abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                shapes, state_sh)
  batch_sh = sharding.batch_sharding(mesh, rules)

  in_ctx = functools.partial(_in_context, mesh=mesh, rules=rules)
  params_sh = sharding.tree_shardings(abstract_params, param_names, mesh, rules)
  init_state = jax.jit(in_ctx(make_state), out_shardings=state_sh)
  init_from_params = jax.jit(in_ctx(make_state), in_shardings=(repl, params_sh), out_shardings=state_sh)
  merged_params = jax.jit(in_ctx(final_params), in_shardings=(state_sh,), out_shardings=params_sh)
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
    gobj = make_objective(gcfg)
    group_steps[g] = (gobj, jit_train_step(gobj, mask))
  eval_step = jax.jit(in_ctx(functools.partial(step_lib.eval_step, objective=objective)),
                      in_shardings=(state_sh, batch_sh), out_shardings=repl)
  if config.objective == "visft":
    flops, flops_ex = 0.0, _visft_flops(model_cfg, config, abstract_params, patterns)
  else:
    flops, flops_ex = _flops(model_cfg, config, abstract_params, patterns, visual_tokens)
  return Run(config, mesh, rules, model_cfg, model, objective, tx, schedule, init_state, abstract_state,
             state_sh, batch_sh, train_step, eval_step, flops, flops_ex, init_from_params, merged_params,
             abstract_params, visual_tokens, group_steps)


def _init_args(objective, config) -> tuple:
  """Dummy inputs for `model.init`: one token row, unless the objective feeds other inputs."""
  if hasattr(objective, "init_args"):
    return objective.init_args(config)
  return (jnp.zeros((1, config.seq_len), jnp.int32),)


def random_params(run: Run, rng) -> dict:
  """The model's seeded random params, created directly in their shardings (call under
  `jax.set_mesh(run.mesh)`)."""
  dummy = _init_args(run.objective, run.config)
  init = _in_context(lambda r: nn.meta.unbox(run.model.init(r, *dummy)["params"]), run.mesh, run.rules)
  return jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, run.abstract_params))(rng)


def _in_context(fn, mesh, rules):
  """`fn` traced with the mesh and the logical-axis rules active, so activation
  constraints (`nn.with_logical_constraint`) resolve to mesh axes."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


def _split_names(names, patterns):
  flat = traverse_util.flatten_dict(names, sep="/", is_leaf=lambda _, x: isinstance(x, tuple) or x is None)
  train = {p: v for p, v in flat.items() if state_lib.is_trainable(p, patterns)}
  frozen = {p: v for p, v in flat.items() if not state_lib.is_trainable(p, patterns)}
  return traverse_util.unflatten_dict(train, sep="/"), traverse_util.unflatten_dict(frozen, sep="/")


def _flops(model_cfg, config, abstract_params, patterns, visual_tokens) -> tuple[float, float]:
  """(per LM token, per example for the vision tower) analytic training FLOPs."""
  flat = traverse_util.flatten_dict(abstract_params, sep="/")
  lm_cfg = getattr(model_cfg, "llm", model_cfg)
  lora_targets = set(lora_lib.target_paths(abstract_params, config.lora.targets)) if config.lora.targets else set()

  def count(prefix, seq_len, cfg):
    kernels = {"params/" + p: x.shape for p, x in flat.items()
               if p.startswith(prefix) and p.endswith("kernel") and len(x.shape) == 2}
    if getattr(cfg, "tie_embeddings", False):
      kernels["params/" + prefix + "embed/embedding"] = flat[prefix + "embed/embedding"].shape[::-1]
    trained = {p for p in kernels if state_lib.is_trainable(p, patterns)}
    lora_shapes = {m: (*flat[m + "/kernel"].shape, config.lora.rank) for m in lora_targets if m.startswith(prefix)}
    return metrics_lib.train_flops_per_token(cfg, seq_len, kernels, trained, lora_shapes)

  if visual_tokens is None:
    return count("", config.seq_len, lm_cfg), 0.0
  per_token = count("llm/", config.seq_len, lm_cfg)
  vcfg = model_cfg.vision
  patches = vcfg.num_patches(config.data.image_size) + int(vcfg.class_token)
  frames = config.data.video_frames if "frames" in config_lib.media_fields(config) else 1
  per_patch = count("vision/", 2 * patches, vcfg)  # x2: bidirectional attention (count() halves for causal) + count("projector/", 0, dataclasses.replace(vcfg, n_layers=0))
  return per_token, per_patch * patches * frames


def _visft_flops(cfg, config, abstract_params, patterns) -> float:
  """Analytic training FLOPs per image of a ViT with task heads: every kernel applied to the
  tokens it sees (tower: patches and class token; heads: patches, queries, mask pixels or
  caption tokens), forward + activation gradient + weight gradient when trained, LoRA
  factors, and the attention score and value matmuls. The tower's activation gradient is
  counted even in ViSFT stage 1, where autodiff skips it (nothing below it trains), so
  stage 1's TFLOP/s is an upper bound."""
  flat = traverse_util.flatten_dict(abstract_params, sep="/")
  lora_targets = set(lora_lib.target_paths(abstract_params, config.lora.targets)) if config.lora.targets else set()
  v = cfg.vision
  grid = config.data.image_size // v.patch_size
  patches = grid * grid
  q = cfg.detection.num_queries if cfg.detection is not None else 0
  hw = (grid * cfg.segmentation.upsample) ** 2 if cfg.segmentation is not None else 0
  length = config.seq_len

  def uses(path):  # tokens a head kernel is applied to
    if "/input_proj/" in path or "/cross_attn/k_proj/" in path or "/cross_attn/v_proj/" in path \
        or "/pixel_norm/" in path or "/pixel_proj/" in path:
      return patches
    if "/pixel_out/" in path:
      return hw
    return length if path.startswith("heads/caption/") else q

  total = 0.0
  for p, x in flat.items():
    if not (p.endswith("kernel") and len(x.shape) == 2):
      continue
    n = patches + int(v.class_token) if p.startswith("vision/") else uses(p)
    total += 2.0 * x.shape[0] * x.shape[1] * n * (2 + state_lib.is_trainable("params/" + p, patterns))
    if p[:-len("/kernel")] in lora_targets:
      total += 6.0 * config.lora.rank * (x.shape[0] + x.shape[1]) * n
  tokens = patches + int(v.class_token)
  total += 3 * 2 * 2 * tokens * tokens * v.n_heads * v.head_dim * v.n_layers  # bidirectional tower attention
  for head, t in (("detection", q), ("caption", length)):
    c = getattr(cfg, head)
    if c is not None:
      width = c.n_heads * c.head_dim
      total += 3 * 2 * 2 * t * (t / (2 if head == "caption" else 1) + patches) * width * c.n_layers
  if cfg.segmentation is not None:
    total += 3 * 2 * q * hw * cfg.segmentation.mask_dim
  return total


def evaluate(run: Run, state, batches) -> dict:
  """Mean eval metrics over a fixed list of local batches (normalised by total loss tokens)."""
  totals = None
  for local in batches:
    sums = run.eval_step(state, run.global_batch(local))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:  # no eval set
    return {}
  totals = jax.device_get(totals)
  norm = max(float(totals.pop("normaliser")), 1.0)
  return {k: float(v) / norm for k, v in totals.items()}


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop saves and exits at the next step boundary."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)

  def requested(self) -> bool:
    flag = self.signal is not None
    if jax.process_count() > 1:  # all hosts must stop at the same step
      from jax.experimental import multihost_utils
      flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
    return flag


def train_stage(config, workdir: str, mesh, tokenizer, base_params=None, label: str = "") -> dict:
  """Trains one stage for `config.steps` steps, resuming from `workdir/checkpoints` if present.

  `base_params` (sharded like `run.abstract_params`) replaces the random init: the
  previous stage's result or an imported Hugging Face model. Returns a summary: eval
  metrics before/after, last train metrics, whether a signal stopped it, the final state
  and the `Run`. Raises NonFiniteLoss (after keeping the last good checkpoint intact).
  """
  from mmjax.data import pipeline

  os.makedirs(workdir, exist_ok=True)
  run = build(config, mesh, tokenizer)
  pidx, pcount = jax.process_index(), jax.process_count()

  is_dpo = config.objective == "dpo"
  extra_eval = getattr(run.objective, "extra_eval", None)  # task metrics beyond the loss (ViSFT)
  if is_dpo:  # pairs come from the stage's starting policy (online) or a file; built below
    train_iter, eval_batches = None, []
  else:
    data_fns = run.objective.data_fns(config, tokenizer) if hasattr(run.objective, "data_fns") else {}

    def data_iter(data_cfg, objective):
      fns = data_fns if objective is run.objective else (
          objective.data_fns(config, tokenizer) if hasattr(objective, "data_fns") else {})
      return pipeline.make_train_iterator(
          data_cfg, global_batch=config.batch_size, seq_len=config.seq_len, seed=config.seed,
          process_index=pidx, process_count=pcount, tokenizer=tokenizer, visual_tokens=run.visual_tokens,
          example_fn=fns.get("example_fn"))

    if run.group_steps:  # directed fine-tuning: each group's own data, in schedule order
      train_iter = groups_lib.MultiIterator(
          {g: data_iter(groups_lib.data_config(config, g), obj) for g, (obj, _) in run.group_steps.items()},
          groups_lib.parse_schedule(config.group_schedule, groups_lib.names(config)))
    else:
      train_iter = data_iter(config.data, run.objective)
    eval_batches = pipeline.make_eval_batches(
        config.data, batch=config.eval_batch_size, seq_len=config.seq_len, tokenizer=tokenizer,
        process_index=pidx, process_count=pcount, visual_tokens=run.visual_tokens, **data_fns)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  writer = metrics_lib.MetricsWriter(workdir, config.steps)
  prefix = f"[{label}] " if label else ""
  gen_records = generation.eval_records(config.data, config.sample_eval.num_examples)

  def full_eval(state):
    """Loss metrics on the eval batches, plus generation metrics when sample_eval asks."""
    out = evaluate(run, state, eval_batches)
    answers = []
    if extra_eval is not None:
      out.update(extra_eval(run, state.variables, config, tokenizer))
    if gen_records:
      gen, answers = generation.evaluate_generation(
          run, state.variables, tokenizer, gen_records, max_new_tokens=config.sample_eval.max_new_tokens,
          batch=config.eval_batch_size)
      out.update(gen)
    return out, answers

  with jax.set_mesh(mesh):
    rng = jax.random.key(config.seed)
    state = run.init_state(rng) if base_params is None else run.init_from_params(rng, base_params)
    if is_dpo:
      train_iter = _dpo_iterator(config, workdir, run, state, tokenizer, label, pidx, pcount, writer, prefix)
    start = 0
    if ckpt.latest_step() is not None:
      state = ckpt.restore(state, train_iter)
      start = int(jax.device_get(state.step))
      writer.line(f"{prefix}resumed from {ckpt.directory}/{start}")
    n_train = lora_lib.count(state.trainable)
    n_total = n_train + lora_lib.count(state.frozen)
    writer.line(f"{prefix}mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} "
                f"device(s), {pcount} process(es); trainable {n_train:,} of {n_total:,} parameters")
    summary = {"start_step": start, "preempted": False}
    if start == 0 or config.eval_every:
      summary["eval_before"], _ = full_eval(state)
      writer.write(start, summary["eval_before"], "eval")
      writer.line(f"{prefix}eval at step {start}: " + _fmt(summary["eval_before"]))

    peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, config.model.dtype,
                                   config.peak_tflops_per_device)
    rng = jax.random.key(config.seed + 1)
    last = None
    with _StopFlag() as stop:
      t_prev = time.perf_counter()
      for step in range(start, config.steps):
        if run.group_steps:
          group, local = next(train_iter)
          objective, step_fn = run.group_steps[group]
          state, m = step_fn(state, run.global_batch(local, objective), rng)
        else:
          state, m = run.train_step(state, run.global_batch(next(train_iter)), rng)
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        if not math.isfinite(float(m["loss"])):
          last_good = ckpt.latest_step()
          where = f"{ckpt.directory}/{last_good}" if last_good is not None else "none saved yet"
          ckpt.close()
          writer.close()
          raise NonFiniteLoss(f"non-finite loss {float(m['loss'])} at step {step + 1}; stopped without saving; "
                              f"last good checkpoint: {where}")
        last = _step_metrics(run, m, step, dt, peak)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps or done == start + 1:
          writer.write(done, last)
          writer.progress(done, last)
        if config.eval_every and done % config.eval_every == 0 and done != config.steps:
          ev = evaluate(run, state, eval_batches)
          writer.write(done, ev, "eval")
          writer.line(f"{prefix}eval at step {done}: " + _fmt(ev))
        if done % config.checkpoint_every == 0:
          ckpt.save(state, train_iter)
        if stop.requested():
          ckpt.save(state, train_iter, force=True)
          writer.line(f"{prefix}stopped by signal at step {done}; checkpoint saved in {ckpt.directory}/{done}")
          summary["preempted"] = True
          break
      else:
        ckpt.save(state, train_iter, force=True)
    if not summary["preempted"]:
      summary["eval_after"], answers = full_eval(state)
      writer.write(int(jax.device_get(state.step)), summary["eval_after"], "eval")
      writer.line(f"{prefix}eval at step {int(jax.device_get(state.step))}: " + _fmt(summary["eval_after"]))
      if "eval_before" in summary:
        writer.line(_before_after(summary["eval_before"], summary["eval_after"], start,
                                  int(jax.device_get(state.step))))
      for r, a in list(zip(gen_records, answers))[:config.sample_eval.show]:
        writer.line(f"{prefix}prompt: {r['prompt']!r}\n  truth: {r['response']!r}\n  model: {a!r}")
      summary["answers"] = answers
    summary["train"] = last
    summary["state"] = state
    summary["run"] = run
  ckpt.close()
  writer.close()
  return summary


def _dpo_iterator(config, workdir, run, state, tokenizer, label, pidx, pcount, writer, prefix):
  """The DPO stage's pairs iterator; online pairs are sampled from `state` (the stage's
  starting policy) and written once, so a resumed stage trains on the same pairs."""
  from mmjax.data import pairs as pairs_lib
  from mmjax.train import dpo
  fresh = not os.path.exists(os.path.join(workdir, "pairs.jsonl"))
  t0 = time.perf_counter()
  path = dpo.stage_pairs(config, workdir, run, state.variables, tokenizer, label or "main")
  if fresh and path.startswith(workdir):
    recs = pairs_lib.read_pairs(path)
    writer.line(f"{prefix}{len(recs)} pairs in {path} ({time.perf_counter() - t0:.1f}s)")
  return pairs_lib.make_train_iterator(path, config, tokenizer=tokenizer, visual_tokens=run.visual_tokens,
                                       process_index=pidx, process_count=pcount, gt=config.dpo.gt_weight > 0,
                                       need_ref=config.dpo.reference == "precomputed")


_NOT_OBJECTIVE = ("grad_norm", "normaliser", "tokens")


def _step_metrics(run: Run, m: dict, step: int, dt: float, peak) -> dict:
  n_dev = jax.device_count()
  tflops = run.flops_per_step() / dt / 1e12 / n_dev
  out = {k: float(v) for k, v in m.items() if k not in _NOT_OBJECTIVE}  # the objective's metrics
  out.update({
      "grad_norm": float(m["grad_norm"]),
      "lr": float(run.schedule(step)), "step_time_s": dt,
      "tokens_per_s": float(m["tokens"]) / dt, "tflops_per_s": tflops,
      "mfu": (tflops / peak) if peak else None,
  })
  return out


def _before_after(before: dict, after: dict, start: int, end: int) -> str:
  w = max([len("eval metric")] + [len(k) for k in after])
  rows = [f"{'eval metric':<{w}} {'step ' + str(start):>10} {'step ' + str(end):>10}"]
  rows += [f"{k:<{w}} {before[k]:>10.4f} {after[k]:>10.4f}" for k in after if k in before]
  return "\n".join(rows)


def _fmt(metrics: dict) -> str:
  return " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
