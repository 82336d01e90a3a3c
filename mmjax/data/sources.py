"""Random-access record sources for Grain (`__len__` / `__getitem__`).

Every source yields one of three record dicts:

  {"text": str}                          loss on every token
  {"prompt": str, "response": str}       loss on the response
  {"messages": [{"role", "content"}...]} loss on assistant turns

Sources: JSONL files (line offsets indexed once, lines parsed on access), ArrayRecord files
of JSON bytes, TFDS data sources (optional `tfds` extra) and `GeneratedTask`, small
synthetic tasks that need no files. `mmjax.data.catalog` maps `data.source` names to them
(and to the shapes and COCO sources).
"""
from __future__ import annotations

import glob
import json
import os
import random
import string
import zlib

import numpy as np

from mmjax.data import steps

GENERATED_TASKS = ("reverse", "add", "sort", "copy")
_ALNUM = string.ascii_lowercase + string.digits


class Record(dict):
  """A record: a plain dict, plus `where` it came from ('file:line'), which is not one of its
  keys (records compare and copy as dicts)."""
  where = None


class RecordError(ValueError):
  """A record that is not valid JSON or matches none of the record formats; one line."""


def to_record(raw, where: str, text_key="text", prompt_key="prompt", response_key="response",
              image_key="image", base_dir: str | None = None, media_root: str | None = None,
              video_frames: int = 0) -> dict:
  """Maps a raw dict onto one of the record formats; `where` names it in errors.

  A record may carry media under `image_key`: an image file path (relative paths are taken
  from `media_root`, else `base_dir`, the data file's directory), uint8 pixels [H, W, 3]
  (TFDS images), an encoded array (shapes ArrayRecord files; their videos under `frames`),
  or a list of paths or pixels (the frames of a video); it comes out as `image` (one) or
  `frames` (a list). A `video` file path (mp4, webm, avi, mkv, ...) comes out as `video`.
  LLaVA-format `conversations` ([{"from": "human" | "gpt" | "system", "value": ...}]) become
  `messages`; `<image>` / `<video>` in the text mark where the media go. A `video` with
  timed `segments` (YouCook2's `annotations`) becomes a step-caption record with `steps`
  (`mmjax.data.steps`; frames counted over `video_frames` sampled frames).
  """
  if not isinstance(raw, dict):
    raise RecordError(f"{where}: expected a JSON object, got {type(raw).__name__}")
  base_dir = media_root or base_dir
  video_path = None
  if raw.get("video") is not None:
    video = raw["video"]
    if not isinstance(video, str) or not video:
      raise RecordError(f"{where}: 'video' must be a video file path, got {video!r:.60}")
    video_path = video if os.path.isabs(video) or base_dir is None else os.path.join(base_dir, video)
    if not os.path.isfile(video_path):
      raise RecordError(f"{where}: 'video' names {video_path}, which does not exist")
  segments = raw.get("segments", raw.get("annotations"))
  if segments is not None and video_path is not None:
    out = Record(_step_record(raw, where, segments, video_path, video_frames, prompt_key))
  else:
    out = Record(_text_record(raw, where, text_key, prompt_key, response_key))
  out.where = where  # errors found later (decoding, placeholders) name the record
  if video_path is not None:
    out["video"] = video_path
  for key in (image_key, "frames"):  # "frames": the encoded videos of shapes ArrayRecord files
    media = raw.get(key) if key else None
    if media is None:
      continue
    if isinstance(media, dict) and "b64" in media:  # an encoded array (mmjax.data.shapes.to_json_record)
      media = _decode_array(media, where, key)
      media = list(media) if media.ndim == 4 else media
    if isinstance(media, (list, tuple)):
      if not len(media):
        raise RecordError(f"{where}: {key!r} is an empty list; expected image paths (the frames of a video)")
      out["frames"] = [_media(m, where, key, base_dir) for m in media]
    else:
      out["image"] = _media(media, where, key, base_dir)
  return out


def _decode_array(value, where, key):
  import base64
  try:
    return np.frombuffer(base64.b64decode(value["b64"]), np.dtype(value["dtype"])).reshape(value["shape"])
  except (KeyError, TypeError, ValueError) as e:
    raise RecordError(f"{where}: {key!r} is not an encoded array ({e})") from None


def _media(value, where, key, base_dir):
  """One image of a record: an existing file path, or pixels as uint8 [H, W, 3]."""
  if isinstance(value, bytes):
    value = value.decode("utf-8")
  if isinstance(value, str):
    path = value if os.path.isabs(value) or base_dir is None else os.path.join(base_dir, value)
    if not os.path.isfile(path):
      raise RecordError(f"{where}: {key!r} names {path}, which does not exist")
    return path
  arr = np.asarray(value)
  if arr.ndim == 2:  # grayscale
    arr = np.repeat(arr[..., None], 3, axis=-1)
  if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
    raise RecordError(f"{where}: {key!r} has shape {arr.shape}; expected a file path or pixels [H, W, 3]")
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  return arr[..., :3].astype(np.uint8)


def _step_record(raw, where, segments, video_path, video_frames, prompt_key) -> dict:
  """A video's timed segments as a step-caption prompt/response record (`mmjax.data.steps`)."""
  if not isinstance(segments, list):
    raise RecordError(f"{where}: 'segments' must be a list of {{'segment': [start_s, end_s], 'sentence'}}")
  if video_frames <= 0:
    raise RecordError(f"{where}: timed segments need data.video_frames > 0 (the frames a step is stated in)")
  try:
    duration = float(raw["duration"]) if raw.get("duration") else steps.video_duration(video_path)
    text, spans = steps.step_record(segments, duration, video_frames, where)
  except ValueError as e:
    raise RecordError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
  prompt = raw.get(prompt_key) if isinstance(raw.get(prompt_key), str) else steps.STEP_PROMPT
  return {"prompt": prompt, "response": text, "steps": spans}


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _conversation(raw, where) -> dict:
  """A LLaVA-format record's `conversations` as `messages`."""
  turns = raw["conversations"]
  if not isinstance(turns, list) or not turns:
    raise RecordError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
  msgs = []
  for i, t in enumerate(turns):
    if not isinstance(t, dict) or t.get("from") not in _ROLES or not isinstance(t.get("value"), str):
      raise RecordError(f"{where}: conversations[{i}] must be {{'from': one of {', '.join(_ROLES)}, "
                        f"'value': str}}, got {t!r:.80}")
    msgs.append({"role": _ROLES[t["from"]], "content": t["value"]})
  if not any(m["role"] == "assistant" for m in msgs):
    raise RecordError(f"{where}: 'conversations' has no 'gpt' turn to learn from")
  return {"messages": msgs}


def _text_record(raw, where, text_key, prompt_key, response_key) -> dict:
  if "conversations" in raw:
    return _conversation(raw, where)
  if "messages" in raw:
    msgs = raw["messages"]
    ok = isinstance(msgs, list) and msgs and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in msgs)
    if not ok:
      raise RecordError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
  if prompt_key in raw and response_key in raw:
    p, r = _as_str(raw[prompt_key]), _as_str(raw[response_key])
    if p is None or r is None:
      raise RecordError(f"{where}: {prompt_key!r} and {response_key!r} must be strings")
    return {"prompt": p, "response": r}
  if text_key in raw:
    t = _as_str(raw[text_key])
    if t is None:
      raise RecordError(f"{where}: {text_key!r} must be a string")
    return {"text": t}
  raise RecordError(f"{where}: record has keys {sorted(raw)[:8]}; expected {text_key!r}, or "
                    f"{prompt_key!r} and {response_key!r}, or 'messages', or 'conversations'")


def _as_str(value):
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return value if isinstance(value, str) else None


def expand_paths(spec: str, what: str = "path") -> list[str]:
  """Comma-separated paths and globs -> sorted existing files; a missing one is an error."""
  out = []
  for part in (p.strip() for p in str(spec).split(",")):
    if not part:
      continue
    if any(c in part for c in "*?["):
      matches = sorted(glob.glob(part))
      if not matches:
        raise ValueError(f"{what} {part} matches no files")
      out += matches
    elif not os.path.isfile(part):
      raise ValueError(f"{what} {part} does not exist (or is not a file)")
    else:
      out.append(part)
  if not out:
    raise ValueError(f"{what} {spec!r} names no files")
  return out


class JsonlSource:
  """Lines of one or more JSONL files, offsets indexed once, lines parsed on access; and
  `.json` files holding one list of records (LLaVA's format, read whole when opened).

  Blank lines are skipped. A bad line raises `RecordError` naming the file and line number
  (for a `.json` list: the file and the record's index) when it is read.
  """

  _CHUNK = 1 << 24

  def __init__(self, paths, **keys):
    self.paths = expand_paths(paths, "JSONL file") if isinstance(paths, str) else list(paths)
    self.keys = keys
    self._lists = {}  # file number -> the records of a .json list file
    starts, ends, lines, files = [], [], [], []
    for f, path in enumerate(self.paths):
      if path.endswith(".json"):
        self._lists[f] = self._read_list(path)
        s = np.arange(len(self._lists[f]), dtype=np.int64)
        e, n = np.full_like(s, -1), s
      else:
        s, e, n = self._index(path)
      starts.append(s), ends.append(e), lines.append(n), files.append(np.full(len(s), f, np.int32))
    self._starts, self._ends = np.concatenate(starts), np.concatenate(ends)
    self._lines, self._files = np.concatenate(lines), np.concatenate(files)
    self._fds = _FdCache(self.paths)

  @classmethod
  def _index(cls, path):
    """(start, end, line number) of every non-blank line, as int64 arrays."""
    newlines, size = [], 0
    with open(path, "rb") as f:
      while chunk := f.read(cls._CHUNK):
        newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == 10) + size)
        size += len(chunk)
    nl = np.concatenate(newlines) if newlines else np.zeros(0, np.int64)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [size]]).astype(np.int64)
    numbers = np.arange(1, len(starts) + 1, dtype=np.int64)
    keep = ends - starts > 0
    return starts[keep], ends[keep], numbers[keep]

  @staticmethod
  def _read_list(path):
    with open(path, "rb") as f:
      try:
        items = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecordError(f"{path}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(items, list):
      raise RecordError(f"{path}: a .json data file must hold a list of records, got {type(items).__name__}")
    return items

  def __len__(self):
    return len(self._starts)

  def __getitem__(self, index):
    index = int(index)
    f, start, end = int(self._files[index]), int(self._starts[index]), int(self._ends[index])
    base_dir = os.path.dirname(os.path.abspath(self.paths[f]))
    if end < 0:  # an item of a .json list
      return to_record(self._lists[f][start], f"{self.paths[f]} record {start}", base_dir=base_dir, **self.keys)
    where = f"{self.paths[f]}:{int(self._lines[index])}"
    raw = os.pread(self._fds.get(f), end - start, start)  # thread-safe, no shared seek position
    try:
      obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
    return to_record(obj, where, base_dir=base_dir, **self.keys)

  def __repr__(self):
    return f"JsonlSource({self.paths}, n={len(self)})"


class _FdCache:
  """Read-only file descriptors, opened lazily, re-opened after fork, closed when dropped."""

  def __init__(self, paths):
    self.paths, self._fds, self._pid = paths, {}, None

  def get(self, f: int) -> int:
    if self._pid != os.getpid():  # Grain worker processes must not share descriptors
      self._fds, self._pid = {}, os.getpid()
    if f not in self._fds:
      self._fds[f] = os.open(self.paths[f], os.O_RDONLY)
    return self._fds[f]

  def __getstate__(self):
    return {"paths": self.paths, "_fds": {}, "_pid": None}

  def __del__(self):
    if self._pid == os.getpid():
      for fd in self._fds.values():
        try:
          os.close(fd)
        except OSError:
          pass


class ArrayRecordSource:
  """ArrayRecord files whose records are UTF-8 JSON objects in the record formats."""

  def __init__(self, paths, **keys):
    import grain

    self.paths = expand_paths(paths, "ArrayRecord file") if isinstance(paths, str) else list(paths)
    self.keys = keys
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    index = int(index)
    where = f"{','.join(self.paths)} record {index}"
    try:
      obj = json.loads(self._source[index])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise RecordError(f"{where}: not valid JSON ({str(e).splitlines()[0]})") from None
    return to_record(obj, where, base_dir=os.path.dirname(os.path.abspath(self.paths[0])), **self.keys)

  def __repr__(self):
    return f"ArrayRecordSource({self.paths}, n={len(self)})"


def write_arrayrecord(records, path: str) -> int:
  """Writes dicts (JSON-encoded) to one ArrayRecord file; returns the count."""
  from array_record.python import array_record_module

  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  n = 0
  try:
    for r in records:
      writer.write(json.dumps(r).encode("utf-8"))
      n += 1
  finally:
    writer.close()
  return n


class TfdsSource:
  """A `tfds.data_source` (random access over an already prepared dataset)."""

  def __init__(self, name: str, split: str, data_dir: str | None = None, **keys):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise ValueError("data.source='tfds' needs tensorflow-datasets: pip install 'mmjax[tfds]'") from None
    self.name, self.split, self.keys = name, split, keys
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001 - tfds raises many kinds; report one line
      raise ValueError(f"TFDS dataset {name!r} split {split!r} (data_dir={data_dir!r}) could not be "
                       f"opened: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    index = int(index)
    return to_record(dict(self._source[index]), f"tfds {self.name}[{self.split}] #{index}", **self.keys)

  def __repr__(self):
    return f"TfdsSource({self.name!r}, {self.split!r}, n={len(self)})"


class GeneratedTask:
  """Synthetic prompt/response tasks, deterministic per (name, seed, index).

    reverse: "reverse ab3x =" -> "x3ba"      copy: "copy ab3x =" -> "ab3x"
    sort:    "sort 5291 =" -> "1259"         add:  "add 12+7 =" -> "19"

  Strings are 3-8 characters (add: operands 0-99). Examples are split by a hash of the
  prompt: `split='eval'` draws only prompts with hash % 10 == 0 and `split='train'` only
  the rest, so eval prompts never occur in training.
  """

  def __init__(self, name: str, size: int, seed: int = 0, split: str = "train"):
    if name not in GENERATED_TASKS:
      raise ValueError(f"generated task {name!r} is unknown; valid tasks: {', '.join(GENERATED_TASKS)}")
    if int(size) <= 0:
      raise ValueError(f"generated task size must be positive, got {size}")
    if split not in ("train", "eval"):
      raise ValueError(f"generated task split must be 'train' or 'eval', got {split!r}")
    self.name, self.size, self.seed, self.split = name, int(size), int(seed), split

  def __len__(self):
    return self.size

  @staticmethod
  def is_eval_prompt(prompt: str) -> bool:
    return zlib.crc32(prompt.encode()) % 10 == 0

  def _draw(self, rng: random.Random) -> dict:
    n = rng.randint(3, 8)
    if self.name == "add":
      a, b = rng.randint(0, 99), rng.randint(0, 99)
      return {"prompt": f"add {a}+{b} =", "response": str(a + b)}
    if self.name == "sort":
      s = "".join(rng.choice(string.digits) for _ in range(n))
      return {"prompt": f"sort {s} =", "response": "".join(sorted(s))}
    s = "".join(rng.choice(_ALNUM) for _ in range(n))
    return {"prompt": f"{self.name} {s} =", "response": s[::-1] if self.name == "reverse" else s}

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"index {index} out of range for {self!r}")
    rng = random.Random(f"{self.name}/{self.seed}/{index}")  # str seeds are hashed stably
    want_eval = self.split == "eval"
    while True:
      record = self._draw(rng)
      if self.is_eval_prompt(record["prompt"]) == want_eval:
        return record

  def __repr__(self):
    return f"GeneratedTask({self.name!r}, size={self.size}, seed={self.seed}, split={self.split!r})"
