"""Errors of a student on a validation set, and the gap profile they add up to.

  collect_errors(records, predictions)  -> [ErrorRecord]   one per wrong prediction
  gap_profile(errors, teacher)          -> {skill: weight}  normalised to sum 1

An error is judged against the record's own truth: a caption (`kind` image_caption or
video_caption, with atomic `facts`) is wrong when `mmjax.evals.captions.caption_metrics`
finds a missed or an invented fact (an unparseable span counts as invented; a repetition
alone does not); a vqa answer is wrong when it differs from `response` after lower-casing
and collapsing whitespace. A teacher (`mmjax.select.teachers`) then names, per error, the
skills whose lack explains it; `gap_profile` sums those weights over the errors.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from mmjax.data import shapes
from mmjax.evals import captions

# Record `kind` (the shapes task) -> ErrorRecord.kind.
ERROR_KINDS = {"image_caption": "image", "video_caption": "video", "video_local_caption": "video", "vqa": "vqa",
               "video_qa": "vqa"}


def normalise_answer(text) -> str:
  """Lower-cased, whitespace collapsed: the form in which short answers are compared."""
  return " ".join(str(text).lower().split())


@dataclasses.dataclass
class ErrorRecord:
  """One wrong prediction of the student.

  index       the example's `index` in its source
  kind        'image' | 'video' (captions) or 'vqa'
  prediction  the student's text
  truth       captions: the true atomic facts (list of tuples); vqa: the true answer
  skills      the example's skill tags (tuple from shapes.SKILLS)
  details     captions: the `caption_metrics` dict; vqa: {"question", "skill"}
  record      the source record itself (image/frames, `qa`, ...) so that a model teacher
              can ask its own questions about it; not part of equality or repr
  """
  index: int
  kind: str
  prediction: str
  truth: Any
  skills: tuple
  details: dict = dataclasses.field(default_factory=dict)
  record: dict | None = dataclasses.field(default=None, repr=False, compare=False)


def _record_kind(record) -> str:
  kind = record.get("kind")
  if kind not in ERROR_KINDS:
    raise ValueError(f"record {record.get('index')!r} has kind {kind!r}; valid: {', '.join(ERROR_KINDS)}")
  return ERROR_KINDS[kind]


def judge(record: dict, prediction: str) -> ErrorRecord | None:
  """The ErrorRecord of `prediction` for `record`, or None when it is right."""
  kind = _record_kind(record)
  skills = tuple(record.get("skills", ()))
  index = int(record.get("index", -1))
  if kind == "vqa":
    if normalise_answer(prediction) == normalise_answer(record["response"]):
      return None
    skill = skills[0] if skills else None
    return ErrorRecord(index, kind, str(prediction), record["response"], skills,
                       {"question": record.get("prompt"), "skill": skill}, record)
  facts = [tuple(f) for f in record["facts"]]
  metrics = captions.caption_metrics(prediction, facts, kind)
  if not (metrics["n_missing"] or metrics["n_invented"]):
    return None
  return ErrorRecord(index, kind, str(prediction), facts, skills, metrics, record)


def collect_errors(records, predictions) -> list[ErrorRecord]:
  """ErrorRecords of the wrong predictions, in record order.

  records: shapes-style dicts (keys `kind`, `index`, `facts` / `response`, `skills`, ...);
  predictions: one string per record.
  """
  records, predictions = list(records), list(predictions)
  if len(records) != len(predictions):
    raise ValueError(f"collect_errors got {len(records)} records but {len(predictions)} predictions")
  out = []
  for record, prediction in zip(records, predictions):
    error = judge(record, prediction)
    if error is not None:
      out.append(error)
  return out


class Teacher(Protocol):
  """Names the skills whose lack explains one error: {skill: weight >= 0}, skills from
  shapes.SKILLS. A teacher may also define `missing_skills_batch(errors) -> [dict]`, which
  `gap_profile` prefers (one model call for all errors instead of one per error)."""

  def missing_skills(self, error: ErrorRecord) -> dict[str, float]:
    ...


def order_skills(skills, vocab=shapes.SKILLS) -> list[str]:
  """`skills` in a stable order: vocabulary order first, then any others by name."""
  rank = {s: i for i, s in enumerate(vocab)}
  return sorted(set(skills), key=lambda s: (rank.get(s, len(rank)), str(s)))


def teach(errors, teacher) -> list[dict[str, float]]:
  """The teacher's {skill: weight} of each error, batched when the teacher can."""
  errors = list(errors)
  batch = getattr(teacher, "missing_skills_batch", None)
  out = list(batch(errors)) if batch is not None else [teacher.missing_skills(e) for e in errors]
  if len(out) != len(errors):
    raise ValueError(f"teacher returned {len(out)} skill dicts for {len(errors)} errors")
  return out


def gap_profile(errors, teacher) -> dict[str, float]:
  """{skill: share of the total error weight}, summing to 1; {} when there is no weight.

  Skills with zero weight are left out; keys are in `order_skills` order so the profile
  (and anything seeded from it) does not depend on the order errors were found in.
  """
  totals: dict[str, float] = {}
  for weights in teach(errors, teacher):
    for skill, w in weights.items():
      w = float(w)
      if not w >= 0:  # also catches NaN
        raise ValueError(f"teacher gave skill {skill!r} the weight {w}; weights must be >= 0")
      totals[skill] = totals.get(skill, 0.0) + w
  total = sum(totals.values())
  if total <= 0:
    return {}
  return {s: totals[s] / total for s in order_skills(totals) if totals[s] > 0}
