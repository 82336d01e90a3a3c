"""The built-in "shapes" multimodal data set: images and short videos generated on the fly.

Every example is a pure function of (kind, seed, split, index): no files, pure numpy and
`random`, well under a millisecond per 32x32 image. A scene is 1..N objects on a plain
dark background, each in its own cell of a 3x3 grid (so objects never overlap):

  shape     square | circle | triangle  (also diamond, cross)      -> class id = cfg.shapes.index
  colour    red | green | blue | yellow | purple | white  (also cyan, pink); distinct RGB
  size      small | large
  position  top left | top | top right | left | center | right | bottom left | bottom | bottom right

Grammar (only characters of the builtin tokenizer: lowercase, digits, space, `.,?`):

  image caption  "a large red circle at the top left. a small blue square at the center."
                 one sentence per object, in grid order (row by row, left to right)
  video caption  "first a red circle appears at the top left, then the red circle moves to
                 the center, then a blue square appears at the right, then the red circle
                 disappears from the center."  With `timed=True` each clause ends in " at
                 frame N", the 1-based frame where its event is first seen.
                 one clause per event; objects have distinct (colour, shape) in a video and
                 each appears at most once, never returns to a cell it has left
  questions      count "how many circles are there?" -> "2"; colour "what colour is the
                 square?" -> "red"; shape "what shape is the object at the top?" -> "circle";
                 size "what size is the red circle?" -> "large"; position "where is the red
                 circle?" -> "top left"; existence "is there a blue triangle?" -> "yes" | "no"
                 With `qa_reasoning` (colour / shape / size) the answer comes in two steps,
                 find the object, then read it: "what colour is the large square?" -> "the
                 large square is at the top left. the colour is red." (`reasoning_answer`,
                 `parse_reasoning`, `final_answer`); with `qa_plain` count and existence
                 questions name no attribute ("how many objects are there?", "is there an
                 object at the top?"); `qa_weights` weights the kind asked.

Atomic facts (hashable tuples; `mmjax.evals.captions.parse_caption` returns the same ones):

  image  ("object", colour, shape, size, position)        one per object, in caption order
  video  ("event", step, verb, colour, shape, position)   step = 1, 2, ... in caption order;
         verb in appears | moves | disappears; position = where it appears, the cell it moves
         to, or the cell it disappears from

`ShapesSource(kind, size, seed=0, split="train", cfg=ShapesConfig())` is a random-access
source (`__len__`, `__getitem__`) for Grain. kind:

  image_caption  prompt "describe the image." / response = caption
  vqa            prompt = one question / response = its answer (one skill drawn per index)
  video_caption  prompt "describe the video." / response = caption (the global caption)
  video_local_caption  prompt "describe the video from frame 2 to frame 4." (or "... at frame
                 3.") / response = the caption of the events in that interval alone (a local
                 caption; steps numbered from 1, frames as in the whole video); the interval
                 holds at least one event. Index i is the same video as video_caption's i.
  video_qa       prompt = one question about the video's events / response = its answer (a
                 non-captioning video task, `make_video_question`): count "how many objects
                 appear?" -> "2"; colour "what colour is the circle?" (a shape that appears
                 once) -> "red"; position "where does the red circle appear?" -> "top left";
                 existence "does a blue square appear?" -> "yes" | "no". Index i is the same
                 video as video_caption's i.
  pool           one task per index, drawn by `cfg.pool_mix` (each as above), with skill tags

Record keys, every kind: `kind` (the task: image_caption | vqa | video_caption |
video_local_caption | video_qa), `index`,
`prompt`, `response`, `caption`, `facts` (list of tuples), `qa` (list of (question, answer,
skill)), `skills` (tuple of tags from SKILLS: a question's asked skill first, then those its
wording exercises, see `question_skills`; a caption's CAPTION_SKILLS; a video's VIDEO_SKILLS), `classes` int32 [n]. Images add `image` uint8
[H, W, 3], `boxes` float32 [n, 4], `masks` bool [n, H, W]. Videos add `frames` uint8 [T, H,
W, 3], `boxes` float32 [T, n, 4] (0 where absent), `masks` bool [T, n, H, W], `visible` bool
[T, n], `times` (per step, the first frame that shows its event), `timed` (the caption
states them) and `qa` = []; a local caption's `facts`, `times` and `caption` are its
interval's, and it adds `interval` (first, last frame, 1-based) and the whole video's
`video_caption` and `video_facts`. Boxes are
[x0, y0, x1, y1] pixel edges, tight around the mask: the object covers columns x0..x1-1 and
rows y0..y1-1. Mask pixels are exactly the object's palette colour.

Splits: like `sources.GeneratedTask`, an example belongs to `eval` iff crc32 of its caption
(image caption for image kinds, video caption for videos) % 10 == 0, else `train`; draws are
repeated until the split matches. So no image, caption or video of one split ever occurs in
the other, for any config or seed. Seeds give independent streams within a split.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import random
import re
import zlib

import numpy as np

from mmjax.data import sources
from mmjax.data.shapes_draw import PALETTE, SHAPES, canvas, draw, object_sides, place

PLURALS = {"square": "squares", "circle": "circles", "triangle": "triangles", "diamond": "diamonds",
           "cross": "crosses"}
COLOURS = tuple(PALETTE)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")  # grid cell r * 3 + c
VERBS = ("appears", "moves", "disappears")
KINDS = ("image_caption", "vqa", "video_caption", "video_local_caption", "video_qa", "pool")
TASKS = ("image_caption", "vqa", "video_caption", "video_local_caption", "video_qa")
VIDEO_TASKS = ("video_caption", "video_local_caption", "video_qa")
CAPTION_TASKS = ("image_caption", "video_caption", "video_local_caption")
QA_TASKS = ("vqa", "video_qa")
QA_SKILLS = ("count", "colour", "shape", "size", "position", "existence")
VIDEO_QA_SKILLS = ("count", "colour", "position", "existence")
SKILLS = ("colour", "shape", "size", "position", "count", "existence", "temporal_order")
CAPTION_SKILLS = ("colour", "shape", "size", "position", "count")
VIDEO_SKILLS = ("temporal_order", "colour", "shape", "position")
REASONING_SKILLS = ("colour", "shape", "size")  # questions that can be answered in steps
IMAGE_PROMPT = "describe the image."
VIDEO_PROMPT = "describe the video."
EVAL_BUCKETS = 10  # 1 in 10 captions is held out
BACKGROUNDS = ("plain", "noise")


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
  """What a shapes example may contain. Names must come from SHAPES / COLOURS / SIZES."""
  image_size: int = 32  # H = W; >= 27 so shapes stay distinct and sizes differ by >= 2 pixels
  min_objects: int = 1  # objects per image
  max_objects: int = 3  # <= 9 (one per grid cell); also the most objects on a video frame
  shapes: tuple = ("square", "circle", "triangle")
  colours: tuple = ("red", "green", "blue", "yellow", "purple", "white")
  sizes: tuple = SIZES
  jitter: bool = True  # random offset of an object inside its cell (else centred)
  video_frames: int = 5  # T
  min_events: int = 2  # events per video; each on its own frame
  max_events: int = 4  # <= video_frames
  qa_skills: tuple = QA_SKILLS  # skills a vqa example may ask about
  qa_weights: tuple = ()  # one weight >= 0 per qa_skills entry for the vqa draw; () = uniform
  qa_reasoning: tuple = ()  # attribute skills (colour, shape, size) answered with reasoning steps
  qa_plain: bool = False  # count / existence questions name no attribute ("how many objects ...")
  pool_mix: tuple = (("image_caption", 1.0), ("vqa", 3.0), ("video_caption", 1.0))  # weights
  timed: bool = False  # video captions state each event's frame ("... at frame 2")
  background: str = "plain"  # "plain" (dark) | "noise" (coloured per-pixel noise in [0, 120]: another distribution)

  @property
  def num_classes(self) -> int:
    return len(self.shapes)

  def validate(self) -> "ShapesConfig":
    """Raises ValueError naming the field, its value and what is valid."""
    def bad(key, valid):
      return ValueError(f"shapes config {key}={getattr(self, key)!r} is not valid; {valid}")
    if not isinstance(self.image_size, int) or self.image_size < 27:
      raise bad("image_size", "expected an integer >= 27")
    for key, vocab in (("shapes", SHAPES), ("colours", COLOURS), ("sizes", SIZES), ("qa_skills", QA_SKILLS)):
      names = getattr(self, key)
      if not names or len(set(names)) != len(names) or any(n not in vocab for n in names):
        raise bad(key, f"expected distinct names from {', '.join(vocab)}")
    if not 1 <= self.min_objects <= self.max_objects <= 9:
      raise bad("max_objects", f"expected 1 <= min_objects ({self.min_objects}) <= max_objects <= 9")
    if not 1 <= self.min_events <= self.max_events <= self.video_frames:
      raise bad("max_events", f"expected 1 <= min_events ({self.min_events}) <= max_events <= "
                f"video_frames ({self.video_frames})")
    if len(self.shapes) * len(self.colours) < self.max_events:
      raise bad("colours", f"a video needs >= max_events ({self.max_events}) (colour, shape) pairs")
    if self.qa_weights and (len(self.qa_weights) != len(self.qa_skills) or any(w < 0 for w in self.qa_weights)
                            or sum(self.qa_weights) <= 0):
      raise bad("qa_weights", f"expected () or one weight >= 0 per qa_skills entry ({len(self.qa_skills)}), "
                "not all 0")
    if any(k not in REASONING_SKILLS for k in self.qa_reasoning):
      raise bad("qa_reasoning", f"expected skills from {', '.join(REASONING_SKILLS)}")
    mix = dict(self.pool_mix)
    if self.background not in BACKGROUNDS:
      raise bad("background", f"one of {', '.join(BACKGROUNDS)}")
    if not mix or any(t not in TASKS or w < 0 for t, w in mix.items()) or sum(mix.values()) <= 0:
      raise bad("pool_mix", f"expected (task, weight >= 0) pairs with tasks from {', '.join(TASKS)}")
    return self


# ----------------------------------------------------------------------------- text


def object_sentence(fact) -> str:
  _, colour, shape, size, position = fact
  return f"a {size} {colour} {shape} at the {position}."


def image_caption(facts) -> str:
  return " ".join(object_sentence(f) for f in facts)


def event_clause(fact) -> str:
  _, _, verb, colour, shape, position = fact
  if verb == "appears":
    return f"a {colour} {shape} appears at the {position}"
  if verb == "moves":
    return f"the {colour} {shape} moves to the {position}"
  return f"the {colour} {shape} disappears from the {position}"


def video_caption(facts, times=None) -> str:
  """One clause per event; with `times` (0-based frame of each event) every clause ends in
  " at frame N" (N = time + 1): a timed caption, whose per-step timing can be scored."""
  clauses = [("first " if i == 0 else "then ") + event_clause(f) + ("" if times is None else f" at frame {times[i] + 1}")
             for i, f in enumerate(facts)]
  return ", ".join(clauses) + "." if clauses else ""


def local_view(ex: dict, rng: random.Random, cfg: "ShapesConfig") -> dict:
  """The local-caption fields of a video example: an interval of frames holding at least one
  event (drawn by `rng` around one of its events), the prompt asking for it, and the caption,
  facts (steps renumbered from 1) and times of the interval's events alone."""
  times = ex["times"]
  t0 = times[rng.randrange(len(times))]
  a, b = rng.randint(0, t0), rng.randint(t0, cfg.video_frames - 1)
  keep = [k for k, t in enumerate(times) if a <= t <= b]
  facts = [("event", j + 1) + tuple(ex["facts"][k][2:]) for j, k in enumerate(keep)]
  local_times = [times[k] for k in keep]
  caption = video_caption(facts, local_times if cfg.timed else None)
  prompt = (f"describe the video at frame {a + 1}." if a == b else
            f"describe the video from frame {a + 1} to frame {b + 1}.")
  return dict(prompt=prompt, response=caption, caption=caption, facts=facts, times=local_times,
              interval=(a + 1, b + 1), video_caption=ex["caption"], video_facts=ex["facts"])


def is_eval_caption(caption: str) -> bool:
  return zlib.crc32(caption.encode()) % EVAL_BUCKETS == 0


# ----------------------------------------------------------------------------- questions

_REFS = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"), ("size", "colour"),
         ("size", "colour", "shape"), ("position",))
_ATTR = {"colour": 1, "shape": 2, "size": 3, "position": 4}  # index into an object fact


def _ref(fact, attrs) -> str:
  words = [fact[_ATTR[a]] for a in ("size", "colour") if a in attrs]
  words.append(fact[2] if "shape" in attrs else "object")
  text = "the " + " ".join(words)
  return text + f" at the {fact[4]}" if "position" in attrs else text


def _unique_refs(facts, fact, asked):
  """Attribute sets that name `fact` uniquely among `facts` without using `asked`."""
  out = []
  for attrs in _REFS:
    if asked in attrs:
      continue
    key = [_ATTR[a] for a in attrs]
    if sum(all(f[k] == fact[k] for k in key) for f in facts) == 1:
      out.append(attrs)
  return out


_WORD_SKILLS = {**{c: "colour" for c in COLOURS}, **{sh: "shape" for sh in SHAPES}, **{p: "shape" for p in PLURALS.values()},
                **{z: "size" for z in SIZES}}


def question_skills(question: str, skill: str) -> tuple:
  """The skills a question exercises: the one it asks about first, then those its wording
  needs to pick the object out ("what size is the red circle?" -> size, colour, shape;
  "... at the top left?" -> position)."""
  words = question.rstrip("?").split()
  used = {_WORD_SKILLS[w] for w in words if w in _WORD_SKILLS}
  if " at the " in question:
    used.add("position")
  return (skill,) + tuple(k for k in SKILLS if k in used and k != skill)


def reasoning_answer(ref: str, position: str, skill: str, value: str) -> str:
  """The stepped answer to "what <skill> is <ref>?": locate the object, then read it.
  ("the large square", "top left", "colour", "red") ->
  "the large square is at the top left. the colour is red." """
  return f"{ref} is at the {position}. the {skill} is {value}."


_STEPS = re.compile(r"^\s*(?P<ref>the [a-z ]+?) is at the (?P<position>{}|[a-z ]+?)\.\s*the (?P<skill>{}) is "
                    r"(?P<value>[a-z]+)\s*\.?\s*$".format("|".join(sorted(POSITIONS, key=len, reverse=True)),
                                                        "|".join(REASONING_SKILLS)))


def parse_reasoning(text: str) -> dict | None:
  """The steps of a stepped answer (`reasoning_answer`): {"ref", "position", "skill",
  "value"} (value: the final answer), or None when `text` does not have that form. Only the
  second step present ("the colour is red.") gives position None; any other text None."""
  text = " ".join(str(text).lower().split())
  m = _STEPS.match(text)
  if m:
    return m.groupdict()
  m = re.match(r"^(?:.*\.\s*)?the ({}) is ([a-z]+)\s*\.?$".format("|".join(REASONING_SKILLS)), text)
  return {"ref": None, "position": None, "skill": m.group(1), "value": m.group(2)} if m else None


def final_answer(text: str) -> str:
  """The answer a (possibly stepped) answer ends in: the last step's value, else the text."""
  steps = parse_reasoning(text)
  return steps["value"] if steps else " ".join(str(text).lower().split())


def _existence_draw(present: set, rng: random.Random, cfg: ShapesConfig) -> tuple:
  """(colour, shape, 'yes' | 'no') of an existence question: half the time (when one exists)
  a (colour, shape) pair absent from `present`, else one of `present`."""
  absent = [(c, s) for c in cfg.colours for s in cfg.shapes if (c, s) not in present]
  if absent and rng.random() < 0.5:
    return (*rng.choice(absent), "no")
  return (*rng.choice(sorted(present)), "yes")


def make_question(facts, skill: str, rng: random.Random, cfg: ShapesConfig) -> tuple:
  """(question, answer, skill) about the objects `facts` of one image. Skills in
  `cfg.qa_reasoning` are answered in steps (`reasoning_answer`); with `cfg.qa_plain` count
  and existence questions name no attribute of an object."""
  if cfg.qa_plain and skill in ("count", "existence"):
    if skill == "count":
      return "how many objects are there?", str(len(facts)), skill
    cell = rng.randrange(9)
    occupied = any(f[4] == POSITIONS[cell] for f in facts)
    return f"is there an object at the {POSITIONS[cell]}?", "yes" if occupied else "no", skill
  if skill == "count":
    if rng.random() < 0.25:
      return "how many objects are there?", str(len(facts)), skill
    shape = rng.choice(cfg.shapes)
    return f"how many {PLURALS[shape]} are there?", str(sum(f[2] == shape for f in facts)), skill
  if skill == "existence":
    colour, shape, answer = _existence_draw({(f[1], f[2]) for f in facts}, rng, cfg)
    return f"is there a {colour} {shape}?", answer, skill
  order = list(facts)
  rng.shuffle(order)
  for fact in order:
    refs = _unique_refs(facts, fact, skill)
    if refs:
      ref = _ref(fact, rng.choice(refs))
      if skill == "position":
        return f"where is {ref}?", fact[4], skill
      question = f"what {skill} is {ref}?"
      if skill in cfg.qa_reasoning:
        return question, reasoning_answer(ref, fact[4], skill, fact[_ATTR[skill]]), skill
      return question, fact[_ATTR[skill]], skill
  # Only a position question can fail (identical objects): ask about a cell instead.
  cell = rng.randrange(9)
  occupied = any(f[4] == POSITIONS[cell] for f in facts)
  return f"is there an object at the {POSITIONS[cell]}?", "yes" if occupied else "no", skill


def make_video_question(facts, rng: random.Random, cfg: ShapesConfig) -> tuple:
  """(question, answer, skill) about the events `facts` of one video (skill drawn uniformly
  from VIDEO_QA_SKILLS; a colour question falls back to count when no shape appears once)."""
  appears = [f for f in facts if f[2] == "appears"]  # every object appears exactly once
  skill = rng.choice(VIDEO_QA_SKILLS)
  if skill == "colour":
    unique = [f for f in appears if sum(g[4] == f[4] for g in appears) == 1]
    if unique:
      f = rng.choice(unique)
      return f"what colour is the {f[4]}?", f[3], skill
    skill = "count"
  if skill == "position":
    f = rng.choice(appears)
    return f"where does the {f[3]} {f[4]} appear?", f[5], skill
  if skill == "existence":
    colour, shape, answer = _existence_draw({(f[3], f[4]) for f in appears}, rng, cfg)
    return f"does a {colour} {shape} appear?", answer, skill
  return "how many objects appear?", str(len(appears)), "count"


# ----------------------------------------------------------------------------- scenes


def _draw_objects(rng, cfg):
  n = rng.randint(cfg.min_objects, cfg.max_objects)
  cells = sorted(rng.sample(range(9), n))
  return [(rng.choice(cfg.shapes), rng.choice(cfg.colours), rng.choice(cfg.sizes), c) for c in cells]


def _split_rng(key: str, split: str, caption_of, draw):
  """Draws from a stream seeded by `key` until the caption falls in `split`."""
  rng = random.Random(key)  # str seeds are hashed stably (sha512)
  for _ in range(10_000):
    scene = draw(rng)
    if is_eval_caption(caption_of(scene)) == (split == "eval"):
      return rng, scene
  raise ValueError(f"shapes: no {split} example found for {key}: the config allows too few captions")


def _noise_background(frames: np.ndarray, masks: np.ndarray, key: str) -> None:
  """Replaces the background pixels of `frames` [T, H, W, 3] (those in no mask of `masks`
  [T, n, H, W]) with coloured noise in [0, 120], a function of `key` (in place)."""
  rng = np.random.default_rng(zlib.crc32(f"shapes-background/{key}".encode()))
  noise = rng.integers(0, 121, size=frames.shape, dtype=np.uint8)
  empty = ~masks.any(axis=1)
  frames[empty] = noise[empty]


def make_image(key: str, split: str, cfg: ShapesConfig) -> dict:
  """One image example (without a task) for the stream `key`."""
  facts_of = lambda objs: [("object", c, s, z, POSITIONS[cell]) for s, c, z, cell in objs]
  rng, objs = _split_rng(key, split, lambda o: image_caption(facts_of(o)), lambda r: _draw_objects(r, cfg))
  size, sides = cfg.image_size, object_sides(cfg.image_size)
  image = canvas(1, size)[0]
  masks = np.zeros((len(objs), size, size), bool)
  boxes = np.zeros((len(objs), 4), np.float32)
  for i, (s, c, z, cell) in enumerate(objs):
    corner = place(rng, cell, sides[z], size, cfg.jitter)
    boxes[i] = draw(image, masks[i], (s, c, z, cell, corner), size)
  facts = facts_of(objs)
  if cfg.background == "noise":
    _noise_background(image[None], masks[None], key)
  return {"image": image, "boxes": boxes, "masks": masks, "facts": facts,
          "classes": np.array([cfg.shapes.index(o[0]) for o in objs], np.int32),
          "caption": image_caption(facts), "rng": rng}


def _draw_events(rng, cfg):
  """[(verb, object id, cell)], objects [(shape, colour, size)] and times of one video."""
  n_events = rng.randint(cfg.min_events, cfg.max_events)
  times = sorted(rng.sample(range(cfg.video_frames), n_events))
  combos = [(s, c) for s in cfg.shapes for c in cfg.colours]
  rng.shuffle(combos)
  objects, where, visited, events = [], {}, {}, []
  for _ in range(n_events):
    free = [c for c in range(9) if c not in where.values()]
    movable = [o for o in where if any(c not in visited[o] for c in free)]
    verbs = (["appears"] if len(where) < cfg.max_objects and len(objects) < len(combos) else [])
    verbs += (["moves"] if movable else []) + (["disappears"] if where else [])
    verb = rng.choice(verbs)
    if verb == "appears":
      o, cell = len(objects), rng.choice(free)
      objects.append(combos[o] + (rng.choice(cfg.sizes),))
      visited[o] = {cell}
    elif verb == "moves":
      o = rng.choice(movable)
      cell = rng.choice([c for c in free if c not in visited[o]])
      visited[o].add(cell)
    else:
      o = rng.choice(sorted(where))
      cell = where[o]
    events.append((verb, o, cell))
    if verb == "disappears":
      del where[o]
    else:
      where[o] = cell
  return events, objects, times


def _event_facts(scene):
  events, objects, _ = scene
  return [("event", k + 1, verb, objects[o][1], objects[o][0], POSITIONS[cell])
          for k, (verb, o, cell) in enumerate(events)]


def make_video(key: str, split: str, cfg: ShapesConfig) -> dict:
  """One video example for the stream `key`: objects appear, move and disappear."""
  rng, scene = _split_rng(key, split, lambda s: video_caption(_event_facts(s)),
                          lambda r: _draw_events(r, cfg))
  events, objects, times = scene
  size, sides, T, n = cfg.image_size, object_sides(cfg.image_size), cfg.video_frames, len(objects)
  frames = canvas(T, size)
  masks = np.zeros((T, n, size, size), bool)
  boxes = np.zeros((T, n, 4), np.float32)
  visible = np.zeros((T, n), bool)
  state = {}  # object -> (cell, corner)
  step = 0
  for t in range(T):
    while step < len(events) and times[step] == t:
      verb, o, cell = events[step]
      if verb == "disappears":
        del state[o]
      else:
        state[o] = (cell, place(rng, cell, sides[objects[o][2]], size, cfg.jitter))
      step += 1
    for o, (cell, corner) in state.items():
      s, c, z = objects[o]
      boxes[t, o] = draw(frames[t], masks[t, o], (s, c, z, cell, corner), size)
      visible[t, o] = True
  facts = _event_facts(scene)
  if cfg.background == "noise":
    _noise_background(frames, masks, key)
  return {"frames": frames, "boxes": boxes, "masks": masks, "visible": visible, "times": list(times),
          "classes": np.array([cfg.shapes.index(o[0]) for o in objects], np.int32), "timed": cfg.timed,
          "facts": facts, "caption": video_caption(facts, list(times) if cfg.timed else None), "rng": rng}


# ----------------------------------------------------------------------------- source


class ShapesSource:
  """Random-access shapes examples (see the module docstring for kinds and record keys)."""

  def __init__(self, kind: str, size: int, seed: int = 0, split: str = "train",
               cfg: ShapesConfig | None = None):
    if kind not in KINDS:
      raise ValueError(f"shapes kind {kind!r} is unknown; valid: {', '.join(KINDS)}")
    if int(size) <= 0:
      raise ValueError(f"shapes size must be positive, got {size}")
    if split not in ("train", "eval"):
      raise ValueError(f"shapes split must be 'train' or 'eval', got {split!r}")
    self.kind, self.size, self.seed, self.split = kind, int(size), int(seed), split
    self.cfg = (cfg or ShapesConfig()).validate()
    mix = dict(self.cfg.pool_mix)
    self._tasks = [t for t in TASKS if mix.get(t, 0) > 0]
    self._weights = [mix[t] for t in self._tasks]

  @property
  def class_names(self) -> tuple:
    return self.cfg.shapes

  def __len__(self):
    return self.size

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self!r}")
    task = self.kind
    if task == "pool":
      task = random.Random(f"shapes-pool/{self.seed}/{index}").choices(self._tasks, self._weights)[0]
    # Image kinds share one stream: vqa index i asks about image_caption index i's image.
    stream = "video" if task in VIDEO_TASKS else "image"
    key = f"shapes-{stream}/{self.split}/{self.seed}/{index}"
    if task in VIDEO_TASKS:
      ex = make_video(key, self.split, self.cfg)
      ex.update(prompt=VIDEO_PROMPT, response=ex["caption"], qa=[], skills=VIDEO_SKILLS)
      if task == "video_local_caption":
        ex.update(local_view(ex, random.Random(f"shapes-local/{key}"), self.cfg))
      elif task == "video_qa":
        question, answer, skill = make_video_question(ex["facts"], random.Random(f"shapes-vqa/{key}"), self.cfg)
        ex.update(prompt=question, response=answer, skills=(skill,) + tuple(s for s in VIDEO_SKILLS if s != skill))
    else:
      ex = make_image(key, self.split, self.cfg)
      rng = random.Random(f"shapes-qa/{key}")  # the task draw does not move the image stream
      ex["qa"] = [make_question(ex["facts"], s, rng, self.cfg) for s in self.cfg.qa_skills]
      if task == "vqa":
        pick = (rng.choices(range(len(ex["qa"])), self.cfg.qa_weights)[0] if self.cfg.qa_weights
                else rng.randrange(len(ex["qa"])))
        question, answer, skill = ex["qa"][pick]
        ex.update(prompt=question, response=answer, skills=question_skills(question, skill))
      else:
        ex.update(prompt=IMAGE_PROMPT, response=ex["caption"], skills=CAPTION_SKILLS)
    del ex["rng"]
    ex.update(kind=task, index=index)
    return ex

  def __repr__(self):
    return f"ShapesSource({self.kind!r}, size={self.size}, seed={self.seed}, split={self.split!r})"


# ----------------------------------------------------------------------------- files

_ARRAYS = ("image", "frames", "boxes", "masks", "classes", "visible")


def to_json_record(ex: dict) -> dict:
  """A JSON-able dict of an example: arrays as {"dtype", "shape", "b64"} (raw bytes)."""
  out = {}
  for k, v in ex.items():
    if k in _ARRAYS:
      v = np.ascontiguousarray(v)
      out[k] = {"dtype": v.dtype.str, "shape": list(v.shape), "b64": base64.b64encode(v.tobytes()).decode()}
    elif k in ("facts", "video_facts", "qa", "skills", "interval"):
      out[k] = [list(x) if isinstance(x, tuple) else x for x in v]
    else:
      out[k] = v
  return out


def from_json_record(raw) -> dict:
  """Inverse of `to_json_record` (accepts the dict, or its JSON text / bytes)."""
  obj = json.loads(raw) if isinstance(raw, (str, bytes)) else dict(raw)
  for k in _ARRAYS:
    if k in obj:
      a = obj[k]
      obj[k] = np.frombuffer(base64.b64decode(a["b64"]), np.dtype(a["dtype"])).reshape(a["shape"]).copy()
  for k in ("facts", "video_facts", "qa"):
    if k in obj:
      obj[k] = [tuple(x) for x in obj[k]]
  for k in ("skills", "interval"):
    if k in obj:
      obj[k] = tuple(obj[k])
  return obj


def write_arrayrecord(source, path: str, indices=None) -> int:
  """Writes examples of `source` as JSON records to one ArrayRecord file; returns the count.

  `sources.ArrayRecordSource(path)` reads them back as prompt/response records with their
  `image` or `frames` (what `data.source='arrayrecord'` trains a VLM on);
  `from_json_record(raw_bytes)` restores the full example, arrays included.
  """
  indices = range(len(source)) if indices is None else indices
  return sources.write_arrayrecord((to_json_record(source[i]) for i in indices), path)
