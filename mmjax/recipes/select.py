"""Error-driven data selection as a stage kind (`config.select`).

A stage with `select.method` set trains on a selection from a task-agnostic pool (the
train set of `config.data` with the `select.pool` overrides) instead of `config.data`'s own
train set; `config.data` stays the stage's eval data (the target task). Before training:

  errors  the stage's starting model (the student) answers `select.val_examples` held-out
          target records greedily (`generation.validation_records`: eval-split records after, and
          different from, the test records every stage is scored on); each wrong answer
          is an error (`gaps.collect_errors`);
          the teacher (`select.teacher`: 'facts', the exact atomic-fact analyser, or
          'model', the final weights of stage `select.teacher_stage`) names the missing
          skills (stepped answers: those of the first wrong step, `teachers.first_wrong_step`;
          the model teacher's answer to the same question stands for the truth; other
          errors: the model teacher answers every kind of question about the failed image
          next to the student) and `gaps.gap_profile` sums them; `budget` pool records are retrieved,
          round(mix * budget) by cosine similarity of the student's own vision features
          (mean tower tokens of the image, or of the frames) to the failed records', the
          rest by the profile over the pool's skill tags (`retrieve.select`; with
          `select.rank='coverage'` the records that exercise more of the profile first);
  random  `budget` pool records uniformly at random (the baseline of the same size);
  all     the whole pool.

With `select.epochs` > 0 the stage trains that many passes over its selection (at least
`select.min_steps` steps; `stage_steps`) instead of `config.steps`, so selections of every
size are trained alike rather than for equal steps.

The selection goes to `STAGE_DIR/selection.json` (indices and meta: method, budget, the
gap profile, the number of errors, how many errors each first wrong step explains
(`first_wrong_steps`: locate / read for stepped answers, answer for short ones), the
selected records per skill and the share of them tagged with a missing skill, one of
profile weight >= 0.1: `on_missing_skill`) atomically and once
(`mmjax.recipes.kinds`), so a restarted stage trains on the same records. The stage then
trains through the groups mechanism (`mmjax.train.groups`) with one group `pool` (the
stage's trainable regexes, the pool data with `indices_path` = the selection).
"""
from __future__ import annotations

import collections
import math
import random
import time

import ml_collections
import numpy as np

from mmjax.config.core import ConfigError, derive
from mmjax.data import catalog, media, pixels, shapes
from mmjax.evals import features, generation
from mmjax.recipes import kinds
from mmjax.select import gaps, retrieve, teachers
from mmjax.train import groups as groups_lib

METHODS = ("errors", "random", "all")
TEACHERS = ("facts", "model")


def config_dict() -> dict:
  """`config.select`: error-driven data selection from a pool."""
  return {"select": ml_collections.ConfigDict(dict(
      method="",  # '' = off (train on config.data); 'errors' | 'random' | 'all' (see mmjax/recipes/select.py)
      budget=1000,  # pool records selected ('errors', 'random')
      val_examples=64,  # held-out target records the student answers ('errors')
      teacher="facts",  # 'facts' (exact atomic-fact analyser) or 'model' (stage teacher_stage's weights)
      teacher_stage="",  # teacher='model': the earlier stage whose final weights are the teacher
      mix=0.5,  # share of the budget retrieved by embedding similarity; the rest by skill tags
      rank="random",  # order of each skill's tagged records: 'random' (seeded) or 'coverage' (records that
      #                 exercise more of the gap profile first; retrieve.select_by_skills)
      seed=0,  # random and skill-tag draws
      epochs=0.0,  # > 0: the stage trains max(min_steps, ceil(epochs * selected / batch_size)) steps
      #              (each selection to the same number of passes) instead of config.steps
      min_steps=0,  # the fewest steps a selection trains when epochs > 0
      pool=ml_collections.ConfigDict(dict(task="pool", num_train_examples=10_000)),  # data overrides of the pool
  ))}


def validate(config, env) -> None:
  """Raises ConfigError (one line) for bad `config.select` values."""
  try:
    _check(config, env.earlier_stages, env.files)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check(config, stage_names, check_files) -> None:
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
  if s.rank not in retrieve.RANKS:
    raise ValueError(f"config.select.rank={s.rank!r} is not valid; choose one of {', '.join(map(repr, retrieve.RANKS))}")
  if s.epochs < 0 or s.min_steps < 0:
    raise ValueError(f"config.select.epochs={s.epochs} and config.select.min_steps={s.min_steps} must be >= 0")
  if s.method == "errors" and s.val_examples <= 0:
    raise ValueError(f"config.select.val_examples={s.val_examples} must be > 0")
  short = generation.validation_room(config, s.val_examples, "select.val_examples")
  if s.method == "errors" and short:
    raise ValueError(short)
  if s.method == "errors" and s.teacher == "model" and s.teacher_stage not in stage_names:
    raise ValueError(f"config.select.teacher_stage={s.teacher_stage!r} names no earlier stage; "
                     f"earlier stages: {', '.join(stage_names) or 'none'}")
  if config.groups:
    raise ValueError("config.select trains on the pool through its own group; leave config.groups empty")
  bad = [k for k in s.pool.keys() if k not in config.data]
  if bad:
    raise ValueError(f"config.select.pool.{bad[0]} is not a data key; valid: {', '.join(sorted(config.data.keys()))}")
  try:
    (catalog.validate_data_config if check_files else catalog.check_values)(pool_data(config))
  except ValueError as e:
    raise ValueError(f"config.select.pool: {e}") from None


def pool_data(config) -> ml_collections.ConfigDict:
  """config.data with the `select.pool` overrides: the pool's train set."""
  return derive(derive(config.data, config.select.pool), {"indices_path": ""})


def embed(run, variables, records, batch: int = 256) -> np.ndarray:
  """The student's embedding of each record: mean vision-tower tokens of its image, or of
  all its frames (float32 [N, D_vision], `mmjax.evals.features`); one media kind per batch."""
  data = run.config.data
  px = pixels.for_data(data)
  by_kind = collections.defaultdict(list)
  for i, r in enumerate(records):
    by_kind[media.media_kind(r)].append(i)
  if None in by_kind:
    raise ValueError(f"selection pool record {records[by_kind[None][0]].get('index')} has no image or frames "
                     "to embed; use select.mix=0 (skill tags only) for text records")
  out = np.zeros((len(records), run.model_cfg.vision.d_model), np.float32)
  for kind, idx in by_kind.items():
    if kind == "image":
      images = np.stack([px(records[i]["image"]) for i in idx])
    else:
      images = np.stack([media.load_frames(records[i], px, data.video_frames, data.video_fps) for i in idx])
    out[idx] = features.tower_features(run, variables, images, batch)
  return out
def _model_teacher(run, teacher_variables, student_variables, tokenizer):
  def answer_fn(variables):
    def fn(pairs):
      recs = [dict({k: v for k, v in r.items() if k in ("image", "frames")}, prompt=q, response="")
              for r, q in pairs]
      return generation.generate_answers(run, variables, recs, tokenizer,
                                         max_new_tokens=max(8, run.config.sample_eval.max_new_tokens),
                                         batch=run.config.eval_batch_size)
    return fn
  return teachers.ModelTeacher(answer_fn(teacher_variables), answer_fn(student_variables), probe_questions)


def probe_questions(record: dict) -> list[tuple]:
  """Every kind of shapes question about a failed image (seeded by its index), so the model
  teacher probes all skills, not only those the target task asks; videos: their own `qa`."""
  facts = record.get("facts") or []
  if not facts or facts[0][0] != "object":
    return teachers.record_questions(record)
  cfg = shapes.ShapesConfig()
  return [shapes.make_question(facts, k, random.Random(f"probe/{record.get('index')}/{k}"), cfg)
          for k in shapes.QA_SKILLS]


def on_missing_skill(indices, skills, profile, min_weight: float = 0.1) -> float:
  """Share of the selected records tagged with a missing skill (profile weight >= min_weight)."""
  missing = {k for k, w in profile.items() if w >= min_weight}
  return float(np.mean([bool(missing & set(skills[int(i)])) for i in indices])) if len(indices) else 0.0


def selection(config, run, params, tokenizer, finals: dict, log=print) -> str:
  """The selection file's text (`retrieve.selection_json`) for a stage with `select.method`;
  `params` is the student (the stage's starting params), `finals` the earlier stages' params."""
  s = config.select
  t0 = time.perf_counter()
  pool = catalog.open_source(pool_data(config), "train")
  n_pool = len(pool)
  meta = {"method": s.method, "pool": n_pool}
  if s.method == "all":
    indices = np.arange(n_pool)
  elif s.method == "random":
    indices = retrieve.select_random(n_pool, s.budget, s.seed)
  else:
    variables = {"params": params}
    val = generation.validation_records(config, s.val_examples, "config.select.val_examples")
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
    indices = retrieve.select(skills, pool_emb, failed_emb, profile, s.budget, s.seed, s.mix if profile else 1.0,
                              rank=s.rank)
    per_skill = collections.Counter(k for i in indices for k in skills[int(i)])
    steps = collections.Counter(e.details.get("step", "answer") for e in errors)
    meta.update(errors=len(errors), val_examples=len(val), profile=profile, teacher=s.teacher,
                first_wrong_steps=dict(sorted(steps.items())), selected_per_skill=dict(sorted(per_skill.items())),
                on_missing_skill=on_missing_skill(indices, skills, profile))
  meta["budget"] = len(indices)
  log(f"selection ({s.method}, {time.perf_counter() - t0:.1f}s): {len(indices)} of {n_pool} pool records"
      + (f"; gap profile {', '.join(f'{k}={v:.2f}' for k, v in meta['profile'].items())}" if "profile" in meta else ""))
  return retrieve.selection_json(indices, meta)


def selected_count(config) -> int:
  """How many pool records the stage's selection holds (the budget, or the whole pool)."""
  s = config.select
  return len(catalog.open_source(pool_data(config), "train")) if s.method == "all" else int(s.budget)


def stage_steps(config) -> int:
  """The stage's training steps: `config.steps`, or with `select.epochs` > 0 that many
  passes over the selection, at least `select.min_steps`."""
  s = config.select
  if s.epochs <= 0:
    return int(config.steps)
  return max(int(s.min_steps), math.ceil(s.epochs * selected_count(config) / config.batch_size))


def with_selection(config, path: str) -> ml_collections.ConfigDict:
  """The stage config that trains on the selection at `path`: one group `pool`."""
  return groups_lib.one_group(config, "pool", derive(pool_data(config), {"indices_path": path}))


class Selection(kinds.StageKind):
  name = "selection"
  file = "selection.json"

  def applies(self, config) -> bool:
    return bool(config.select.method)

  def reads(self, config) -> set:
    s = config.select
    return {s.teacher_stage} if s.method == "errors" and s.teacher == "model" else set()

  def configure(self, config, path):
    return with_selection(derive(config, steps=stage_steps(config)), path)

  def produce(self, ctx) -> str:
    return selection(ctx.config, ctx.run, ctx.start_variables()["params"], ctx.tokenizer, ctx.finals, log=ctx.log)


SELECTION = Selection()

