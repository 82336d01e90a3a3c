"""Teachers: name, for one student error, the skills whose lack explains it.

A teacher maps an `ErrorRecord` to {skill: weight} with skills from `shapes.SKILLS`
(`mmjax.select.gaps.Teacher`). Two are provided:

  FactTeacher()   exact, for the shapes grammar: compares the predicted and true atomic
                  facts of a caption (the matching of `mmjax.evals.captions`), finds the
                  first wrong step of a stepped answer, or takes a short wrong answer's
                  question skill. Weights of an error sum to 1.
  ModelTeacher(teacher_answer_fn, student_answer_fn, questions_fn)
                  asks a stronger model and the student per-skill questions about the
                  failed example; a skill is missing where the teacher is right and the
                  student is wrong (stepped answers: the first step where the student's
                  answer leaves the teacher's). Weights sum to 1, or {} when none is found.

FactTeacher, questions. A question answered in steps (`shapes.reasoning_answer`: locate the
object, then read the asked attribute) costs its unit at the first wrong step
(`first_wrong_step`): locating the wrong object goes to the reference attributes in which
the object found differs from the true one, reading goes to the asked skill. A short answer
costs its unit to the skill asked. The model teacher marks the first step in which the
student's stepped answer differs from its own answer to the same question.

FactTeacher, captions. The prediction is parsed and matched as `caption_metrics` does
(images: a multiset of objects; videos: in order, by the longest common subsequence of
(verb, colour, shape, position), step numbers ignored; a repeated item is neither matched
nor invented). Each mismatch then costs one unit, given to a skill:

  temporal_order  videos: a true event that is stated but out of order
  colour / shape / size / position
                  an invented fact that equals a missed true fact but in that one
                  attribute (paired greedily, each true fact once, as `caption_metrics`'s
                  err_* counts)
  (shared)        images: an invented and a missed object in the same cell that differ in
                  several of colour / shape / size: the unit is shared among those;
                  videos: an invented and a missed event of the same object (colour, shape)
                  with another verb and position: 'position' (where and how it moved)
  count           any other missed object / event (left out) or invented one (made up)

Unparseable text costs nothing when there is any fact error; an error made only of
unparseable text (nothing the facts can explain) spreads its unit evenly over the
example's skill tags. Units are normalised to sum 1 per error.
"""
from __future__ import annotations

import collections

from mmjax.data import shapes
from mmjax.evals import captions
from mmjax.select.gaps import ErrorRecord, normalise_answer, order_skills

_IMAGE_FIELDS = {"colour": 1, "shape": 2, "size": 3, "position": 4}  # in ("object", c, s, z, p)
_VIDEO_FIELDS = {"colour": 1, "shape": 2, "position": 3}  # in (verb, colour, shape, position)


def match_facts(prediction: str, truth, kind: str) -> dict:
  """How a caption's parsed facts meet the truth, as `caption_metrics` counts them.

  Returns {"missed": [true items], "invented": [predicted items], "out_of_order": [items],
  "unparsed": [spans]}: images as object facts, videos as (verb, colour, shape, position)
  keys (out_of_order: events stated but outside the in-order match; empty for images).
  """
  m = captions.match_facts(prediction, truth, kind)
  return {"missed": m["missed"], "invented": m["invented"], "out_of_order": m["out_of_order"],
          "unparsed": sorted(set(m["unparsed"]))}


def _caption_units(match: dict, kind: str) -> dict[str, float]:
  """Unnormalised skill units of one caption's mismatches (see the module docstring)."""
  units: dict[str, float] = collections.defaultdict(float)
  units["temporal_order"] += len(match["out_of_order"])
  missed, invented = list(match["missed"]), []
  fields = _IMAGE_FIELDS if kind == "image" else _VIDEO_FIELDS
  for p in match["invented"]:  # one attribute off: the same greedy pairing as caption_metrics
    for t in missed:
      skill = captions.one_off(p, t, fields)
      if skill:
        units[skill] += 1
        missed.remove(t)
        break
    else:
      invented.append(p)
  # The same object, several things wrong: images by cell (one object per cell), videos by
  # (colour, shape) (distinct per object in a video).
  same = (lambda p, t: p[4] == t[4]) if kind == "image" else (lambda p, t: p[1:3] == t[1:3])
  left = []
  for p in invented:
    t = next((t for t in missed if same(p, t)), None)
    if t is None:
      left.append(p)
      continue
    missed.remove(t)
    if kind == "image":
      diff = [s for s in ("colour", "shape", "size") if p[_IMAGE_FIELDS[s]] != t[_IMAGE_FIELDS[s]]]
      for s in diff:
        units[s] += 1 / len(diff)
    else:
      units["position"] += 1
  units["count"] += len(missed) + len(left)
  return {s: w for s, w in units.items() if w > 0}


def _normalised(units: dict) -> dict[str, float]:
  total = sum(units.values())
  return {s: units[s] / total for s in order_skills(units)} if total > 0 else {}


def _even(skills) -> dict[str, float]:
  skills = order_skills(skills)
  return {s: 1 / len(skills) for s in skills}


def first_wrong_step(prediction: str, question: str, response: str, facts=None):
  """The first wrong step of a stepped answer (`shapes.reasoning_answer`) and the skills it
  needs: ("locate", {skill: w}) or ("read", {skill: 1.0}); None when every step is right
  (or `response` is not stepped).

  locate  the first step (which object, where) differs from the truth, or does not parse:
          with `facts` (the image's objects) and an object at the stated position, the
          question's reference attributes (`shapes.question_skills` after the asked one) in
          which that object differs from the true one; otherwise all reference attributes
          evenly (the object was not found, or its attributes are unknown);
  read    the object is right but the asked attribute or its value is wrong: the asked skill.
  """
  truth = shapes.parse_reasoning(response)
  if truth is None or truth["position"] is None:
    return None
  ref_skills = shapes.question_skills(question, truth["skill"])[1:] or (truth["skill"],)
  pred = shapes.parse_reasoning(prediction)
  if pred is None or (pred["ref"], pred["position"]) != (truth["ref"], truth["position"]):
    objects = {f[4]: f for f in facts or () if f and f[0] == "object"}
    found, target = objects.get(pred and pred["position"]), objects.get(truth["position"])
    diff = [s for s in ref_skills if found and target and found[_IMAGE_FIELDS[s]] != target[_IMAGE_FIELDS[s]]]
    return "locate", _even(diff or ref_skills)
  if (pred["skill"], pred["value"]) != (truth["skill"], truth["value"]):
    return "read", {truth["skill"]: 1.0}
  return None


class FactTeacher:
  """The exact atomic-fact teacher for shapes (see the module docstring)."""

  def missing_skills(self, error: ErrorRecord) -> dict[str, float]:
    """{skill: weight} summing to 1 ({} when the prediction has no error)."""
    if error.kind == "vqa":
      record = error.record or {}
      step = first_wrong_step(error.prediction, error.details.get("question") or "", str(error.truth),
                              record.get("facts"))
      if step is not None:
        error.details["step"] = step[0]
        return _normalised(step[1])
      skill = error.details.get("skill") or (error.skills[0] if error.skills else None)
      return {skill: 1.0} if skill else {}
    if error.kind not in captions.KINDS:
      raise ValueError(f"FactTeacher: error kind {error.kind!r} is unknown; valid: image, video, vqa")
    match = match_facts(error.prediction, error.truth, error.kind)
    units = _caption_units(match, error.kind)
    if not units and match["unparsed"] and error.skills:
      units = {s: 1.0 for s in error.skills}  # wrong, but nothing the facts can explain
    return _normalised(units)


def record_questions(record: dict) -> list[tuple]:
  """The shapes questions of a record: its `qa` list of (question, answer, skill)."""
  return [tuple(q) for q in record.get("qa", ())]


class ModelTeacher:
  """Per-skill questions answered by a stronger model and by the student.

  teacher_answer_fn, student_answer_fn: list[(record, question)] -> list[str], one answer
      per pair, called once per batch of errors (the recipe wires them to the sampler of
      the teacher and of the student checkpoint).
  questions_fn: record -> [(question, answer, skill)] or [(question, skill)] (answer
      unknown); default: the shapes record's `qa`.

  For each question: with a known answer, the skill is missing when the teacher's answer
  equals it and the student's does not; without one, when the two answers differ (the
  teacher is trusted). Answers are compared lower-cased with whitespace collapsed. An
  error's weight is the share of its missing questions per skill (sums to 1), {} when
  none is missing (then the teacher cannot explain the error and it adds nothing).
  """

  def __init__(self, teacher_answer_fn, student_answer_fn, questions_fn=record_questions):
    self.teacher_answer_fn = teacher_answer_fn
    self.student_answer_fn = student_answer_fn
    self.questions_fn = questions_fn

  def missing_skills(self, error: ErrorRecord) -> dict[str, float]:
    return self.missing_skills_batch([error])[0]

  def _ask(self, fn, pairs, who):
    if not pairs:
      return []
    answers = list(fn(pairs))
    if len(answers) != len(pairs):
      raise ValueError(f"ModelTeacher: the {who} answered {len(answers)} of {len(pairs)} questions")
    return [normalise_answer(a) for a in answers]

  def missing_skills_batch(self, errors) -> list[dict[str, float]]:
    """{skill: weight} of each error, with one teacher and one student call in all (a
    stepped-answer error: one teacher question, its own, and no student call)."""
    errors = list(errors)
    for error in errors:
      if error.record is None:
        raise ValueError(f"ModelTeacher needs the source record of error {error.index} "
                         "(collect_errors keeps it in ErrorRecord.record)")
    is_stepped = [e.kind == "vqa" and shapes.parse_reasoning(str(e.truth)) is not None for e in errors]
    stepped = iter(self._steps([e for e, st in zip(errors, is_stepped) if st]))
    probed = iter(self._probe([e for e, st in zip(errors, is_stepped) if not st]))
    return [next(stepped) if st else next(probed) for st in is_stepped]

  def _steps(self, errors) -> list[dict[str, float]]:
    """Stepped answers: the teacher answers the same question; the student's first step that
    differs from the teacher's names the skills (`first_wrong_step` with the teacher's
    answer as the truth and no facts: a wrong locate step spreads over the reference
    attributes). {} when the teacher's answer is not stepped or equals the student's."""
    questions = [e.details.get("question") or e.record.get("prompt") for e in errors]
    answers = self._ask(self.teacher_answer_fn, [(e.record, q) for e, q in zip(errors, questions)], "teacher")
    out = []
    for e, q, t in zip(errors, questions, answers):
      step = first_wrong_step(e.prediction, q, t)
      if step is not None:
        e.details["step"] = step[0]
      out.append(_normalised(step[1]) if step else {})
    return out

  def _probe(self, errors) -> list[dict[str, float]]:
    """Other errors: per-skill probe questions to the teacher and the student."""
    owners, pairs, known, skills = [], [], [], []
    for i, error in enumerate(errors):
      for q in self.questions_fn(error.record):
        if len(q) == 3:
          question, answer, skill = q
        elif len(q) == 2:
          (question, skill), answer = q, None
        else:
          raise ValueError(f"questions_fn must give (question, answer, skill) or (question, skill), got {q!r}")
        owners.append(i)
        pairs.append((error.record, question))
        known.append(None if answer is None else normalise_answer(answer))
        skills.append(skill)
    teacher = self._ask(self.teacher_answer_fn, pairs, "teacher")
    student = self._ask(self.student_answer_fn, pairs, "student")
    units = [collections.defaultdict(float) for _ in errors]
    for i, truth, skill, t, s in zip(owners, known, skills, teacher, student):
      missing = (t == truth and s != truth) if truth is not None else t != s
      if missing:
        units[i][skill] += 1
    return [_normalised(u) for u in units]
