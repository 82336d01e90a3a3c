"""Records -> token batches through Grain.

A batch is a dict of int32 numpy arrays, each [B, T] (B = this process's share of the
global batch, T = seq_len):

  tokens       input ids: bos + record tokens (+ eos), truncated, pad_id after the end
  targets      next token: tokens[b, i] predicts targets[b, i]
  loss_mask    1 where targets is a response / assistant token (every token for `text`
               records) or the final eos; 0 on prompts, role headers and padding
  segment_ids  1, 2, 3... per packed example in a row; 0 on padding
  positions    0..n-1 within each example; 0 on padding

The train order is a function of the seed only: the source is shuffled per epoch
(`MapDataset.shuffle` after `repeat` reseeds each epoch), repeated forever, and process p
reads rows p, p+P, p+2P... of it, so the P local batches of one step together are the
rows of the single-process global batch. The returned `grain.DatasetIterator` has
`get_state()` / `set_state()`; checkpoint it with `grain.checkpoint.CheckpointSave(it)` /
`CheckpointRestore(it)` inside an orbax `Composite`.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os

import grain
import ml_collections
import numpy as np

from mmjax.data import sources, tokenizer as tokenizer_lib

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
SOURCES = ("generated", "jsonl", "arrayrecord", "tfds", "shapes", "coco")
SHAPES_TASKS = ("image_caption", "vqa", "video_caption", "pool")
MEDIA_FIELDS = ("images", "frames")


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
      shuffle=True,  # reshuffle the train set every epoch with the run seed
      worker_count=0,  # Grain worker processes; 0 = in-process
      image_size=32,  # images are resized (jsonl image paths) or rendered (shapes) at this size
      max_objects=3,  # shapes: objects per image
      video_frames=5,  # shapes: frames per video
      max_events=4,  # shapes: most events per video (<= video_frames)
      timed=False,  # shapes: video captions state each event's frame (" at frame 2"); scored as `timing`
      qa_skills=("count", "colour", "shape", "size", "position", "existence"),  # shapes vqa: question kinds asked
      pool_mix=(("image_caption", 1.0), ("vqa", 3.0)),  # shapes task 'pool': (task, weight) pairs; image
      #                                                  tasks and video_caption do not mix in one batch
      responses_path="",  # JSONL of {"index", "response"}: train on those records of the train
      #                     source with these responses (rebirth SFT on a model's own answers)
      indices_path="",  # a selection file ({"indices": [...]}, mmjax.select.retrieve.write_selection):
      #                   train on only those records of the train source (data selection)
      drop_media=False,  # drop images/frames from the records: text-only examples (e.g. a language
      #                    model's adapter trained on captions alone in directed fine-tuning)
  ))


def _bad(key, value, valid) -> ValueError:
  return ValueError(f"data.{key}={value!r} is not valid; {valid}")


def validate_data_config(data_cfg) -> None:
  """Raises ValueError naming `data.KEY`, the value and what is valid. Opens no data."""
  c = data_cfg
  if c.source not in SOURCES:
    raise _bad("source", c.source, f"expected one of {', '.join(SOURCES)}")
  tok = c.tokenizer
  if tok not in tokenizer_lib.BUILTINS and not os.path.isfile(os.path.join(str(tok), "tokenizer.json")):
    raise _bad("tokenizer", tok, "expected 'builtin', 'builtin_words' or a local directory holding tokenizer.json")
  for key in ("text_key", "prompt_key", "response_key"):
    if not isinstance(c[key], str) or not c[key]:
      raise _bad(key, c[key], "expected a non-empty field name")
  if not isinstance(c.worker_count, int) or c.worker_count < 0:
    raise _bad("worker_count", c.worker_count, "expected an integer >= 0")
  for key in ("packing", "shuffle"):
    if not isinstance(c[key], bool):
      raise _bad(key, c[key], "expected True or False")
  if c.source == "shapes":
    if c.task not in SHAPES_TASKS:
      raise _bad("task", c.task, f"data.source='shapes' expects one of {', '.join(SHAPES_TASKS)}")
    if c.packing:
      raise _bad("packing", c.packing, "packing is not supported with images or videos; set it to False")
    from mmjax.data import shapes
    if not c.qa_skills or any(k not in shapes.QA_SKILLS for k in c.qa_skills):
      raise _bad("qa_skills", c.qa_skills, f"expected a non-empty tuple from {', '.join(shapes.QA_SKILLS)}")
    if c.task == "pool":
      mix = dict(tuple(p) for p in c.pool_mix)
      used = {t for t, w in mix.items() if w > 0}
      if not used or not used <= set(SHAPES_TASKS) - {"pool"} or ("video_caption" in used and len(used) > 1):
        raise _bad("pool_mix", c.pool_mix, "expected (task, weight) pairs of image tasks (image_caption, vqa) "
                   "or of video_caption alone (a batch holds images or videos, not both)")
    if not 1 <= c.max_events <= c.video_frames:
      raise _bad("max_events", c.max_events, f"expected 1 <= max_events <= data.video_frames ({c.video_frames})")
  if c.source in ("generated", "shapes"):
    if c.source == "generated" and c.task not in sources.GENERATED_TASKS:
      raise _bad("task", c.task, f"expected one of {', '.join(sources.GENERATED_TASKS)}")
    if c.num_train_examples <= 0:
      raise _bad("num_train_examples", c.num_train_examples, "expected a positive count")
    if c.num_eval_examples < 0:
      raise _bad("num_eval_examples", c.num_eval_examples, "expected a count >= 0")
  elif c.source in ("jsonl", "arrayrecord"):
    if not c.train_path:
      raise _bad("train_path", c.train_path, f"data.source={c.source!r} needs a file, list or glob")
    for key in ("train_path", "eval_path"):
      if c[key]:
        try:
          sources.expand_paths(c[key])
        except ValueError as e:
          raise _bad(key, c[key], str(e)) from None
  elif c.source == "coco":
    for key in ("train_split", "eval_split"):
      split = c[key]
      if split and not os.path.isfile(os.path.join(str(c.coco_root), "annotations", f"instances_{split}.json")):
        raise _bad("coco_root", c.coco_root, f"expected {os.path.join(str(c.coco_root), 'annotations', f'instances_{split}.json')} "
                   f"(data.{key}={split!r})")
    if c.packing:
      raise _bad("packing", c.packing, "packing is not supported with images; set it to False")
  elif c.source == "tfds":
    if not c.tfds_name:
      raise _bad("tfds_name", c.tfds_name, "data.source='tfds' needs a dataset name")
    if not c.train_split:
      raise _bad("train_split", c.train_split, "expected a TFDS split such as 'train'")
    if importlib.util.find_spec("tensorflow_datasets") is None:
      raise _bad("source", c.source, "tensorflow-datasets is not installed: pip install 'mmjax[tfds]'")


# ----------------------------------------------------------------------------- tokenizing


def _content(record: dict, tok) -> tuple[list[int], list[int], int]:
  """(ids, mask, eos mask) of a record, without bos/eos."""
  if "text" in record:
    ids = tok.encode(record["text"])
    return ids, [1] * len(ids), 1
  if "prompt" in record:
    p, r = tok.encode(record["prompt"]), tok.encode(record["response"])
    return p + r, [0] * len(p) + [1] * len(r), 1
  if "messages" in record:
    ids, mask = tok.encode_chat(record["messages"])
    return list(ids), list(mask), int(record["messages"][-1]["role"] == "assistant")
  raise sources.RecordError(f"record has keys {sorted(record)}; expected text, prompt/response or messages")


def media_kind(record: dict) -> str | None:
  """'image' or 'video' when a record carries pixels (or an image path), else None."""
  if "frames" in record:
    return "video"
  if "image" in record:
    return "image"
  return None


def _visual_prefix(record, tokenizer, visual_tokens, seq_len):
  kind = media_kind(record)
  if kind is None:
    return []
  if not visual_tokens or kind not in visual_tokens:
    raise ValueError(f"a record has an {kind} but the model takes no {kind} input")
  if getattr(tokenizer, "image_id", None) is None:
    raise ValueError("the tokenizer has no '<image>' token to mark visual positions; add one to its vocabulary")
  n = visual_tokens[kind]
  if n >= seq_len:
    raise ValueError(f"seq_len={seq_len} cannot hold the {n} visual tokens of an {kind} plus text; raise seq_len")
  return [tokenizer.image_id] * n


def tokenize_example(record: dict, tokenizer, seq_len: int, visual_tokens: dict | None = None) -> dict:
  """Unpadded `tokens`, `targets`, `loss_mask` (int32 [n], 1 <= n <= seq_len) of a record.

  Sequence: [bos] + visual placeholders + content + [eos] (bos when the tokenizer has one
  and the content does not already start with it; eos unless the content already ends
  with it), truncated to seq_len + 1 and shifted by one. `visual_tokens` maps 'image' /
  'video' to the number of placeholder tokens the model replaces with visual embeddings.
  """
  ids, mask, eos_mask = _content(record, tokenizer)
  prefix = _visual_prefix(record, tokenizer, visual_tokens, seq_len)
  ids, mask = prefix + ids, [0] * len(prefix) + mask
  if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
    ids, mask = [tokenizer.bos_id] + ids, [0] + mask
  if not ids or ids[-1] != tokenizer.eos_id:
    ids, mask = ids + [tokenizer.eos_id], mask + [eos_mask]
  if len(ids) < 2:  # no bos and empty content: give the eos something to be predicted from
    ids, mask = [tokenizer.pad_id] + ids, [0] + mask
  ids = np.asarray(ids[:seq_len + 1], np.int32)
  mask = np.asarray(mask[:seq_len + 1], np.int32)
  return {"tokens": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def prompt_ids(record: dict, tokenizer, visual_tokens: dict | None = None, seq_len: int = 1 << 30) -> list[int]:
  """The tokens a sampler starts from to answer a record, laid out as in training: bos +
  prompt for prompt/response records; for messages, the turns before the last assistant
  turn plus the assistant header. Generation should stop at `tokenizer.eos_id`."""
  if "prompt" in record:
    ids = tokenizer.encode(record["prompt"])
  elif "messages" in record:
    msgs = record["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    ids = tokenizer.encode_chat_prompt(msgs[:last])
  else:
    raise ValueError("prompt_ids needs a prompt/response or messages record, got a text record")
  ids = _visual_prefix(record, tokenizer, visual_tokens, seq_len) + list(ids)
  if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
    ids = [tokenizer.bos_id] + ids
  return ids


def pad_example(example: dict, seq_len: int, pad_id: int) -> dict:
  """One unpadded example -> the five batch fields, each int32 [seq_len]."""
  n = len(example["tokens"])
  out = {}
  for key, fill in (("tokens", pad_id), ("targets", pad_id), ("loss_mask", 0)):
    out[key] = np.full(seq_len, fill, np.int32)
    out[key][:n] = example[key]
  out["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  out["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
  return out


def tokenize_record(record: dict, tokenizer, seq_len: int, visual_tokens: dict | None = None,
                    image_size: int = 32) -> dict:
  """A record -> dict of int32 [seq_len] arrays: tokens, targets, loss_mask, segment_ids,
  positions; plus `images` float32 [H, W, 3] or `frames` [T, H, W, 3] (in [-1, 1]) for media."""
  out = pad_example(tokenize_example(record, tokenizer, seq_len, visual_tokens), seq_len, tokenizer.pad_id)
  kind = media_kind(record)
  if kind == "image":
    out["images"] = load_image(record["image"], image_size)
  elif kind == "video":
    out["frames"] = np.stack([load_image(f, image_size) for f in record["frames"]])
  return out


def load_image(image, size: int) -> np.ndarray:
  """uint8 [H, W, 3] pixels or an image file path -> float32 [size, size, 3] in [-1, 1]."""
  if isinstance(image, (str, os.PathLike)):
    from PIL import Image
    try:
      with Image.open(image) as im:
        image = np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC))
    except (OSError, ValueError) as e:
      raise ValueError(f"image {image}: cannot be read ({e})") from None
  image = np.asarray(image)
  if image.shape[:2] != (size, size):
    from PIL import Image
    image = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.BICUBIC))
  return (image.astype(np.float32) / 127.5 - 1.0)


def _tokenize_padded(record, *, tokenizer, seq_len, visual_tokens=None, image_size=32):
  return tokenize_record(record, tokenizer, seq_len, visual_tokens, image_size)


def _tokenize_unpadded(record, *, tokenizer, seq_len):
  return tokenize_example(record, tokenizer, seq_len)


def _from_packed(packed: dict) -> dict:
  """Grain's packer names the aux fields per feature; all features share one layout."""
  return {"tokens": packed["tokens"], "targets": packed["targets"], "loss_mask": packed["loss_mask"],
          "segment_ids": packed["tokens_segment_ids"], "positions": packed["tokens_positions"]}


def _own_arrays(batch: dict) -> dict:
  return {k: np.array(v, np.float32 if k in MEDIA_FIELDS else np.int32) for k, v in batch.items()}


# ----------------------------------------------------------------------------- iterators


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not valid for process_count={process_count}")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"global batch {global_batch} must be a positive multiple of the process "
                     f"count {process_count}")
  return global_batch // process_count


class _ReplacedResponses:
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
    return f"_ReplacedResponses({self.source!r}, {len(self)} responses)"


class _Subset:
  """The records of `source` at the indices of a selection file, in the file's order."""

  def __init__(self, source, path: str):
    from mmjax.select import retrieve
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
    return f"_Subset({self.source!r}, {len(self)} of {len(self.source)})"


class _TextOnly:
  """`source`'s records without their pixels (`image`, `frames` and the arrays that go with them)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return {k: v for k, v in self.source[i].items() if k not in ("image", "frames", "masks", "boxes", "visible")}

  def __repr__(self):
    return f"_TextOnly({self.source!r})"


def open_source(data_cfg, split: str):
  """The train or eval source of a data config, with `responses_path`, `indices_path`
  (train only) and `drop_media` applied; None when the split has no source."""
  source = sources.make_source(data_cfg, split)
  if split == "train" and data_cfg.get("responses_path") and source is not None:
    source = _ReplacedResponses(source, data_cfg.responses_path)
  if split == "train" and data_cfg.get("indices_path") and source is not None:
    source = _Subset(source, data_cfg.indices_path)
  if data_cfg.get("drop_media") and source is not None:
    source = _TextOnly(source)
  if source is not None and len(source) == 0:
    raise ValueError(f"data {split} source {source!r} has no records")
  return source


def make_train_dataset(data_cfg, *, global_batch: int, seq_len: int, seed: int, tokenizer,
                       process_index: int = 0, process_count: int = 1,
                       visual_tokens: dict | None = None, example_fn=None) -> grain.IterDataset:
  """The infinite train `IterDataset` of local batches (see the module docstring).

  `example_fn(record) -> dict of arrays` replaces the tokenizing of records (an objective
  with other batch fields, e.g. ViSFT's images and detection targets)."""
  validate_data_config(data_cfg)
  local = _local_batch(global_batch, process_index, process_count)
  seed = int(seed) % 2**32
  source = open_source(data_cfg, "train")
  ds = grain.MapDataset.source(source)
  if data_cfg.shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat()[process_index::process_count]  # this process reads only its rows
  # Tokenizing is cheap next to a train step: no reader threads unless workers are asked for.
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  if example_fn is not None:
    it = ds.map(example_fn).batch(local, drop_remainder=True).to_iter_dataset(read)
  elif data_cfg.packing:
    ds = ds.map(functools.partial(_tokenize_unpadded, tokenizer=tokenizer, seq_len=seq_len))
    it = grain.experimental.FirstFitPackIterDataset(
        ds.to_iter_dataset(read),
        length_struct={k: seq_len for k in ("tokens", "targets", "loss_mask")},
        num_packing_bins=local, seed=seed, shuffle_bins=True,
        padding_struct={"tokens": tokenizer.pad_id, "targets": tokenizer.pad_id, "loss_mask": 0})
    it = it.map(_from_packed).batch(local, drop_remainder=True)
  else:
    ds = ds.map(functools.partial(_tokenize_padded, tokenizer=tokenizer, seq_len=seq_len,
                                  visual_tokens=visual_tokens, image_size=data_cfg.image_size))
    it = ds.batch(local, drop_remainder=True).to_iter_dataset(read)
  if data_cfg.worker_count > 0:
    from absl import flags  # Grain workers read absl flags; outside absl.app nobody parsed them
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.worker_count))
    it = it.map(_own_arrays)  # batches arrive in shared memory; hand out ordinary arrays
  return it


def make_train_iterator(data_cfg, *, global_batch: int, seq_len: int, seed: int, tokenizer,
                        process_index: int = 0, process_count: int = 1,
                        visual_tokens: dict | None = None, example_fn=None) -> grain.DatasetIterator:
  """An endless iterator of local batches (dicts of int32 [global_batch // process_count,
  seq_len] arrays) with `get_state()` / `set_state()` for exact resume."""
  return iter(make_train_dataset(data_cfg, global_batch=global_batch, seq_len=seq_len, seed=seed,
                                 tokenizer=tokenizer, process_index=process_index,
                                 process_count=process_count, visual_tokens=visual_tokens,
                                 example_fn=example_fn))


def _blank(example: dict) -> dict:
  return dict(example, loss_mask=np.zeros_like(example["loss_mask"]))


def make_eval_batches(data_cfg, *, batch: int, seq_len: int, tokenizer,
                      process_index: int = 0, process_count: int = 1,
                      visual_tokens: dict | None = None, example_fn=None, blank=None,
                      limit: int = 0) -> list[dict]:
  """Every eval record once (the first `limit` when > 0), in order, as local batches of
  `batch // process_count` rows.

  `batch` is the global eval batch; process p holds rows p, p+P, ... of each global batch.
  The last global batch is filled with `blank(example 0)` (default: record 0 with an all-0
  loss_mask), so every process has the same number of equally shaped batches. [] when there
  is no eval set. `example_fn` as in `make_train_dataset`.
  """
  validate_data_config(data_cfg)
  local = _local_batch(batch, process_index, process_count)
  source = open_source(data_cfg, "eval")
  if source is None:
    return []
  fn = example_fn or functools.partial(_tokenize_padded, tokenizer=tokenizer, seq_len=seq_len,
                                       visual_tokens=visual_tokens, image_size=data_cfg.image_size)
  ds = grain.MapDataset.source(source)
  if limit:
    ds = ds[:limit]
  ds = ds.map(fn)
  blank = blank or _blank
  n = len(ds)
  n_batches = -(-n // batch)
  filler = None
  out = []
  for b in range(n_batches):
    rows = []
    for i in range(b * batch + process_index, (b + 1) * batch, process_count):
      if i < n:
        rows.append(ds[i])
      else:
        if filler is None:
          filler = blank(ds[0])
        rows.append(filler)
    assert len(rows) == local
    out.append({k: np.stack([r[k] for r in rows]) for k in rows[0]})
  return out
