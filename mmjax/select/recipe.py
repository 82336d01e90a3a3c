"""Error-driven data selection as a stage of a recipe (`config.select`).

A stage with `select.method` set trains on a selection from a task-agnostic pool (the
train set of `config.data` with the `select.pool` overrides) instead of `config.data`'s own
train set; `config.data` stays the stage's eval data (the target task). Before training:

  errors  the stage's starting model (the student) answers `select.val_examples` held-out
          target records greedily; each wrong answer is an error (`gaps.collect_errors`);
          the teacher (`select.teacher`: 'facts', the exact atomic-fact analyser, or
          'model', the final weights of stage `select.teacher_stage` answering every kind
          of question about each failed image next to the student) names the missing
          skills and `gaps.gap_profile` sums them; `budget` pool records are retrieved,
          round(mix * budget) by cosine similarity of the student's own vision features
          (mean tower tokens of the image, or of the frames) to the failed records', the
          rest by the profile over the pool's skill tags (`retrieve.select`);
  random  `budget` pool records uniformly at random (the baseline of the same size);
  all     the whole pool.

The selection goes to `STAGE_DIR/selection.json` (indices and meta: method, budget, the
gap profile, the number of errors, the selected records per skill) atomically and once, so
a restarted stage trains on the same records. The stage then trains through the groups
mechanism (`mmjax.train.groups`) with one group `pool` (the stage's trainable regexes, the
pool data with `indices_path` = the selection).
"""
from __future__ import annotations

import collections
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.select import gaps, retrieve, teachers

METHODS = ("errors", "random", "all")
TEACHERS = ("facts", "model")


def config_dict() -> ml_collections.ConfigDict:
  """`config.select`."""
  return ml_collections.ConfigDict(dict(
      method="",  # '' = off (train on config.data); 'errors' | 'random' | 'all' (see mmjax/select/recipe.py)
      budget=1000,  # pool records selected ('errors', 'random')
      val_examples=64,  # held-out target records the student answers ('errors')
      teacher="facts",  # 'facts' (exact atomic-fact analyser) or 'model' (stage teacher_stage's weights)
      teacher_stage="",  # teacher='model': the earlier stage whose final weights are the teacher
      mix=0.5,  # share of the budget retrieved by embedding similarity; the rest by skill tags
      seed=0,  # random and skill-tag draws
      pool=ml_collections.ConfigDict(dict(task="pool", num_train_examples=10_000)),  # data overrides of the pool
  ))


def validate(config, stage_names=()) -> None:
  """Raises ValueError (one line) for bad `config.select` values."""
  s = config.select
  if not s.method:
    return
  if s.method not in METHODS:
    raise ValueError(f"config.select.method={s.method!r} is not valid; choose '', {', '.join(map(repr, METHODS))}")
  if s.teacher not in TEACHERS:
    raise ValueError(f"config.select.teacher={s.teacher!r} is not valid; choose one of {', '.join(map(repr, TEACHERS))}")
  if s.method != "all" and s.budget <= 0:
    raise ValueError(f"config.select.budget={s.budget} must be > 0")
  if not 0.0 <= s.mix <= 1.0:
    raise ValueError(f"config.select.mix={s.mix} must be in [0, 1]")
  if s.method == "errors" and s.val_examples <= 0:
    raise ValueError(f"config.select.val_examples={s.val_examples} must be > 0")
  if s.method == "errors" and s.teacher == "model" and s.teacher_stage not in stage_names:
    raise ValueError(f"config.select.teacher_stage={s.teacher_stage!r} names no earlier stage; "
                     f"earlier stages: {', '.join(stage_names) or 'none'}")
  if config.groups:
    raise ValueError("config.select trains on the pool through its own group; leave config.groups empty")
  bad = [k for k in s.pool.keys() if k not in config.data]
  if bad:
    raise ValueError(f"config.select.pool.{bad[0]} is not a data key; valid: {', '.join(sorted(config.data.keys()))}")
  from mmjax.data import pipeline
  try:
    pipeline.validate_data_config(pool_data(config))
  except ValueError as e:
    raise ValueError(f"config.select.pool: {e}") from None


def pool_data(config) -> ml_collections.ConfigDict:
  """config.data with the `select.pool` overrides: the pool's train set."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  for k, v in config.select.pool.items():
    data[k] = v
  data.indices_path = ""
  return data


def _features_fn(run):
  """jitted (variables, pixels [N, (T,) H, W, C]) -> mean tower tokens [N, D_vision]."""
  def f(variables, pixels):
    def feats(module, x):
      if x.ndim == 5:  # frames: mean over time as well
        n, t = x.shape[:2]
        return module.frame_features(x.reshape(n * t, *x.shape[2:])).reshape(n, -1, module.cfg.vision.d_model)
      return module.frame_features(x)
    return jnp.mean(run.model.apply(variables, pixels, method=feats).astype(jnp.float32), axis=1)
  return jax.jit(f)


def embed(run, variables, records, batch: int = 256) -> np.ndarray:
  """The student's embedding of each record: mean vision-tower tokens of its image, or of
  all its frames (float32 [N, D_vision]); records of one media kind per call batch."""
  from mmjax.data import pipeline
  size = run.config.data.image_size
  fn = _features_fn(run)
  by_kind = collections.defaultdict(list)
  for i, r in enumerate(records):
    by_kind[pipeline.media_kind(r)].append(i)
  if None in by_kind:
    raise ValueError(f"selection pool record {records[by_kind[None][0]].get('index')} has no image or frames "
                     "to embed; use select.mix=0 (skill tags only) for text records")
  out = np.zeros((len(records), run.model_cfg.vision.d_model), np.float32)
  for kind, idx in by_kind.items():
    for s in range(0, len(idx), batch):
      chunk = idx[s:s + batch]
      if kind == "image":
        px = np.stack([pipeline.load_image(records[i]["image"], size) for i in chunk])
      else:
        px = np.stack([np.stack([pipeline.load_image(f, size) for f in records[i]["frames"]]) for i in chunk])
      pad = batch - len(chunk)  # one compiled shape per kind
      px = np.concatenate([px, np.repeat(px[-1:], pad, 0)]) if pad else px
      out[chunk] = np.asarray(fn(variables, jnp.asarray(px)))[:len(chunk)]
  return out


def _model_teacher(run, teacher_variables, student_variables, tokenizer):
  from mmjax.evals import generation

  def answer_fn(variables):
    def fn(pairs):
      recs = [dict({k: v for k, v in r.items() if k in ("image", "frames")}, prompt=q, response="")
              for r, q in pairs]
      return generation.generate_answers(run, variables, recs, tokenizer, max_new_tokens=8,
                                         batch=run.config.eval_batch_size)
    return fn
  return teachers.ModelTeacher(answer_fn(teacher_variables), answer_fn(student_variables), probe_questions)


def probe_questions(record: dict) -> list[tuple]:
  """Every kind of shapes question about a failed image (seeded by its index), so the model
  teacher probes all skills, not only those the target task asks; videos: their own `qa`."""
  import random
  from mmjax.data import shapes
  facts = record.get("facts") or []
  if not facts or facts[0][0] != "object":
    return teachers.record_questions(record)
  cfg = shapes.ShapesConfig()
  return [shapes.make_question(facts, k, random.Random(f"probe/{record.get('index')}/{k}"), cfg)
          for k in shapes.QA_SKILLS]


def select_for_stage(config, sdir: str, run, params, tokenizer, finals: dict, log=print) -> str:
  """Writes (once) and returns `sdir/selection.json` for a stage with `select.method`."""
  from mmjax.data import pipeline
  from mmjax.evals import generation
  path = os.path.join(sdir, "selection.json")
  if os.path.exists(path):
    return path
  s = config.select
  t0 = time.perf_counter()
  pool = pipeline.open_source(pool_data(config), "train")
  n_pool = len(pool)
  meta = {"method": s.method, "pool": n_pool}
  if s.method == "all":
    indices = np.arange(n_pool)
  elif s.method == "random":
    indices = retrieve.select_random(n_pool, s.budget, s.seed)
  else:
    variables = {"params": params}
    val = generation.eval_records(config.data, s.val_examples)
    answers = generation.generate_answers(run, variables, val, tokenizer, max_new_tokens=config.sample_eval.max_new_tokens,
                                          batch=config.eval_batch_size)
    errors = gaps.collect_errors(val, answers)
    if s.teacher == "model":
      teacher = _model_teacher(run, {"params": finals[s.teacher_stage]}, variables, tokenizer)
    else:
      teacher = teachers.FactTeacher()
    profile = gaps.gap_profile(errors, teacher)
    records = [pool[i] for i in range(n_pool)]
    skills = [tuple(r.get("skills", ())) for r in records]
    pool_emb = failed_emb = None
    if s.mix > 0 and errors:
      pool_emb = embed(run, variables, records)
      failed_emb = embed(run, variables, [e.record for e in errors])
    if not profile and failed_emb is None:
      raise ValueError(f"select.method='errors': the student made no error the teacher could explain on "
                       f"{len(val)} validation records; nothing to select from (use 'random' or more val_examples)")
    indices = retrieve.select(skills, pool_emb, failed_emb, profile, s.budget, s.seed, s.mix if profile else 1.0)
    per_skill = collections.Counter(k for i in indices for k in skills[int(i)])
    meta.update(errors=len(errors), val_examples=len(val), profile=profile, teacher=s.teacher,
                selected_per_skill=dict(sorted(per_skill.items())))
  meta["budget"] = len(indices)
  # Every process computes the same selection; each writes it (atomically, the same bytes), so
  # the file is there on local disks and a shared one alike.
  retrieve.write_selection(path, indices, meta)
  log(f"selection ({s.method}, {time.perf_counter() - t0:.1f}s): {len(indices)} of {n_pool} pool records -> {path}"
      + (f"; gap profile {', '.join(f'{k}={v:.2f}' for k, v in meta['profile'].items())}" if "profile" in meta else ""))
  return path


def with_selection(config, path: str) -> ml_collections.ConfigDict:
  """The stage config that trains on the selection at `path`: one group `pool`."""
  out = ml_collections.ConfigDict(config.to_dict())
  data = pool_data(config).to_dict()
  data["indices_path"] = path
  base = config.data.to_dict()
  out.groups = ml_collections.ConfigDict({"pool": dict(
      trainable=tuple(config.trainable), data={k: v for k, v in data.items() if base.get(k) != v})})
  out.group_schedule = ""
  return out
