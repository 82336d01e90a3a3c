"""Error-driven data selection: errors, teachers, gap profiles, retrieval under a budget."""
import json
import os

import numpy as np
import pytest

from mmjax.data import shapes
from mmjax.evals import captions
from mmjax.select import gaps, retrieve, teachers

TRUE = "a large red circle at the top left. a small blue square at the center."
FACTS = [("object", "red", "circle", "large", "top left"),
         ("object", "blue", "square", "small", "center")]
VIDEO = ("first a red circle appears at the top left, then the red circle moves to the center, "
         "then a blue square appears at the right, then the red circle disappears from the center.")
EVENTS = [("event", 1, "appears", "red", "circle", "top left"),
          ("event", 2, "moves", "red", "circle", "center"),
          ("event", 3, "appears", "blue", "square", "right"),
          ("event", 4, "disappears", "red", "circle", "center")]
QA = [("how many circles are there?", "1", "count"), ("what colour is the square?", "blue", "colour"),
      ("what shape is the object at the top left?", "circle", "shape")]


def image_record(index=0):
  return {"kind": "image_caption", "index": index, "prompt": shapes.IMAGE_PROMPT, "response": TRUE,
          "facts": FACTS, "qa": QA, "skills": shapes.CAPTION_SKILLS}


def video_record(index=0):
  return {"kind": "video_caption", "index": index, "prompt": shapes.VIDEO_PROMPT, "response": VIDEO,
          "facts": EVENTS, "qa": [], "skills": shapes.VIDEO_SKILLS}


def vqa_record(question, answer, skill, index=0):
  return {"kind": "vqa", "index": index, "prompt": question, "response": answer, "facts": FACTS,
          "qa": QA, "skills": (skill,)}


def teach_one(record, prediction):
  error = gaps.judge(record, prediction)
  assert error is not None, prediction
  return teachers.FactTeacher().missing_skills(error)


def one_line_error(excinfo, *parts):
  text = str(excinfo.value)
  assert "\n" not in text and all(p in text for p in parts), text


# ----------------------------------------------------------------------------- errors


def test_collect_errors():
  records = [image_record(0), image_record(1), vqa_record("what colour is the square?", "blue", "colour", 2),
             vqa_record("how many circles are there?", "1", "count", 3), video_record(4), image_record(5)]
  preds = [TRUE, "a large green circle at the top left. a small blue square at the center.", "  Blue ",
           "2", VIDEO, TRUE + " " + TRUE.split(". ")[1]]  # the last only repeats a fact: not an error
  errors = gaps.collect_errors(records, preds)
  assert [(e.index, e.kind) for e in errors] == [(1, "image"), (3, "vqa")]
  assert errors[0].truth == FACTS and errors[0].details["err_colour"] == 1 and errors[0].record is records[1]
  assert errors[1].truth == "1" and errors[1].prediction == "2" and errors[1].details["skill"] == "count"
  assert errors[1].skills == ("count",)
  with pytest.raises(ValueError) as e:
    gaps.collect_errors(records, preds[:2])
  one_line_error(e, "6 records", "2 predictions")
  with pytest.raises(ValueError, match="kind"):
    gaps.collect_errors([{"kind": "pool", "index": 0}], ["x"])


def test_exact_truth_yields_nothing():
  teacher = teachers.FactTeacher()
  for kind, facts, text in (("image", FACTS, TRUE), ("video", EVENTS, VIDEO)):
    error = gaps.ErrorRecord(0, kind, text, facts, ())
    assert teacher.missing_skills(error) == {}
  records = [shapes.ShapesSource("pool", 12, seed=3, split="eval")[i] for i in range(12)]
  assert {r["kind"] for r in records} >= {"vqa", "image_caption"}
  assert gaps.collect_errors(records, [r["response"] for r in records]) == []
  for r in records:  # a teacher asked anyway about a right caption finds nothing
    if r["kind"] != "vqa":
      kind = "video" if r["kind"] == "video_caption" else "image"
      assert teacher.missing_skills(gaps.ErrorRecord(r["index"], kind, r["response"], r["facts"], r["skills"])) == {}


# ----------------------------------------------------------------------------- FactTeacher


@pytest.mark.parametrize("prediction, expected", [
    ("a large green circle at the top left. a small blue square at the center.", {"colour": 1.0}),
    ("a large red triangle at the top left. a small blue square at the center.", {"shape": 1.0}),
    ("a small red circle at the top left. a small blue square at the center.", {"size": 1.0}),
    ("a large red circle at the top. a small blue square at the center.", {"position": 1.0}),
    ("a large red circle at the top left.", {"count": 1.0}),  # an object left out
    (TRUE + " a small white cross at the bottom.", {"count": 1.0}),  # an object made up
    # the same cell, three attributes wrong: the unit is shared
    ("a small green square at the top left. a small blue square at the center.",
     {"colour": 1 / 3, "shape": 1 / 3, "size": 1 / 3}),
    # one colour wrong and one object left out
    ("a large green circle at the top left.", {"colour": 0.5, "count": 0.5}),
    ("nothing to see here.", {"count": 1.0}),  # every object missed
])
def test_fact_teacher_image(prediction, expected):
  got = teach_one(image_record(), prediction)
  assert got == pytest.approx(expected) and list(got) == [s for s in shapes.SKILLS if s in expected]
  assert sum(got.values()) == pytest.approx(1.0)
  m = captions.caption_metrics(prediction, FACTS)  # one-off pairs agree with the metrics
  for skill in captions.ATTRIBUTE_SKILLS:
    if m[f"err_{skill}"]:
      assert skill in got


SWAPPED = ("first a red circle appears at the top left, then a blue square appears at the right, "
           "then the red circle moves to the center, then the red circle disappears from the center.")


@pytest.mark.parametrize("prediction, expected", [
    (SWAPPED, {"temporal_order": 1.0}),
    (VIDEO.replace("moves to the center", "moves to the bottom"), {"position": 1.0}),
    (VIDEO.replace("a blue square", "a green square"), {"colour": 1.0}),
    (VIDEO.replace("disappears from the center", "moves to the bottom"), {"position": 1.0}),  # verb
    (VIDEO.replace(", then a blue square appears at the right", ""), {"count": 1.0}),
])
def test_fact_teacher_video(prediction, expected):
  got = teach_one(video_record(), prediction)
  assert got == pytest.approx(expected)
  if "temporal_order" in expected:
    assert captions.caption_metrics(prediction, EVENTS, "video")["err_temporal_order"] == 1


def test_fact_teacher_vqa_and_unparsed():
  assert teach_one(vqa_record("what colour is the square?", "blue", "colour"), "red") == {"colour": 1.0}
  # right facts plus gibberish: an error nothing in the facts explains -> the example's tags
  got = teach_one(image_record(), TRUE + " qwerty zz.")
  assert got == pytest.approx({s: 1 / len(shapes.CAPTION_SKILLS) for s in shapes.CAPTION_SKILLS})


def test_gap_profile():
  records = [image_record(0), image_record(1), image_record(2), vqa_record("how many circles are there?", "1",
                                                                          "count", 3), image_record(4)]
  preds = ["a large green circle at the top left. a small blue square at the center.",  # colour
           "a small blue square at the center.",  # count (red circle left out)
           "a large red circle at the top. a small blue square at the center.",  # position
           "3",  # count
           TRUE]  # right
  errors = gaps.collect_errors(records, preds)
  assert len(errors) == 4
  profile = gaps.gap_profile(errors, teachers.FactTeacher())
  assert profile == pytest.approx({"colour": 0.25, "position": 0.25, "count": 0.5})
  assert list(profile) == ["colour", "position", "count"]  # shapes.SKILLS order
  assert gaps.gap_profile(errors[::-1], teachers.FactTeacher()) == profile  # order-free
  assert gaps.gap_profile([], teachers.FactTeacher()) == {}

  class Bad:
    def missing_skills(self, error):
      return {"colour": -1.0}
  with pytest.raises(ValueError, match="weight"):
    gaps.gap_profile(errors, Bad())


# ----------------------------------------------------------------------------- ModelTeacher


def test_model_teacher():
  calls = {"teacher": 0, "student": 0}
  truth = {q: a for q, a, _ in QA}

  def teacher_fn(pairs):
    calls["teacher"] += 1
    assert all(isinstance(r, dict) and isinstance(q, str) for r, q in pairs)
    return [truth[q] if q != "what shape is the object at the top left?" else "square" for _, q in pairs]

  def student_fn(pairs):  # wrong on colour and on shape; right on count
    calls["student"] += 1
    return [{"count": " 1 ", "colour": "red", "shape": "triangle"}[dict((x, s) for x, _, s in QA)[q]]
            for _, q in pairs]

  records = [image_record(0), image_record(1)]
  errors = gaps.collect_errors(records, ["a large red circle at the top left.", "a large red circle at the top."])
  teacher = teachers.ModelTeacher(teacher_fn, student_fn)
  # shape: the teacher is wrong too, so it is not the student's gap; count: the student is right
  assert teacher.missing_skills(errors[0]) == {"colour": 1.0}
  assert calls == {"teacher": 1, "student": 1}
  assert gaps.gap_profile(errors, teacher) == {"colour": 1.0}
  assert calls == {"teacher": 2, "student": 2}  # one batched call each for all errors

  # no known answers: a skill is missing where teacher and student disagree
  unknown = teachers.ModelTeacher(teacher_fn, student_fn, questions_fn=lambda r: [(q, s) for q, _, s in r["qa"]])
  assert unknown.missing_skills(errors[0]) == pytest.approx({"colour": 0.5, "shape": 0.5})
  agree = teachers.ModelTeacher(student_fn, student_fn)
  assert agree.missing_skills(errors[0]) == {}
  short = teachers.ModelTeacher(lambda pairs: ["1"], student_fn)
  with pytest.raises(ValueError) as e:
    short.missing_skills(errors[0])
  one_line_error(e, "teacher", "1 of 3")


# ----------------------------------------------------------------------------- retrieval


def test_allocate():
  assert retrieve.allocate({"colour": 0.5, "shape": 0.3, "size": 0.2}, 7) == {"colour": 4, "shape": 2, "size": 1}
  assert retrieve.allocate({"colour": 1, "shape": 1, "size": 1}, 10) == {"colour": 4, "shape": 3, "size": 3}
  got = retrieve.allocate({"count": 0.1, "colour": 0.7, "position": 0.2, "size": 0.0}, 1000)
  assert got == {"colour": 700, "position": 200, "count": 100}
  assert sum(retrieve.allocate({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 100).values()) == 100


def toy_pool():
  # 10 colour items, 10 shape items, 2 size items, 3 untagged (position, not asked for)
  return [("colour",)] * 10 + [("shape",)] * 10 + [("size",)] * 2 + [("position",)] * 3


def tally(pool, indices):
  out = {}
  for i in indices:
    for s in pool[i]:
      out[s] = out.get(s, 0) + 1
  return out


def test_select_by_skills_allocation_and_spill():
  pool, profile = toy_pool(), {"colour": 0.4, "shape": 0.4, "size": 0.2}
  got = retrieve.select_by_skills(pool, profile, 10, seed=0)
  assert got.dtype == np.int64 and len(set(got.tolist())) == 10
  assert tally(pool, got) == {"colour": 4, "shape": 4, "size": 2}
  # size has only 2 items: its other 2 go to colour and shape by weight
  got = retrieve.select_by_skills(pool, profile, 20, seed=0)
  assert len(set(got.tolist())) == 20 and tally(pool, got) == {"colour": 9, "shape": 9, "size": 2}
  # the tagged items run out: the rest comes from the remaining pool
  got = retrieve.select_by_skills(pool, {"size": 1.0}, 5, seed=0)
  assert len(set(got.tolist())) == 5 and set(got[:2].tolist()) == {20, 21}
  got = retrieve.select_by_skills(pool, {}, 7, seed=0)  # no gap: uniform
  assert len(set(got.tolist())) == 7
  assert len(retrieve.select_by_skills(pool, profile, 0, seed=0)) == 0
  with pytest.raises(ValueError) as e:
    retrieve.select_by_skills(pool, profile, 26, seed=0)
  one_line_error(e, "26", "25")


def test_select_by_skills_no_duplicates_and_seeds():
  rng = np.random.default_rng(0)
  pool = [tuple(rng.choice(shapes.SKILLS, size=rng.integers(1, 4), replace=False)) for _ in range(200)]
  profile = {"colour": 0.5, "temporal_order": 0.3, "count": 0.2}
  a = retrieve.select_by_skills(pool, profile, 60, seed=1)
  assert len(a) == 60 and len(set(a.tolist())) == 60
  assert np.array_equal(a, retrieve.select_by_skills(pool, profile, 60, seed=1))
  assert not np.array_equal(a, retrieve.select_by_skills(pool, profile, 60, seed=2))
  full = retrieve.select_by_skills(pool, profile, 200, seed=1)
  assert sorted(full.tolist()) == list(range(200))
  ex = retrieve.select_by_skills(pool, profile, 50, seed=1, exclude=a.tolist())
  assert len(set(ex.tolist())) == 50 and not set(ex.tolist()) & set(a.tolist())


def test_select_by_skills_coverage_takes_records_that_need_more_of_the_gap_first():
  """rank='coverage': a question needing three missing skills before one needing one; ties and
  everything else as with rank='random' (the same budget per skill, distinct, seeded)."""
  rng = np.random.default_rng(0)
  plain = [("existence", "position")] * 60  # the common kind: one missing skill (position)
  target = [("colour", "position", "shape", "size")] * 10  # the rare kind: all four
  pool = plain[:30] + target + plain[30:]
  profile = {"position": 0.4, "colour": 0.3, "shape": 0.2, "size": 0.1}
  assert retrieve.coverage(target[0], profile) == pytest.approx(1.0)
  assert retrieve.coverage(("position", "position"), profile) == pytest.approx(0.4)  # distinct tags
  got = retrieve.select_by_skills(pool, profile, 12, seed=3, rank="coverage")
  assert len(set(got.tolist())) == 12 and set(range(30, 40)) <= set(got.tolist())  # every target record
  rand = retrieve.select_by_skills(pool, profile, 12, seed=3)
  assert len(set(rand.tolist()) & set(range(30, 40))) < 10  # the seeded random order does not
  assert np.array_equal(got, retrieve.select_by_skills(pool, profile, 12, seed=3, rank="coverage"))
  assert not np.array_equal(got, retrieve.select_by_skills(pool, profile, 12, seed=4, rank="coverage"))
  pool = [tuple(rng.choice(shapes.SKILLS, size=rng.integers(1, 4), replace=False)) for _ in range(200)]
  full = retrieve.select_by_skills(pool, {"colour": 0.5, "count": 0.5}, 200, seed=1, rank="coverage")
  assert sorted(full.tolist()) == list(range(200))
  with pytest.raises(ValueError) as e:
    retrieve.select_by_skills(pool, profile, 5, rank="best")
  one_line_error(e, "rank='best'", "'coverage'")


def test_nearest_neighbours_matches_numpy():
  rng = np.random.default_rng(0)
  query, pool = rng.normal(size=(5, 8)), rng.normal(size=(37, 8))
  cos = (query / np.linalg.norm(query, axis=1, keepdims=True)) @ (pool / np.linalg.norm(pool, axis=1, keepdims=True)).T
  for k, chunk in ((6, 8), (37, 5), (1, 100), (4, 37)):
    scores, idx = retrieve.nearest_neighbours(query, pool, k, chunk=chunk)
    want = np.argsort(-cos, axis=1, kind="stable")[:, :k]
    assert np.array_equal(np.asarray(idx), want), (k, chunk)
    np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(cos, want, 1), atol=1e-5)
  with pytest.raises(ValueError) as e:
    retrieve.nearest_neighbours(query, pool, 38)
  one_line_error(e, "38", "37")


def one_hot_pool():
  # 4 groups of 3 along the axes; item 3g + j is e_g + 0.1 j e_{g+1}: within a group the
  # cosine to e_g falls with j, so every neighbour list is known
  pool = np.zeros((12, 4), np.float32)
  for i in range(12):
    g, j = divmod(i, 3)
    pool[i, g] = 1.0
    pool[i, (g + 1) % 4] = 0.1 * j
  return pool


def test_select_by_embedding_round_robin():
  pool, eye = one_hot_pool(), np.eye(4, dtype=np.float32)
  failed = eye[[0, 2]]
  assert retrieve.select_by_embedding(failed, pool, 4).tolist() == [0, 6, 1, 7]
  assert retrieve.select_by_embedding(failed, pool, 7).tolist() == [0, 6, 1, 7, 2, 8, 11]
  # four identical queries exhaust their short lists: deepened, same as one query's ranking
  got = retrieve.select_by_embedding(eye[[0, 0, 0, 0]], pool, 8, chunk=5)
  assert got.tolist() == [0, 1, 2, 11, 10, 3, 4, 5]
  assert sorted(retrieve.select_by_embedding(failed, pool, 12).tolist()) == list(range(12))
  with pytest.raises(ValueError) as e:
    retrieve.select_by_embedding(failed, pool, 13)
  one_line_error(e, "13", "12")


def test_select_mix():
  pool_emb, eye = one_hot_pool(), np.eye(4, dtype=np.float32)
  pool_skills = [("colour",)] * 6 + [("shape",)] * 6
  profile = {"colour": 0.5, "shape": 0.5}
  got = retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 6, seed=0, mix=0.5)
  assert got[:3].tolist() == [0, 1, 2]  # by embedding (round(0.5 * 6) = 3)
  assert len(set(got.tolist())) == 6 and not set(got[3:].tolist()) & {0, 1, 2}
  assert np.array_equal(got, retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 6, seed=0, mix=0.5))
  assert len(retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 5, seed=0, mix=0.5)) == 5
  got = retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 12, seed=3, mix=0.25)
  assert got[:3].tolist() == [0, 1, 2] and sorted(got.tolist()) == list(range(12))
  only_skills = retrieve.select(pool_skills, pool_emb, np.zeros((0, 4)), profile, 4, seed=0)
  assert np.array_equal(only_skills, retrieve.select_by_skills(pool_skills, profile, 4, seed=0))
  assert np.array_equal(retrieve.select(pool_skills, None, None, profile, 4, seed=0, mix=0.0), only_skills)
  a = retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 8, seed=0, mix=0.25)
  b = retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 8, seed=1, mix=0.25)
  assert not np.array_equal(a, b) and np.array_equal(a[:2], b[:2])
  with pytest.raises(ValueError) as e:
    retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 20, seed=0)
  one_line_error(e, "20", "12")
  with pytest.raises(ValueError, match="mix"):
    retrieve.select(pool_skills, pool_emb, eye[[0]], profile, 4, mix=1.5)


def test_select_random():
  a = retrieve.select_random(100, 30, seed=0)
  assert len(set(a.tolist())) == 30 and a.min() >= 0 and a.max() < 100
  assert np.array_equal(a, retrieve.select_random(100, 30, seed=0))
  assert not np.array_equal(a, retrieve.select_random(100, 30, seed=1))
  with pytest.raises(ValueError) as e:
    retrieve.select_random(10, 11, seed=0)
  one_line_error(e, "11", "10")
  with pytest.raises(ValueError, match="integer"):
    retrieve.select_random(10, 2.5)


def test_selection_file(tmp_path):
  path = tmp_path / "sel" / "selection.json"
  retrieve.write_selection(path, np.array([5, 3, 9]), {"method": "skills", "budget": 3})
  idx, meta = retrieve.read_selection(path)
  assert idx.tolist() == [5, 3, 9] and idx.dtype == np.int64 and meta == {"method": "skills", "budget": 3}
  retrieve.write_selection(path, [1], None)  # replaced whole
  assert retrieve.read_selection(path)[0].tolist() == [1]
  assert os.listdir(path.parent) == ["selection.json"]  # no temporary file left
  assert json.loads(path.read_text())["indices"] == [1]
  (tmp_path / "bad.json").write_text("[1, 2]")
  with pytest.raises(ValueError, match="not a selection"):
    retrieve.read_selection(tmp_path / "bad.json")


def _errordriven(arg="scale=0.02,budgets=24,pool=96"):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", "configs/shapes_errordriven.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.mark.parametrize("key,value,match", [
    ("stages.errors_24.select.method", "best", r"config.select.method='best' is not valid"),
    ("stages.errors_24.select.teacher", "model", r"teacher_stage='' names no earlier stage"),
    ("stages.random_24.select.budget", 0, r"config.select.budget=0 must be > 0"),
    ("stages.errors_24.select.rank", "best", r"config.select.rank='best' is not valid; choose one of 'random', "),
    ("select.pool.tsk", "vqa", r"config.select.pool.tsk is not a data key"),
    ("select.pool.pool_mix", (("vqa", 1.0), ("video_caption", 1.0)), r"config.select.pool: data.pool_mix="),
])
def test_select_config_errors_are_one_line(key, value, match):
  from mmjax.config import core, schema
  c = _errordriven()
  node = c
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(core.ConfigError, match=match) as e:
    schema.validate(c, 1)
  assert "\n" not in str(e.value) and str(e.value).startswith("stage '")


def test_probe_questions_ask_every_kind_about_a_failed_image():
  from mmjax.recipes import select as recipe
  rec = shapes.ShapesSource("vqa", 4, cfg=shapes.ShapesConfig(qa_skills=("colour",)))[2]
  qs = recipe.probe_questions(rec)
  assert [q[2] for q in qs] == list(shapes.QA_SKILLS) and qs == recipe.probe_questions(rec)
  video = shapes.ShapesSource("video_caption", 2)[0]
  assert recipe.probe_questions(video) == []


def test_validation_records_are_disjoint_from_the_test_records():
  """The student's validation questions (which steer the selection) are eval-split records
  after the test set, none equal to a test record; too small an eval split is a config error."""
  from mmjax.config import core, schema
  from mmjax.evals import generation
  config = _errordriven("scale=0.02,budgets=24,pool=96,val=32,eval=64")
  cfg = core.stage_config(config, "errors_24")
  test = generation.eval_records(cfg.data, cfg.sample_eval.num_examples)
  val = generation.validation_records(cfg, cfg.select.val_examples, "config.select.val_examples")
  assert len(test) == 64 and len(val) == 32
  test_keys = {generation.content_key(r) for r in test}
  assert not test_keys & {generation.content_key(r) for r in val}
  assert not {r["index"] for r in test} & {r["index"] for r in val}
  config.data.num_eval_examples = 80
  with pytest.raises(core.ConfigError, match="num_eval_examples=80 must hold the test records"):
    schema.validate(config, 1)


# ----------------------------------------------------------------------------- stepped answers

SCENE = [("object", "red", "square", "large", "top left"),
         ("object", "blue", "square", "small", "center"),
         ("object", "red", "circle", "large", "right")]
Q_COLOUR = "what colour is the large square?"
A_COLOUR = "the large square is at the top left. the colour is red."


def test_stepped_answers_parse():
  assert shapes.reasoning_answer("the large square", "top left", "colour", "red") == A_COLOUR
  assert shapes.parse_reasoning(A_COLOUR) == {"ref": "the large square", "position": "top left",
                                              "skill": "colour", "value": "red"}
  assert shapes.parse_reasoning("The  large square is at the top left.  the colour is red") is not None
  assert shapes.parse_reasoning("the colour is red.") == {"ref": None, "position": None, "skill": "colour",
                                                          "value": "red"}
  assert shapes.parse_reasoning("red") is None and shapes.parse_reasoning("the large square is red.") is None
  assert shapes.final_answer(A_COLOUR) == "red" and shapes.final_answer(" Red ") == "red"
  cfg = shapes.ShapesConfig(qa_skills=shapes.REASONING_SKILLS, qa_reasoning=shapes.REASONING_SKILLS)
  for r in (shapes.ShapesSource("vqa", 60, cfg=cfg)[i] for i in range(60)):  # every generated answer parses
    steps = shapes.parse_reasoning(r["response"])
    target = next(f for f in r["facts"] if f[4] == steps["position"])
    assert steps["skill"] == r["skills"][0] and steps["value"] == target[{"colour": 1, "shape": 2, "size": 3}[
        steps["skill"]]] and r["prompt"] == f"what {steps['skill']} is {steps['ref']}?"


@pytest.mark.parametrize("question,truth,prediction,expected", [
    # wrong object found: the reference attribute in which it differs from the true one
    (Q_COLOUR, A_COLOUR, "the large square is at the center. the colour is blue.", ("locate", {"size": 1.0})),
    # the right final answer reached through a wrong step is still an error of that step
    (Q_COLOUR, A_COLOUR, "the large square is at the right. the colour is red.", ("locate", {"shape": 1.0})),
    # nothing at the stated cell, or no first step at all: every reference attribute
    (Q_COLOUR, A_COLOUR, "the large square is at the bottom. the colour is red.",
     ("locate", {"shape": 0.5, "size": 0.5})),
    (Q_COLOUR, A_COLOUR, "red", ("locate", {"shape": 0.5, "size": 0.5})),
    # right object, wrong reading: the asked skill
    (Q_COLOUR, A_COLOUR, "the large square is at the top left. the colour is blue.", ("read", {"colour": 1.0})),
    ("what shape is the object at the right?", "the object at the right is at the right. the shape is circle.",
     "the object at the right is at the center. the shape is square.", ("locate", {"position": 1.0})),
    (Q_COLOUR, A_COLOUR, A_COLOUR, None),
])
def test_first_wrong_step(question, truth, prediction, expected):
  assert teachers.first_wrong_step(prediction, question, truth, SCENE) == expected
  record = {"kind": "vqa", "index": 0, "prompt": question, "response": truth, "facts": SCENE, "qa": [],
            "skills": shapes.question_skills(question, shapes.parse_reasoning(truth)["skill"])}
  error = gaps.judge(record, prediction)
  if expected is None:
    assert error is None
  else:
    assert teachers.FactTeacher().missing_skills(error) == expected[1] and error.details["step"] == expected[0]


def test_model_teacher_marks_the_first_step_leaving_its_own_answer():
  record = {"kind": "vqa", "index": 3, "prompt": Q_COLOUR, "response": A_COLOUR, "facts": SCENE, "qa": [],
            "skills": ("colour", "shape", "size")}
  asked = []

  def teacher_fn(pairs):
    asked.extend(q for _, q in pairs)
    return [A_COLOUR for _ in pairs]

  def student_fn(pairs):
    raise AssertionError("a stepped answer needs no student call")

  teacher = teachers.ModelTeacher(teacher_fn, student_fn)
  read = gaps.judge(record, "the large square is at the top left. the colour is blue.")
  locate = gaps.judge(record, "the large square is at the center. the colour is blue.")
  assert teacher.missing_skills_batch([read, locate]) == [{"colour": 1.0}, {"shape": 0.5, "size": 0.5}]
  assert asked == [Q_COLOUR, Q_COLOUR] and read.details["step"] == "read" and locate.details["step"] == "locate"
  assert teachers.ModelTeacher(lambda pairs: ["i do not know"] * len(pairs), student_fn).missing_skills(read) == {}


def _weak_student(record, weak: str, rng) -> str:
  """A simulated student that confuses objects differing in `weak` and misreads `weak`
  half the time, and makes a few (3%) random reading slips on anything else."""
  truth = shapes.parse_reasoning(record["response"])
  refs = record["skills"][1:]
  fields = {"colour": 1, "shape": 2, "size": 3}
  vocab = {"colour": shapes.COLOURS, "shape": ("square", "circle", "triangle"), "size": shapes.SIZES}
  target = next(f for f in record["facts"] if f[4] == truth["position"])
  ref, position, value = truth["ref"], truth["position"], truth["value"]
  confusable = [f for f in record["facts"] if f is not target and f[fields[weak]] != target[fields[weak]]
                and all(f[fields[s]] == target[fields[s]] for s in refs if s != weak and s in fields)]
  if weak in refs and confusable and rng.random() < 0.5:
    found = confusable[0]
    position, value = found[4], found[fields[truth["skill"]]]
  elif truth["skill"] == weak and rng.random() < 0.5 or rng.random() < 0.03:
    value = next(v for v in vocab[truth["skill"]] if v != value)
  return shapes.reasoning_answer(ref, position, truth["skill"], value)


@pytest.mark.parametrize("weak", shapes.REASONING_SKILLS)
def test_gap_profile_finds_the_one_weak_skill(weak):
  """A student weak at exactly one of three target skills: the profile built from the first
  wrong steps puts at least 0.6 on that skill."""
  import random
  cfg = shapes.ShapesConfig(qa_skills=shapes.REASONING_SKILLS, qa_reasoning=shapes.REASONING_SKILLS,
                            min_objects=2, max_objects=4)
  src = shapes.ShapesSource("vqa", 300, cfg=cfg)
  records = [src[i] for i in range(300)]
  rng = random.Random(weak)
  errors = gaps.collect_errors(records, [_weak_student(r, weak, rng) for r in records])
  profile = gaps.gap_profile(errors, teachers.FactTeacher())
  assert len(errors) > 30 and profile[weak] >= 0.6, profile


def test_budgets_are_the_papers_fractions_of_the_pool():
  config = _errordriven("")
  assert [config.stages[n].select.budget for n in config.stage_order if n.startswith("errors_")] == [30, 90, 300]
  assert [n for n in config.stage_order if n.startswith("random_")] == ["random_30", "random_90", "random_300"]
  assert _errordriven("pool=2000,fractions=1-10").stage_order[1:] == ("errors_20", "random_20", "errors_200",
                                                                     "random_200", "full")
  assert _errordriven("budgets=24,pool=96").stages.errors_24.select.budget == 24  # explicit counts


def test_selections_train_to_the_same_number_of_passes():
  from mmjax.config import core
  from mmjax.recipes import select as recipe
  config = _errordriven("pool=1000,fractions=1-10,epochs=4,min_steps=20")
  steps = {n: recipe.stage_steps(core.stage_config(config, n)) for n in config.stage_order[1:]}
  assert steps == {"errors_10": 20, "random_10": 20, "errors_100": 25, "random_100": 25, "full": 250}


def test_pool_is_disjoint_from_validation_and_test_and_its_target_skills_are_rare():
  """Pool records come from the train split: none equals a test or validation record (question,
  answer and image), and no pool image is a held-out image; target-skill records are rare."""
  from mmjax.config import core
  from mmjax.evals import generation
  from mmjax.recipes import select as recipe
  config = _errordriven("budgets=24,pool=2000,val=32,eval=64")
  cfg = core.stage_config(config, "errors_24")
  held = generation.eval_records(cfg.data, 64) + generation.validation_records(cfg, 32, "config.select.val_examples")
  pool = [p for p in map(recipe.catalog.open_source(recipe.pool_data(cfg), "train").__getitem__, range(2000))]
  assert not {generation.content_key(r) for r in held} & {generation.content_key(r) for r in pool}
  assert not {r["image"].tobytes() for r in held} & {r["image"].tobytes() for r in pool}
  target = sum(bool(set(r["skills"]) & {"colour", "shape", "size"}) for r in pool) / len(pool)
  assert 0.03 < target < 0.08, target
