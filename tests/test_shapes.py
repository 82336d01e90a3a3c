"""The shapes data set: determinism, disjoint splits, pixels vs boxes/masks/facts, grammar, QA, pool."""
import re
import time

import numpy as np
import pytest

from mmjax.data import shapes, shapes_draw, sources, tokenizer as tokenizer_lib
from mmjax.evals import captions

CHARSET = set(tokenizer_lib.BuiltinTokenizer.CHARS)
EDGES = shapes_draw.cell_edges(32)


def _cell_of(box, edges=EDGES):
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  col, row = np.searchsorted(edges, cx) - 1, np.searchsorted(edges, cy) - 1
  return shapes.POSITIONS[row * 3 + col]


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k])
    else:
      assert a[k] == b[k], k


@pytest.mark.parametrize("kind", shapes.KINDS)
def test_deterministic_by_seed_and_index(kind):
  a, b = shapes.ShapesSource(kind, 50, seed=3), shapes.ShapesSource(kind, 50, seed=3)
  for i in (0, 7, 49, 7):
    _same(a[i], b[i])
  other = shapes.ShapesSource(kind, 50, seed=4)
  assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]
  with pytest.raises(IndexError):
    a[50]


def test_splits_never_share_an_image_caption_or_video():
  for kind, n_train, n_eval in (("image_caption", 3000, 1000), ("video_caption", 1500, 500)):
    train, held = shapes.ShapesSource(kind, n_train), shapes.ShapesSource(kind, n_eval, split="eval")
    train_ex, eval_ex = [train[i] for i in range(n_train)], [held[i] for i in range(n_eval)]
    assert not {e["caption"] for e in train_ex} & {e["caption"] for e in eval_ex}
    pixels = "frames" if kind == "video_caption" else "image"
    assert not {e[pixels].tobytes() for e in train_ex} & {e[pixels].tobytes() for e in eval_ex}
    assert not any(shapes.is_eval_caption(e["caption"]) for e in train_ex)
    assert all(shapes.is_eval_caption(e["caption"]) for e in eval_ex)
    assert len({e["caption"] for e in eval_ex}) > 0.5 * n_eval  # not a handful repeated


def _check_objects(image, masks, boxes, colours):
  """Masks are disjoint and exactly the pixels of their colour; boxes are their bounds."""
  assert masks.dtype == bool and boxes.dtype == np.float32
  assert (masks.sum(0) <= 1).all()
  for mask, box, colour in zip(masks, boxes, colours):
    assert mask.any()
    assert (image[mask] == shapes.PALETTE[colour]).all()
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    np.testing.assert_array_equal(box, [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
  background = ~masks.any(0)
  assert (image[background] == shapes_draw.BACKGROUND).all()


def test_image_pixels_boxes_masks_and_facts_agree():
  cfg = shapes.ShapesConfig()
  src = shapes.ShapesSource("image_caption", 300, cfg=cfg)
  sides = shapes.object_sides(32)
  for i in range(300):
    ex = src[i]
    n = len(ex["facts"])
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert ex["masks"].shape == (n, 32, 32) and ex["boxes"].shape == (n, 4)
    assert cfg.min_objects <= n <= cfg.max_objects
    _check_objects(ex["image"], ex["masks"], ex["boxes"], [f[1] for f in ex["facts"]])
    cells = [shapes.POSITIONS.index(f[4]) for f in ex["facts"]]
    assert cells == sorted(set(cells))  # distinct cells, caption in grid order
    for fact, box, cls, mask in zip(ex["facts"], ex["boxes"], ex["classes"], ex["masks"]):
      assert cls == cfg.shapes.index(fact[2])
      assert _cell_of(box) == fact[4]
      width = box[2] - box[0]
      assert width <= sides[fact[3]] and (width == sides[fact[3]] or fact[2] != "square")
      if fact[2] == "square":
        assert mask.sum() == sides[fact[3]] ** 2


def test_all_shapes_and_bigger_images_render():
  cfg = shapes.ShapesConfig(image_size=48, shapes=shapes.SHAPES, colours=shapes.COLOURS, max_objects=9,
                            min_objects=5, jitter=False)
  src = shapes.ShapesSource("image_caption", 60, cfg=cfg)
  seen = set()
  for i in range(60):
    ex = src[i]
    _check_objects(ex["image"], ex["masks"], ex["boxes"], [f[1] for f in ex["facts"]])
    assert [_cell_of(b, shapes_draw.cell_edges(48)) for b in ex["boxes"]] == [f[4] for f in ex["facts"]]
    seen |= {f[2] for f in ex["facts"]}
  assert seen == set(shapes.SHAPES)
  for side in (5, 6, 7, 8, 9, 13, 20):  # five distinct silhouettes, even when small
    assert len({shapes_draw.patch_mask(s, side).tobytes() for s in shapes.SHAPES}) == 5


def test_video_frames_follow_the_events():
  cfg = shapes.ShapesConfig(video_frames=6, max_events=4)
  src = shapes.ShapesSource("video_caption", 200, cfg=cfg)
  for i in range(200):
    ex = src[i]
    facts, times = ex["facts"], ex["times"]
    T, n = ex["visible"].shape
    assert ex["frames"].shape == (T, 32, 32, 3) and T == 6 and ex["masks"].shape == (T, n, 32, 32)
    assert cfg.min_events <= len(facts) == len(times) <= cfg.max_events
    assert times == sorted(set(times)) and 0 <= times[0] and times[-1] < T
    assert [f[1] for f in facts] == list(range(1, len(facts) + 1)) and facts[0][2] == "appears"
    names = {}  # (colour, shape) -> object id, in order of appearance
    where = {}
    step = 0
    for t in range(T):
      while step < len(facts) and times[step] == t:
        _, _, verb, colour, shape, position = facts[step]
        if verb == "appears":
          assert (colour, shape) not in names  # each object appears once
          names[(colour, shape)] = len(names)
        o = names[(colour, shape)]
        if verb == "disappears":
          assert where.pop(o) == position
        else:
          assert where.get(o) != position
          where[o] = position
        step += 1
      assert set(np.flatnonzero(ex["visible"][t])) == set(where)
      assert not ex["masks"][t][~ex["visible"][t]].any() and not ex["boxes"][t][~ex["visible"][t]].any()
      vis = ex["visible"][t]
      colours = [c for (c, _), o in names.items() if vis[o]]
      _check_objects(ex["frames"][t], ex["masks"][t][vis], ex["boxes"][t][vis], colours)
      for o, position in where.items():
        assert _cell_of(ex["boxes"][t, o]) == position
    assert len(names) == n
    in_order = sorted(names, key=names.get)
    assert list(ex["classes"]) == [cfg.shapes.index(s) for _, s in in_order]


def test_captions_parse_back_to_their_facts_and_use_the_tokenizer_charset():
  for kind, ckind in (("image_caption", "image"), ("video_caption", "video")):
    cfg = shapes.ShapesConfig(shapes=shapes.SHAPES, colours=shapes.COLOURS)
    src = shapes.ShapesSource(kind, 300, cfg=cfg)
    for i in range(300):
      ex = src[i]
      facts, unparsed = captions.parse_caption(ex["caption"], ckind)
      assert facts == ex["facts"] and unparsed == []
      assert set(ex["caption"] + ex["prompt"] + ex["response"]) <= CHARSET
      assert ex["response"] == ex["caption"]
      m = captions.caption_metrics(ex["caption"], ex["facts"], ckind)
      assert m["exact_match"] == 1 and m["missing"] == m["hallucination"] == m["repetition"] == 0


def _answer(question, facts):
  """An independent reading of a question against the facts."""
  objs = [dict(colour=f[1], shape=f[2], size=f[3], position=f[4]) for f in facts]
  if m := re.fullmatch(r"how many (\w+) are there\?", question):
    word = m[1]
    return str(len(objs) if word == "objects" else sum(shapes.PLURALS[o["shape"]] == word for o in objs))
  if m := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
    return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objs) else "no"
  if m := re.fullmatch(r"is there an object at the (.+)\?", question):
    return "yes" if any(o["position"] == m[1] for o in objs) else "no"
  m = re.fullmatch(r"(?:what (colour|shape|size) is|where is) the (.+?)(?: at the (.+))?\?", question)
  assert m, question
  asked = m[1] or "position"
  words = m[2].split()
  want = {}
  if words[-1] != "object":
    want["shape"] = words[-1]
  for w in words[:-1]:
    want["size" if w in shapes.SIZES else "colour"] = w
  if m[3]:
    want["position"] = m[3]
  assert asked not in want, question
  matches = [o for o in objs if all(o[k] == v for k, v in want.items())]
  assert len(matches) == 1, question  # the reference is unambiguous
  return matches[0][asked]


def test_questions_are_answered_by_the_facts():
  src = shapes.ShapesSource("vqa", 400, cfg=shapes.ShapesConfig(max_objects=5))
  skills = set()
  for i in range(400):
    ex = src[i]
    assert [s for _, _, s in ex["qa"]] == list(shapes.QA_SKILLS)
    for question, answer, skill in ex["qa"]:
      assert _answer(question, ex["facts"]) == answer, (question, answer, ex["facts"])
      assert set(question + answer) <= CHARSET
    assert (ex["prompt"], ex["response"], ex["skills"][0]) in ex["qa"]
    assert ex["skills"] == shapes.question_skills(ex["prompt"], ex["skills"][0])
    skills.add(ex["skills"][0])
  assert skills == set(shapes.QA_SKILLS)
  answers = [a for i in range(200) for q, a, s in src[i]["qa"] if s == "existence"]
  assert 0.3 < answers.count("yes") / len(answers) < 0.8


def test_pool_tags_and_tasks():
  pool = shapes.ShapesSource("pool", 300, seed=1)
  images = shapes.ShapesSource("image_caption", 300, seed=1)
  counts = {}
  for i in range(300):
    ex = pool[i]
    counts[ex["kind"]] = counts.get(ex["kind"], 0) + 1
    assert ex["skills"] and set(ex["skills"]) <= set(shapes.SKILLS)
    if ex["kind"] == "video_caption":
      assert "temporal_order" in ex["skills"] and "frames" in ex and ex["prompt"] == shapes.VIDEO_PROMPT
    elif ex["kind"] == "vqa":
      assert ex["skills"][0] in shapes.QA_SKILLS
      assert (ex["prompt"], ex["response"], ex["skills"][0]) in ex["qa"]
      np.testing.assert_array_equal(ex["image"], images[i]["image"])  # one image stream per seed
    else:
      assert ex["response"] == ex["caption"] and "temporal_order" not in ex["skills"]
  assert set(counts) == set(shapes.TASKS) - {"video_local_caption", "video_qa"}  # not in the default mix
  assert counts["vqa"] > counts["image_caption"]
  only = shapes.ShapesSource("pool", 20, cfg=shapes.ShapesConfig(pool_mix=(("vqa", 1.0),)))
  assert {only[i]["kind"] for i in range(20)} == {"vqa"}


def test_config_errors_name_the_field():
  for kw, field in ((dict(image_size=16), "image_size"), (dict(shapes=("hexagon",)), "shapes"),
                    (dict(max_objects=10), "max_objects"), (dict(max_events=9), "max_events"),
                    (dict(pool_mix=(("chat", 1.0),)), "pool_mix"), (dict(qa_weights=(1.0,)), "qa_weights"),
                    (dict(qa_reasoning=("count",)), "qa_reasoning")):
    with pytest.raises(ValueError, match=field):
      shapes.ShapesSource("image_caption", 4, cfg=shapes.ShapesConfig(**kw))
  with pytest.raises(ValueError, match="kind"):
    shapes.ShapesSource("audio", 4)


def test_question_weights_plain_questions_and_stepped_answers():
  """qa_weights draws the asked kind by weight, qa_plain keeps count and existence questions
  free of attribute words, qa_reasoning answers colour / shape / size in steps; the default
  draws are unchanged (the same records as before these options)."""
  cfg = shapes.ShapesConfig(qa_skills=("count", "existence", "colour"), qa_weights=(1.0, 1.0, 0.1), qa_plain=True,
                            qa_reasoning=("colour",))
  src = shapes.ShapesSource("vqa", 600, cfg=cfg)
  kinds = [src[i]["skills"][0] for i in range(600)]
  assert 10 < kinds.count("colour") < 60 and kinds.count("count") > 200
  for i in range(600):
    r = src[i]
    if r["skills"][0] == "count":
      assert r["prompt"] == "how many objects are there?" and r["skills"] == ("count",)
    elif r["skills"][0] == "existence":
      assert r["prompt"].startswith("is there an object at the ") and r["skills"] == ("existence", "position")
    else:
      assert shapes.parse_reasoning(r["response"])["value"] in shapes.COLOURS
  default = shapes.ShapesSource("vqa", 5)[3]
  assert default["prompt"] == "what size is the yellow triangle?" and default["response"] == "large"


def test_tiny_configs_still_split():
  cfg = shapes.ShapesConfig(shapes=("square",), colours=("red", "blue"), sizes=("large",), max_objects=1,
                            min_events=1, max_events=2)
  for kind in ("image_caption", "video_caption"):
    train = {shapes.ShapesSource(kind, 200, cfg=cfg)[i]["caption"] for i in range(200)}
    held = {shapes.ShapesSource(kind, 50, split="eval", cfg=cfg)[i]["caption"] for i in range(50)}
    assert held and not train & held


def test_arrayrecord_round_trip(tmp_path):
  src = shapes.ShapesSource("pool", 6)
  path = str(tmp_path / "shapes.arrayrecord")
  assert shapes.write_arrayrecord(src, path) == 6
  text = sources.ArrayRecordSource(path)
  import grain
  raw = grain.sources.ArrayRecordDataSource([path])
  for i in range(6):
    rec = text[i]  # prompt / response, and the pixels a VLM reads
    assert (rec["prompt"], rec["response"]) == (src[i]["prompt"], src[i]["response"])
    if "frames" in src[i]:
      np.testing.assert_array_equal(np.stack(rec["frames"]), src[i]["frames"])
    else:
      np.testing.assert_array_equal(rec["image"], src[i]["image"])
    _same(shapes.from_json_record(raw[i]), src[i])


def test_fast_enough():
  src = shapes.ShapesSource("pool", 400)
  start = time.perf_counter()
  for i in range(400):
    src[i]
  assert (time.perf_counter() - start) / 400 < 5e-3  # typically ~0.3 ms


def test_question_skills_name_what_the_wording_needs():
  q = shapes.question_skills
  assert q("what size is the red circle?", "size") == ("size", "colour", "shape")
  assert q("what colour is the object at the top left?", "colour") == ("colour", "position")
  assert q("how many circles are there?", "count") == ("count", "shape")
  assert q("how many objects are there?", "count") == ("count",)
  assert q("is there a blue triangle?", "existence") == ("existence", "colour", "shape")
  assert q("where is the large square?", "position") == ("position", "shape", "size")


def test_local_captions_describe_an_interval_of_the_same_video():
  """video_local_caption index i asks about frames a..b of video_caption's video i: its facts
  are exactly the events seen in those frames (steps from 1), its caption parses back to them,
  and the global and local error rates are scored apart."""
  from mmjax.evals import generation
  cfg = shapes.ShapesConfig(image_size=48, max_objects=2, video_frames=5, max_events=4, timed=True)
  local = shapes.ShapesSource("video_local_caption", 300, seed=3, cfg=cfg)
  whole = shapes.ShapesSource("video_caption", 300, seed=3, cfg=cfg)
  lengths = set()
  for i in range(300):
    r, g = local[i], whole[i]
    assert np.array_equal(r["frames"], g["frames"]) and r["video_caption"] == g["caption"]
    a, b = r["interval"]
    assert 1 <= a <= b <= 5 and r["facts"]  # never an empty interval
    inside = [f for f, t in zip(g["facts"], g["times"]) if a <= t + 1 <= b]
    assert [f[2:] for f in r["facts"]] == [f[2:] for f in inside] and [f[1] for f in r["facts"]] == \
        list(range(1, len(inside) + 1))
    assert r["prompt"] == (f"describe the video at frame {a}." if a == b else
                           f"describe the video from frame {a} to frame {b}.")
    m = captions.caption_metrics(r["response"], r["facts"], "video", r["times"])
    assert m["exact_match"] == 1 and m["error"] == 0 and m["timing"] == 1
    lengths.add(len(inside) < len(g["facts"]))
  assert lengths == {True, False}  # some intervals are a part of the video, some all of it
  # scored apart: a perfect global caption and an empty local one
  out = generation.score([whole[0], local[0]], [whole[0]["response"], ""])
  assert out["error"] == 0 and out["local_error"] == 1 and out["local_exact_match"] == 0
  assert out["gen_exact_match"] == 0.5 and "local_micro_error" in out and "local_timing" in out
  # the two video tasks mix in one pool; video and image tasks do not
  pool = shapes.ShapesSource("pool", 50, cfg=shapes.ShapesConfig(
      pool_mix=(("video_caption", 1.0), ("video_local_caption", 1.0))))
  assert {pool[i]["kind"] for i in range(50)} == {"video_caption", "video_local_caption"}
  from mmjax.data import catalog
  c = catalog.default_data_config()
  c.update(source="shapes", task="pool", pool_mix=(("video_local_caption", 1.0), ("vqa", 1.0)))
  with pytest.raises(ValueError, match="a batch holds images or videos, not both"):
    catalog.validate_data_config(c)


def test_noise_background_changes_only_the_background():
  """background='noise': the same objects, masks, boxes and caption; every pixel outside the
  masks is replaced by coloured noise in [0, 120], different per image."""
  plain = shapes.ShapesSource("image_caption", 20, seed=4, cfg=shapes.ShapesConfig(image_size=48))
  noisy = shapes.ShapesSource("image_caption", 20, seed=4, cfg=shapes.ShapesConfig(image_size=48, background="noise"))
  backgrounds = []
  for i in range(20):
    a, b = plain[i], noisy[i]
    assert a["caption"] == b["caption"]
    np.testing.assert_array_equal(a["masks"], b["masks"])
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
    inside = a["masks"].any(0)
    np.testing.assert_array_equal(a["image"][inside], b["image"][inside])
    assert b["image"][~inside].max() <= 120 and b["image"][~inside].std() > 20
    backgrounds.append(b["image"][~inside][:50].tobytes())
  assert len(set(backgrounds)) == 20
  frames = shapes.ShapesSource("video_caption", 2, cfg=shapes.ShapesConfig(image_size=48, background="noise"))[0]
  assert frames["frames"][~frames["masks"].any(1)].std() > 20  # videos too
  with pytest.raises(ValueError, match=r"background='grass' is not valid; one of plain, noise"):
    shapes.ShapesConfig(background="grass").validate()
