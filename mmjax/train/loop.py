"""The one training loop: init or restore, data, jitted step, eval, log, checkpoint, preemption.

`train_stage(config, workdir, mesh, tokenizer)` trains one stage of `config.steps` steps,
resuming from `workdir/checkpoints` when present. The run (model, objective, jitted steps)
comes from `mmjax.train.run.build`; the objective supplies the data (`train_iterator`,
`eval_batches`) and any metrics beyond the loss (`extra_eval`), so nothing here depends on
which objective or model family trains. A directed fine-tuning stage steps its groups in
schedule order; a plain stage is the one-group case.

The host never waits for the device between plain steps: a step's metrics are fetched after
the next step is dispatched, and only evaluation, checkpoint and stop steps wait for their
own (a state is saved or evaluated only after its loss was seen to be finite). Checkpoints
are written in the background (`mmjax.train.checkpoint`); SIGTERM/SIGINT is looked at every
step on one process and every STOP_CHECK_EVERY steps, through a collective, on many.
"""
from __future__ import annotations

import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import files
from mmjax import lora as lora_lib
from mmjax.data import pipeline
from mmjax.evals import generation
from mmjax.objectives.base import DataContext
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import groups as groups_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train.run import Run, build


STOP_CHECK_EVERY = 10  # steps between the hosts' agreement on a SIGTERM (SLURM warns 120 s ahead)


class NonFiniteLoss(RuntimeError):
  """Training produced a NaN/Inf loss; nothing from that step was saved."""


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

  def due(self, done: int, total: int) -> bool:
    """Whether to look at the flag after step `done`: every step on one process; with many,
    every STOP_CHECK_EVERY steps and at the end, as the hosts agree through a collective."""
    return jax.process_count() == 1 or done % STOP_CHECK_EVERY == 0 or done == total

  def requested(self) -> bool:
    flag = self.signal is not None
    if jax.process_count() > 1:  # all hosts must stop at the same step
      from jax.experimental import multihost_utils
      flag = bool(multihost_utils.process_allgather(np.array(flag)).any())
    return flag


def train_stage(config, workdir: str, mesh, tokenizer, base_params=None, label: str = "", *, run: Run | None = None,
                prepared: dict | None = None, eval_before: dict | None = None, adapter=None) -> dict:
  """Trains one stage for `config.steps` steps, resuming from `workdir/checkpoints` if present.

  `base_params` (sharded like `run.abstract_params`) replaces the random init: the
  previous stage's result or an imported Hugging Face model. `run` is `build(config, mesh,
  tokenizer)` when the caller has it already; `prepared` names the data files the stage
  prepared (`mmjax.recipes.kinds`); `eval_before`, the step-0 evaluation when the caller
  already has it for these very params and eval settings (another arm of a recipe);
  `adapter`, a LoRA tree that the stage continues instead of starting a fresh one. Returns
  a summary: eval metrics before/after, last train metrics, whether a signal stopped it, the
  final state and the `Run`. Raises NonFiniteLoss
  (after keeping the last good checkpoint intact).
  """
  os.makedirs(workdir, exist_ok=True)
  run = run or build(config, mesh, tokenizer)
  pidx, pcount = jax.process_index(), jax.process_count()
  ctx = DataContext(config, tokenizer, run.visual_tokens, pidx, pcount, dict(prepared or {}))
  steps = run.steps
  data_cfgs = groups_lib.data_configs(config)
  train_iter = groups_lib.MultiIterator(  # each group's own data in schedule order (one group: the stage's)
      {g: obj.train_iterator(ctx, data_cfgs[g]) for g, (obj, _) in steps.items()},
      groups_lib.parse_schedule(config.group_schedule, tuple(steps)))
  eval_batches = run.objective.eval_batches(ctx)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.keep_checkpoints)
  writer = metrics_lib.MetricsWriter(workdir, config.steps)
  prefix = f"[{label}] " if label else ""
  gen_records = generation.eval_records(config.data, config.sample_eval.num_examples)

  def full_eval(state):
    """Loss metrics on the eval batches, plus generation metrics when sample_eval asks."""
    out = evaluate(run, state, eval_batches)
    out.update(run.objective.extra_eval(run, state.variables, tokenizer))
    answers = []
    if gen_records:
      gen, answers = generation.evaluate_generation(
          run, state.variables, tokenizer, gen_records, max_new_tokens=config.sample_eval.max_new_tokens,
          batch=config.eval_batch_size)
      out.update(gen)
    return out, answers

  with jax.set_mesh(mesh):
    rng = jax.random.key(config.seed)
    if adapter is not None:
      state = run.init_from_adapter(rng, base_params, adapter)
    else:
      state = run.init_state(rng) if base_params is None else run.init_from_params(rng, base_params)
    start = 0
    restored = ckpt.restore(state, train_iter)  # the newest intact checkpoint, if any
    if restored is not None:
      state = restored
      start = int(jax.device_get(state.step))
      writer.line(f"{prefix}resumed from {ckpt.directory}/{start}")
    writer.resume(start)  # metrics.jsonl keeps the rows up to the checkpoint, so each step is there once
    n_train = lora_lib.count(state.trainable)
    n_total = n_train + lora_lib.count(state.frozen)
    writer.line(f"{prefix}mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].device_kind} "
                f"device(s), {pcount} process(es); trainable {n_train:,} of {n_total:,} parameters")
    summary = {"start_step": start, "preempted": False}
    if start == 0 and eval_before is not None:
      summary["eval_before"] = dict(eval_before)
      writer.write(start, summary["eval_before"], "eval")
      writer.line(f"{prefix}eval at step {start} (the same start as an earlier stage's, reused): "
                  + _fmt(summary["eval_before"]))
    elif (start == 0 and config.eval_at_start) or (start > 0 and config.eval_every):
      summary["eval_before"], _ = full_eval(state)
      writer.write(start, summary["eval_before"], "eval")
      writer.line(f"{prefix}eval at step {start}: " + _fmt(summary["eval_before"]))

    peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, config.model.dtype,
                                   config.peak_tflops_per_device)
    rng = jax.random.key(config.seed + 1)
    last, pending = None, None
    t_prev = time.perf_counter()

    def settle(done, m):
      """Fetches step `done`'s metrics (the step after it may already run), checks and logs them."""
      nonlocal last, t_prev
      m = jax.device_get(m)
      now = time.perf_counter()
      dt, t_prev = now - t_prev, now
      if not math.isfinite(float(m["loss"])):
        last_good = ckpt.latest_step()
        where = f"{ckpt.directory}/{last_good}" if last_good is not None else "none saved yet"
        ckpt.close()
        writer.close()
        raise NonFiniteLoss(f"non-finite loss {float(m['loss'])} at step {done}; stopped without saving; "
                            f"last good checkpoint: {where}")
      last = _step_metrics(run, m, done - 1, dt, peak)
      if done % config.log_every == 0 or done == config.steps or done == start + 1:
        writer.write(done, last)
        writer.progress(done, last)

    with _StopFlag() as stop:
      for step in range(start, config.steps):
        group, local = next(train_iter)
        objective, step_fn = steps[group]
        state, m = step_fn(state, run.global_batch(local, objective), rng)
        done = step + 1
        if pending is not None:  # the previous step's metrics, fetched while this one runs
          settle(*pending)
        pending = (done, m)
        evaluate_now = config.eval_every and done % config.eval_every == 0 and done != config.steps
        save_now = done % config.checkpoint_every == 0 or done == config.steps
        stopping = stop.due(done, config.steps) and stop.requested()
        if evaluate_now or save_now or stopping:  # a state saved or evaluated has had its loss checked
          settle(*pending)
          pending = None
        if evaluate_now:
          ev = evaluate(run, state, eval_batches)
          writer.write(done, ev, "eval")
          writer.line(f"{prefix}eval at step {done}: " + _fmt(ev))
        if save_now:
          ckpt.save(state, train_iter, force=done == config.steps)
        if stopping:
          ckpt.save(state, train_iter, force=True)
          writer.line(f"{prefix}stopped by signal at step {done}; checkpoint saved in {ckpt.directory}/{done}")
          summary["preempted"] = True
          break
      ckpt.wait()  # the last save is complete before evaluation, export or exit
    if not summary["preempted"]:
      summary["eval_after"], answers = full_eval(state)
      writer.write(int(jax.device_get(state.step)), summary["eval_after"], "eval")
      writer.line(f"{prefix}eval at step {int(jax.device_get(state.step))}: " + _fmt(summary["eval_after"]))
      if "eval_before" in summary:
        writer.line(_before_after(summary["eval_before"], summary["eval_after"], start,
                                  int(jax.device_get(state.step))))
      if answers and jax.process_index() == 0:  # every scored answer, for reading and re-scoring
        files.atomic_write(os.path.join(workdir, "answers.jsonl"), generation.answer_rows(gen_records, answers))
      for r, a in list(zip(gen_records, answers))[:config.sample_eval.show]:
        writer.line(f"{prefix}prompt: {pipeline.question(r)!r}\n  truth: {pipeline.reference(r)!r}\n  model: {a!r}")
      summary["answers"] = answers
    summary["train"] = last
    summary["state"] = state
    summary["run"] = run
  ckpt.close()
  writer.close()
  return summary


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
