"""Caption metrics over atomic facts: parser and hand-written cases."""
import json

import pytest

from mmjax.data import shapes
from mmjax.evals import captions

TRUE = "a large red circle at the top left. a small blue square at the center."
FACTS = [("object", "red", "circle", "large", "top left"),
         ("object", "blue", "square", "small", "center")]
VIDEO = ("first a red circle appears at the top left, then the red circle moves to the center, "
         "then a blue square appears at the right, then the red circle disappears from the center.")
EVENTS = [("event", 1, "appears", "red", "circle", "top left"),
          ("event", 2, "moves", "red", "circle", "center"),
          ("event", 3, "appears", "blue", "square", "right"),
          ("event", 4, "disappears", "red", "circle", "center")]


def test_parse():
  assert captions.parse_caption(TRUE) == (FACTS, [])
  assert captions.parse_caption(VIDEO, "video") == (EVENTS, [])
  text = "  A large red circle at the TOP LEFT.\nqwerty zz. a small blue square at the center"
  facts, unparsed = captions.parse_caption(text, "image")
  assert facts == FACTS and unparsed == ["qwerty zz"]
  text = "first a red circle appears at the top, then the red circle disappears"
  assert captions.parse_caption(text, "video")[0] == [("event", 1, "appears", "red", "circle", "top"),
                                                      ("event", 2, "disappears", "red", "circle", None)]
  assert captions.parse_caption("", "video") == ([], [])
  with pytest.raises(ValueError, match="kind"):
    captions.parse_caption(TRUE, "audio")


def test_caption_equal_to_truth():
  m = captions.caption_metrics(TRUE, FACTS)
  assert m["missing"] == m["hallucination"] == m["repetition"] == 0 and m["exact_match"] == 1
  assert all(m[f"err_{s}"] == 0 for s in captions.ERROR_SKILLS)
  reordered = "a small blue square at the center. a large red circle at the top left."
  assert captions.caption_metrics(reordered, FACTS)["exact_match"] == 1  # images: a set of facts


def test_empty_caption():
  m = captions.caption_metrics("", FACTS)
  assert m["missing"] == 1 and m["hallucination"] == 0 and m["repetition"] == 0 and m["exact_match"] == 0
  assert m["err_count"] == 1 and m["n_pred"] == 0


def test_repeated_sentence():
  m = captions.caption_metrics(TRUE + " a small blue square at the center.", FACTS)
  assert m["repetition"] == pytest.approx(1 / 3) and m["n_repeated"] == 1
  assert m["missing"] == 0 and m["hallucination"] == 0 and m["exact_match"] == 0
  m = captions.caption_metrics("blah blah. blah blah.", FACTS)
  assert m["repetition"] == 0.5 and m["n_invented"] == 1


def test_garbled_text_is_hallucinated():
  m = captions.caption_metrics(TRUE + " the xq zzt flurb.", FACTS)
  assert m["missing"] == 0 and m["hallucination"] == 0.5 and m["n_unparsed"] == 1 and m["exact_match"] == 0
  m = captions.caption_metrics(TRUE + " a large green triangle at the bottom.", FACTS)
  assert m["hallucination"] == 0.5 and m["err_count"] == 1


def test_wrong_colour():
  text = "a large green circle at the top left. a small blue square at the center."
  m = captions.caption_metrics(text, FACTS)
  assert m["n_missing"] == 1 and m["n_invented"] == 1 and m["missing"] == 0.5 and m["hallucination"] == 0.5
  assert m["error"] == 1.0  # the global error rate: missing + hallucination
  assert m["err_colour"] == 1 and m["err_count"] == 0
  assert sum(m[f"err_{s}"] for s in ("shape", "size", "position", "temporal_order")) == 0


@pytest.mark.parametrize("wrong,skill", [("a large red square at the top left.", "shape"),
                                         ("a small red circle at the top left.", "size"),
                                         ("a large red circle at the bottom.", "position")])
def test_wrong_attribute(wrong, skill):
  m = captions.caption_metrics(wrong + " a small blue square at the center.", FACTS)
  assert m[f"err_{skill}"] == 1 and m["n_missing"] == m["n_invented"] == 1
  # two attributes wrong: missing and invented, but no single-attribute error
  text = "a small green circle at the top left. a small blue square at the center."
  m = captions.caption_metrics(text, FACTS)
  assert m["n_missing"] == 1 and sum(m[f"err_{s}"] for s in captions.ATTRIBUTE_SKILLS) == 0


def test_video_order_swapped():
  swapped = ("first a red circle appears at the top left, then a blue square appears at the right, "
             "then the red circle moves to the center, then the red circle disappears from the center.")
  m = captions.caption_metrics(swapped, EVENTS, "video")
  assert m["err_temporal_order"] == 1 and m["n_missing"] == 1 and m["n_invented"] == 1
  assert m["missing"] == 0.25 and m["exact_match"] == 0
  assert captions.caption_metrics(VIDEO, EVENTS, "video")["exact_match"] == 1


def test_video_missing_event_costs_one():
  dropped = ("first a red circle appears at the top left, then a blue square appears at the right, "
             "then the red circle disappears from the center.")
  m = captions.caption_metrics(dropped, EVENTS, "video")
  assert m["n_missing"] == 1 and m["n_invented"] == 0 and m["err_temporal_order"] == 0 and m["err_count"] == 1
  wrong_place = VIDEO.replace("moves to the center", "moves to the bottom")
  m = captions.caption_metrics(wrong_place, EVENTS, "video")
  assert m["err_position"] == 1 and m["n_missing"] == 1 and m["n_invented"] == 1
  looped = VIDEO[:-1] + ", then the red circle moves to the center."
  m = captions.caption_metrics(looped, EVENTS, "video")
  assert m["n_repeated"] == 1 and m["repetition"] == 0.2 and m["hallucination"] == 0


def test_aggregate():
  ms = [captions.caption_metrics(TRUE, FACTS), captions.caption_metrics("", FACTS),
        captions.caption_metrics("a large green circle at the top left.", FACTS)]
  agg = captions.aggregate(ms)
  assert agg["n_examples"] == 3
  assert agg["exact_match"] == pytest.approx(1 / 3)
  assert agg["missing"] == pytest.approx((0 + 1 + 1) / 3)
  assert agg["micro_missing"] == pytest.approx(4 / 6) and agg["micro_hallucination"] == pytest.approx(1 / 6)
  assert agg["error"] == pytest.approx((0 + 1 + 1.5) / 3) and agg["micro_error"] == pytest.approx(5 / 6)
  assert agg["err_colour_rate"] == pytest.approx(1 / 6) and agg["err_count_rate"] == pytest.approx(2 / 3)
  assert captions.aggregate([]) == {"n_examples": 0}


def test_timed_video_captions_parse_back_and_score_timing():
  cfg = shapes.ShapesConfig(timed=True)
  src = shapes.ShapesSource("video_caption", 20, cfg=cfg)
  for i in range(20):
    ex = src[i]
    assert ex["timed"] and ex["caption"].count(" at frame ") == len(ex["facts"])
    facts, unparsed = captions.parse_caption(ex["caption"], "video")
    assert facts == ex["facts"] and not unparsed
    assert captions.parse_times(ex["caption"]) == ex["times"]
    m = captions.caption_metrics(ex["caption"], ex["facts"], "video", ex["times"])
    assert m["timing"] == 1.0 and m["missing"] == 0.0 and m["hallucination"] == 0.0
  truth = [("event", 1, "appears", "red", "circle", "top"), ("event", 2, "moves", "red", "circle", "center")]
  times = [0, 2]
  # right events, second one at the wrong frame: timing 1/2, nothing missed
  m = captions.caption_metrics("first a red circle appears at the top at frame 1, then the red circle moves to "
                               "the center at frame 2.", truth, "video", times)
  assert m["timing"] == 0.5 and m["missing"] == 0.0
  # untimed clauses parse (no frame stated: not timed right); a missed event is not timed right either
  m = captions.caption_metrics("first a red circle appears at the top.", truth, "video", times)
  assert m["timing"] == 0.0 and m["missing"] == 0.5
  m = captions.caption_metrics("then the red circle moves to the center at frame 3.", truth, "video", times)
  assert m["timing"] == 0.5 and captions.parse_times("a red circle appears at the top") == [None]
  assert "timing" not in captions.caption_metrics("first a red circle appears at the top.", truth, "video")
  assert captions.aggregate([m, m])["timing"] == 0.5


def test_generation_score_breaks_question_answers_down_by_kind():
  from mmjax.evals import generation
  recs = [dict(kind="vqa", skills=("count", "shape"), response="2"), dict(kind="vqa", skills=("position",), response="top"),
          dict(kind="vqa", skills=("count",), response="1")]
  out = generation.score(recs, ["2", "left", " 1 "])
  assert out == {"gen_exact_match": 2 / 3, "gen_exact_count": 1.0, "gen_exact_position": 0.0}
  assert generation.score(recs[:1], ["3"]) == {"gen_exact_match": 0.0}  # one kind: no breakdown


def test_answer_rows_give_each_record_its_prompt_truth_and_answer():
  from mmjax.evals import generation
  recs = [dict(kind="vqa", prompt="how many?", response="2"),
          dict(messages=[dict(role="user", content="describe."), dict(role="assistant", content="a red circle.")])]
  rows = [json.loads(l) for l in generation.answer_rows(recs, ["3", "a red circle."]).splitlines()]
  assert rows == [dict(kind="vqa", prompt="how many?", truth="2", answer="3"),
                  dict(kind="", prompt="describe.", truth="a red circle.", answer="a red circle.")]
