"""The data catalog: `config.data` (its keys and checks), the sources registry and `open_source`.

Each `data.source` name maps to a `Source`: how to open its train or eval split (None when
the split has none), its checks (values, and files the config names), and which pixel
fields its records give a VLM batch. `open_source` applies the record-level options on
top of any source: `responses_path` (train on a model's own answers), `indices_path` (train
on a selection) and `drop_media` (text only). Adding a source is one `Source` entry here
and its reader module.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Callable

import ml_collections

from mmjax.config.core import ConfigError, derive
from mmjax.data import coco, pixels, shapes, sources, tokenizer as tokenizer_lib
from mmjax.select import retrieve


def default_data_config() -> ml_collections.ConfigDict:
  """`config.data`: where records come from and how they become batches."""
  return ml_collections.ConfigDict(dict(
      source="generated",  # 'generated' | 'jsonl' | 'arrayrecord' | 'tfds' | 'shapes' | 'coco'
      task="reverse",  # generated task: reverse | add | sort | copy
      train_path="",  # jsonl/arrayrecord: file, comma-separated files or glob
      eval_path="",  # same; '' = no eval set
      tfds_name="",  # e.g. 'my_dataset:1.0.0' (already prepared in tfds_data_dir)
      tfds_data_dir="",  # '' = TFDS default
      train_split="train",  # tfds / coco split for training (coco: e.g. 'train2017')
      eval_split="",  # tfds / coco split for eval; '' = no eval set
      coco_root="",  # coco: the directory with annotations/instances_SPLIT.json and SPLIT/ images
      text_key="text",  # record field with plain text (loss on all tokens)
      prompt_key="prompt",  # record field with the prompt (no loss)
      response_key="response",  # record field with the response (loss)
      image_key="image",  # record field with media: an image path (relative to the JSONL file) or pixels
      #                     (TFDS), or a list of them (video frames); VLMs only
      tokenizer="builtin",  # 'builtin' (characters), 'builtin_words' (shapes words) or a local HF tokenizer dir
      packing=False,  # pack several examples per row (segment ids 1, 2, ...)
      num_train_examples=20_000,  # generated train set size
      num_eval_examples=256,  # generated eval set size; 0 = no eval set
      split_seed=0,  # generated sets (generated, shapes): which train and eval sets; another value draws
      #                new ones (content seeds 2 * split_seed for train, 2 * split_seed + 1 for eval)
      shuffle=True,  # reshuffle the train set every epoch with the run seed
      worker_count=0,  # Grain worker processes; 0 = in-process
      image_size=32,  # images are resized (jsonl image paths) or rendered (shapes) at this size
      max_objects=3,  # shapes: objects per image
      video_frames=5,  # shapes: frames per video
      max_events=4,  # shapes: most events per video (<= video_frames)
      timed=False,  # shapes: video captions state each event's frame (" at frame 2"); scored as `timing`
      background="plain",  # shapes: 'plain' (dark) or 'noise' (coloured noise behind the objects)
      shapes=(),  # shapes: the object shapes drawn (from mmjax.data.shapes_draw.SHAPES); () = square, circle,
      #            triangle. Concepts absent from one stage's data and present in another's (new concepts)
      colours=(),  # shapes: the colours drawn (from shapes_draw.PALETTE); () = red, green, blue, yellow,
      #             purple, white
      qa_skills=("count", "colour", "shape", "size", "position", "existence"),  # shapes vqa: question kinds asked
      qa_weights=(),  # shapes vqa: one weight per qa_skills entry for the question drawn; () = uniform
      qa_reasoning=(),  # shapes vqa: colour / shape / size questions answered in steps ("the red
      #                   circle is at the top. the size is large."), scored also by final answer
      qa_plain=False,  # shapes vqa: count and existence questions name no attribute ("how many
      #                  objects are there?", "is there an object at the top?")
      pool_mix=(("image_caption", 1.0), ("vqa", 3.0)),  # shapes task 'pool': (task, weight) pairs; image
      #                                                  tasks and video tasks do not mix in one batch
      responses_path="",  # JSONL of {"index", "response"}: train on those records of the train
      #                     source with these responses (rebirth SFT on a model's own answers)
      indices_path="",  # a selection file ({"indices": [...]}, mmjax.select.retrieve.write_selection):
      #                   train on only those records of the train source (data selection)
      drop_media=False,  # drop images/frames from the records: text-only examples (e.g. a language
      #                    model's adapter trained on captions alone in directed fine-tuning)
      media=(),  # the batch's pixel fields ('images', 'frames'); () = the source's own (shapes: by task,
      #            others: images); ('images', 'frames') lets one batch mix images, videos and text
      media_root="",  # relative image / video paths of jsonl records resolve here; '' = the data file's folder
      image_processor="",  # a directory with preprocessor_config.json (the tower's own pixels, e.g. the
      #                      HF model directory); '' = the built-in scaling to [-1, 1] at data.image_size
      video_fps=0.0,  # video files: 0 = video_frames frames spread over the whole video; > 0 = one frame
      #                 every 1/video_fps seconds from the start
  ))


def config_dict() -> dict:
  return {"data": default_data_config()}


def _bad(key, value, valid) -> ValueError:
  return ValueError(f"data.{key}={value!r} is not valid; {valid}")


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Source:
  """One `data.source`: open(data_cfg, split) -> random-access records or None; check(data_cfg)
  and check_files(data_cfg) raise `_bad` errors; media(data_cfg) -> the pixel batch fields."""
  open: Callable
  check: Callable = lambda c: None
  check_files: Callable = lambda c: None
  media: Callable = lambda c: ("images",)


def _size(c, split) -> int:
  return c.num_train_examples if split == "train" else c.num_eval_examples


def _check_sizes(c) -> None:
  if c.num_train_examples <= 0:
    raise _bad("num_train_examples", c.num_train_examples, "expected a positive count")
  if c.split_seed < 0:
    raise _bad("split_seed", c.split_seed, "expected an integer >= 0")
  if c.num_eval_examples < 0:
    raise _bad("num_eval_examples", c.num_eval_examples, "expected a count >= 0")


def _keys(c) -> dict:
  return dict(text_key=c.text_key, prompt_key=c.prompt_key, response_key=c.response_key, image_key=c.image_key,
              media_root=c.media_root or None, video_frames=c.video_frames)


def content_seed(c, split: str) -> int:
  """The seed of a generated split's content: fixed by `data.split_seed`, not by the run's
  seed (runs with different seeds see the same sets unless split_seed changes too)."""
  return 2 * int(c.split_seed) + (0 if split == "train" else 1)


def _open_generated(c, split):
  n = _size(c, split)
  return sources.GeneratedTask(c.task, n, seed=content_seed(c, split), split=split) if n > 0 else None


def _check_generated(c) -> None:
  if c.task not in sources.GENERATED_TASKS:
    raise _bad("task", c.task, f"expected one of {', '.join(sources.GENERATED_TASKS)}")
  _check_sizes(c)


SHAPES_TASKS = shapes.TASKS + ("pool",)


def _shapes_config(c) -> shapes.ShapesConfig:
  names = {k: tuple(c[k]) for k in ("shapes", "colours") if c.get(k)}
  return shapes.ShapesConfig(**names, image_size=c.image_size, max_objects=c.max_objects, video_frames=c.video_frames,
                             max_events=c.max_events, min_events=min(2, c.max_events), timed=c.timed,
                             background=c.background,
                             pool_mix=tuple((str(t), float(w)) for t, w in c.pool_mix),
                             qa_skills=tuple(c.qa_skills), qa_weights=tuple(float(w) for w in c.qa_weights),
                             qa_reasoning=tuple(c.qa_reasoning), qa_plain=bool(c.qa_plain))


def _open_shapes(c, split):
  n = _size(c, split)
  return shapes.ShapesSource(c.task, n, seed=content_seed(c, split), split=split,
                             cfg=_shapes_config(c)) if n > 0 else None


def _check_shapes(c) -> None:
  if c.task not in SHAPES_TASKS:
    raise _bad("task", c.task, f"data.source='shapes' expects one of {', '.join(SHAPES_TASKS)}")
  if c.packing:
    raise _bad("packing", c.packing, "packing is not supported with images or videos; set it to False")
  if not c.qa_skills or any(k not in shapes.QA_SKILLS for k in c.qa_skills):
    raise _bad("qa_skills", c.qa_skills, f"expected a non-empty tuple from {', '.join(shapes.QA_SKILLS)}")
  if c.qa_weights and (len(c.qa_weights) != len(c.qa_skills) or min(c.qa_weights) < 0 or sum(c.qa_weights) <= 0):
    raise _bad("qa_weights", c.qa_weights, f"expected () or {len(c.qa_skills)} weights >= 0 (one per qa_skills "
               "entry), not all 0")
  if any(k not in shapes.REASONING_SKILLS for k in c.qa_reasoning):
    raise _bad("qa_reasoning", c.qa_reasoning, f"expected skills from {', '.join(shapes.REASONING_SKILLS)}")
  for key, vocab in (("shapes", shapes.SHAPES), ("colours", shapes.COLOURS)):
    names = tuple(c[key])
    if len(set(names)) != len(names) or any(n not in vocab for n in names):
      raise _bad(key, names, f"expected () or distinct names from {', '.join(vocab)}")
  n_pairs = len(c.shapes or shapes.ShapesConfig.shapes) * len(c.colours or shapes.ShapesConfig.colours)
  if (c.task in shapes.VIDEO_TASKS or c.task == "pool") and n_pairs < c.max_events:
    raise _bad("colours", tuple(c.colours), f"a video needs >= max_events ({c.max_events}) (shape, colour) pairs; "
               f"data.shapes x data.colours give {n_pairs}")
  if c.task == "pool":
    mix = dict(tuple(p) for p in c.pool_mix)
    used = {t for t, w in mix.items() if w > 0}
    video = used & set(shapes.VIDEO_TASKS)
    if not used or not used <= set(SHAPES_TASKS) - {"pool"} or (video and video != used):
      raise _bad("pool_mix", c.pool_mix, "expected (task, weight) pairs of image tasks (image_caption, vqa) "
                 f"or of video tasks ({', '.join(shapes.VIDEO_TASKS)}): a batch holds images or videos, not both")
  if c.background not in shapes.BACKGROUNDS:
    raise _bad("background", c.background, f"expected one of {', '.join(shapes.BACKGROUNDS)}")
  if not 1 <= c.max_events <= c.video_frames:
    raise _bad("max_events", c.max_events, f"expected 1 <= max_events <= data.video_frames ({c.video_frames})")
  _check_sizes(c)


def _shapes_media(c) -> tuple:
  mix = dict(tuple(p) for p in c.pool_mix)
  video = c.task in shapes.VIDEO_TASKS or (c.task == "pool" and any(mix.get(t, 0) > 0 for t in shapes.VIDEO_TASKS))
  return ("frames",) if video else ("images",)


def _open_files(c, split):
  path = c.train_path if split == "train" else c.eval_path
  if not path:
    return None
  return (sources.JsonlSource if c.source == "jsonl" else sources.ArrayRecordSource)(path, **_keys(c))


def _check_files_paths(c) -> None:
  if not c.train_path:
    raise _bad("train_path", c.train_path, f"data.source={c.source!r} needs a file, list or glob")


def _check_files_exist(c) -> None:
  for key in ("train_path", "eval_path"):
    if c[key]:
      try:
        sources.expand_paths(c[key])
      except ValueError as e:
        raise _bad(key, c[key], str(e)) from None


def _open_tfds(c, split):
  name = c.train_split if split == "train" else c.eval_split
  return sources.TfdsSource(c.tfds_name, name, c.tfds_data_dir, **_keys(c)) if name else None


def _check_tfds(c) -> None:
  if not c.tfds_name:
    raise _bad("tfds_name", c.tfds_name, "data.source='tfds' needs a dataset name")
  if not c.train_split:
    raise _bad("train_split", c.train_split, "expected a TFDS split such as 'train'")


def _check_tfds_installed(c) -> None:
  if importlib.util.find_spec("tensorflow_datasets") is None:
    raise _bad("source", c.source, "tensorflow-datasets is not installed: pip install 'mmjax[tfds]'")


def _open_coco(c, split):
  name = c.train_split if split == "train" else c.eval_split
  return coco.CocoSource(c.coco_root, name, c.image_size, c.max_objects) if name else None


def _check_coco(c) -> None:
  if c.packing:
    raise _bad("packing", c.packing, "packing is not supported with images; set it to False")


def _check_coco_files(c) -> None:
  for key in ("train_split", "eval_split"):
    split = c[key]
    want = os.path.join(str(c.coco_root), "annotations", f"instances_{split}.json")
    if split and not os.path.isfile(want):
      raise _bad("coco_root", c.coco_root, f"expected {want} (data.{key}={split!r})")


SOURCES = {
    "generated": Source(_open_generated, _check_generated, media=lambda c: ()),
    "jsonl": Source(_open_files, _check_files_paths, _check_files_exist),
    "arrayrecord": Source(_open_files, _check_files_paths, _check_files_exist),
    "tfds": Source(_open_tfds, _check_tfds, _check_tfds_installed),
    "shapes": Source(_open_shapes, _check_shapes, media=_shapes_media),
    "coco": Source(_open_coco, _check_coco, _check_coco_files),
}


def check_values(c) -> None:
  """Raises ValueError naming `data.KEY`, the value and what is valid. Opens no file."""
  if c.source not in SOURCES:
    raise _bad("source", c.source, f"expected one of {', '.join(SOURCES)}")
  for key in ("text_key", "prompt_key", "response_key"):
    if not isinstance(c[key], str) or not c[key]:
      raise _bad(key, c[key], "expected a non-empty field name")
  if not isinstance(c.worker_count, int) or c.worker_count < 0:
    raise _bad("worker_count", c.worker_count, "expected an integer >= 0")
  for key in ("packing", "shuffle"):
    if not isinstance(c[key], bool):
      raise _bad(key, c[key], "expected True or False")
  if not set(c.media) <= {"images", "frames"}:
    raise _bad("media", c.media, "expected a tuple of 'images' and / or 'frames' (or () for the source's own)")
  if not c.video_fps >= 0:
    raise _bad("video_fps", c.video_fps, "expected 0 (uniform over the video) or a rate > 0")
  SOURCES[c.source].check(c)


def check_files(c) -> None:
  """Raises ValueError when a file or directory the data config names is missing."""
  tok = c.tokenizer
  if tok not in tokenizer_lib.BUILTINS and not os.path.isfile(os.path.join(str(tok), "tokenizer.json")):
    raise _bad("tokenizer", tok, "expected 'builtin', 'builtin_words' or a local directory holding tokenizer.json")
  if c.media_root and not os.path.isdir(c.media_root):
    raise _bad("media_root", c.media_root, "expected a directory (relative media paths resolve there)")
  if c.image_processor:
    size = pixels.for_data(c).size  # reads and checks preprocessor_config.json
    if size != (c.image_size, c.image_size):
      raise _bad("image_size", c.image_size, f"data.image_processor={c.image_processor!r} gives {size[0]}x{size[1]} "
                 f"pixels; set data.image_size={size[0]}" if size[0] == size[1] else
                 f"data.image_processor gives non-square {size[0]}x{size[1]} pixels, which mmjax does not support")
  SOURCES[c.source].check_files(c)


def validate_data_config(data_cfg) -> None:
  """Values and files of a data config (`check_values` then `check_files`)."""
  check_values(data_cfg)
  check_files(data_cfg)


def validate(config, env) -> None:
  """The data owner's checks of a run config: values always, files when `env.files`."""
  try:
    (validate_data_config if env.files else check_values)(config.data)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def overridden(data_cfg, overrides, where: str, files: bool = False) -> ml_collections.ConfigDict:
  """`data_cfg` with `overrides` (data keys) applied, checked as data in its own right (files
  too when `files`); a ConfigError names `config.WHERE.KEY` for an unknown key or a bad value."""
  items = overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides or {})
  bad = [k for k in items if k not in data_cfg]
  if bad:
    raise ConfigError(f"config.{where}.{bad[0]} is not a data key; valid: {', '.join(sorted(data_cfg.keys()))}")
  out = derive(data_cfg, items)
  try:
    (validate_data_config if files else check_values)(out)
  except ValueError as e:
    raise ConfigError(f"config.{where}: {e}") from None
  return out


def media_fields(data_cfg) -> tuple[str, ...]:
  """The pixel batch fields records of this data give a VLM: `data.media`, else the source's
  ('images',) or ('frames',); () for text-only data."""
  if data_cfg.drop_media:
    return ()
  if data_cfg.media:
    return tuple(data_cfg.media)
  return SOURCES[data_cfg.source].media(data_cfg)


def make_source(data_cfg, split: str):
  """The train or eval source named by a data config, or None when the split has none."""
  if data_cfg.source not in SOURCES:
    raise _bad("source", data_cfg.source, f"expected one of {', '.join(SOURCES)}")
  return SOURCES[data_cfg.source].open(data_cfg, split)


# ----------------------------------------------------------------------------- record options


class ReplacedResponses:
  """The records of `source` named in a responses file, with the file's responses."""

  def __init__(self, source, path: str):
    self.source, self.rows = source, []
    with open(path) as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
            self.rows.append((int(row["index"]), str(row["response"])))
          except (ValueError, KeyError, TypeError) as e:
            raise sources.RecordError(f"{path}:{n}: expected {{\"index\": int, \"response\": str}} ({e})") from None

  def __len__(self):
    return len(self.rows)

  def __getitem__(self, i):
    index, response = self.rows[int(i)]
    return dict(self.source[index], response=response)

  def __repr__(self):
    return f"ReplacedResponses({self.source!r}, {len(self)} responses)"


class Subset:
  """The records of `source` at the indices of a selection file, in the file's order."""

  def __init__(self, source, path: str):
    if not os.path.isfile(path):
      raise ValueError(f"data.indices_path={path!r} does not exist; expected a selection file "
                       "written by mmjax.select.retrieve.write_selection")
    try:
      self.indices, _ = retrieve.read_selection(path)
    except ValueError as e:  # json.JSONDecodeError is a ValueError
      raise ValueError(f"data.indices_path={path!r} is not a selection file: {e}") from None
    self.source = source
    bad = [int(i) for i in self.indices if not 0 <= i < len(source)]
    if bad:
      raise ValueError(f"data.indices_path={path!r} holds index {bad[0]}, outside the train source "
                       f"{source!r} of {len(source)} records")

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[int(i)])]

  def __repr__(self):
    return f"Subset({self.source!r}, {len(self)} of {len(self.source)})"


class TextOnly:
  """`source`'s records without their pixels (`image`, `frames` and the arrays that go with them)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return {k: v for k, v in self.source[i].items() if k not in ("image", "frames", "masks", "boxes", "visible")}

  def __repr__(self):
    return f"TextOnly({self.source!r})"


def open_source(data_cfg, split: str):
  """The train or eval source of a data config, with `responses_path`, `indices_path`
  (train only) and `drop_media` applied; None when the split has no source."""
  source = make_source(data_cfg, split)
  if split == "train" and data_cfg.get("responses_path") and source is not None:
    source = ReplacedResponses(source, data_cfg.responses_path)
  if split == "train" and data_cfg.get("indices_path") and source is not None:
    source = Subset(source, data_cfg.indices_path)
  if data_cfg.get("drop_media") and source is not None:
    source = TextOnly(source)
  if source is not None and len(source) == 0:
    raise ValueError(f"data {split} source {source!r} has no records")
  return source


def records(data_cfg, split: str, n: int) -> list[dict]:
  """The first `n` records of a split (fewer if it is smaller; [] when it has none)."""
  source = open_source(data_cfg, split)
  if source is None or n <= 0:
    return []
  return [source[i] for i in range(min(n, len(source)))]
