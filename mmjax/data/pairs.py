"""Preference pairs: JSONL records -> DPO batch fields through Grain.

A pairs record (one JSON object per line):

  {"prompt": str, "chosen": str, "rejected": str,        required ("messages": the turns before
                                                         the answer, instead of "prompt")
   "ground_truth": str,                                  the SFT target (dpo.gt_weight > 0)
   "image": path | "frames": [paths] | "video": path,    optional media (VLM)
   "index": int,                                         optional: take the media of this record
                                                         of the data.source train set (online
                                                         pairs: `media_source`)
   "id": ..., "scores": {...},                           kept, not read
   "ref_chosen_logps": float, "ref_rejected_logps": float}  (dpo.reference='precomputed')

Each pair becomes chosen/rejected (and gt) rows laid out exactly like SFT rows
(`pipeline.tokenize_example` + `pad_example`), fields renamed `chosen_tokens`, ...,
`chosen_mask` (the loss mask). Records are checked when the file is read: an empty
response or a prompt that leaves no room for a response in `seq_len` is a one-line error
naming the file and line, before any training starts.
"""
from __future__ import annotations

import functools
import json

import grain
import numpy as np

from mmjax.data import catalog, media, pipeline, pixels, sources
from mmjax.files import atomic_write, jsonl

_RENAME = {"tokens": "tokens", "targets": "targets", "loss_mask": "mask", "segment_ids": "segment_ids",
           "positions": "positions"}


class PairsError(ValueError):
  """A bad pairs record; the message is one line naming the file and line."""


def read_pairs(path: str) -> list[dict]:
  """Records of a pairs JSONL file; each remembers its `_where` ('file:line') for errors."""
  out = []
  for f in sources.expand_paths(path, "pairs file"):
    with open(f) as fh:
      for n, line in enumerate(fh, 1):
        if not line.strip():
          continue
        where = f"{f}:{n}"
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise PairsError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
          raise PairsError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        rec["_where"] = where
        out.append(rec)
  if not out:
    raise PairsError(f"pairs file {path} has no records")
  return out


def prompt_of(record: dict) -> dict:
  """The prompt part of a data record, as a pairs record holds it: {'prompt'} or {'messages'}
  (the turns before the last assistant turn)."""
  if "prompt" in record:
    return {"prompt": record["prompt"]}
  msgs = record.get("messages", [])
  last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
  return {"messages": [dict(m) for m in msgs[:last]]}


def _marker(record: dict, response: str | None = None) -> dict:
  """A record with the pair's prompt (and `response`), and the media key (value unused) so
  visual tokens are counted."""
  if "messages" in record:
    out = {"messages": list(record["messages"]) + ([{"role": "assistant", "content": response}]
                                                   if response is not None else [])}
  else:
    out = {"prompt": record["prompt"]} if response is None else {"prompt": record["prompt"], "response": response}
  kind = media.media_kind(record)
  if kind is not None:
    out["frames" if kind == "video" else "image"] = None
  return out


def check_pairs(records: list[dict], tokenizer, seq_len: int, visual_tokens=None, where: str = "pairs",
                media=None) -> None:
  """Raises PairsError (one line, naming the record) for missing fields, empty responses and
  prompts too long for `seq_len`. `media`: the source `index` keys point into."""
  for i, r in enumerate(records):
    if "index" in r and media is not None:
      r = PairsSource([r], media)[0]
    at = r.get("_where") or f"{where} record {i} (id {r.get('id', i)!r})"
    if not isinstance(r.get("prompt"), str) and not (isinstance(r.get("messages"), list) and r["messages"]):
      raise PairsError(f"{at}: a pair needs a 'prompt' string or 'messages' (the turns before the answer); "
                       f"record keys: {sorted(k for k in r if k[0] != '_')}")
    for key in ("chosen", "rejected"):
      if not isinstance(r.get(key), str):
        raise PairsError(f"{at}: {key!r} must be a string; record keys: {sorted(k for k in r if k[0] != '_')}")
    for key in ("chosen", "rejected"):
      if not r[key].strip():
        raise PairsError(f"{at}: the {key} response is empty")
    if "ground_truth" in r and not str(r["ground_truth"]).strip():
      raise PairsError(f"{at}: the ground_truth response is empty")
    try:
      n = len(pipeline.prompt_ids(_marker(r), tokenizer, visual_tokens, seq_len))
    except ValueError as e:
      raise PairsError(f"{at}: {e}") from None
    if n >= seq_len:
      raise PairsError(f"{at}: the prompt has {n} tokens (bos and visual tokens included), which leaves no "
                       f"room for a response in seq_len={seq_len}; shorten it or raise seq_len")


def prompt_source(config):
  """The train records online pairs are made for: `config.data` with the `dpo.prompt_data` overrides."""
  return catalog.make_source(catalog.overridden(config.data, config.dpo.prompt_data, "dpo.prompt_data"), "train")


def media_source(config):
  """The train source pairs point into with `index`: the prompts' data of online pairs
  (`config.data` with the `dpo.prompt_data` overrides, which may draw other videos), the
  shapes data of offline pairs, else None (offline pairs files carry their own media paths)."""
  if config.dpo.online:
    return prompt_source(config)
  if config.data.source == "shapes":
    return catalog.make_source(config.data, "train")
  return None


class PairsSource:
  """Random-access pairs for Grain; media are looked up by `index` in `media_source`."""

  def __init__(self, records: list[dict], media_source=None):
    self.records = records
    self.media = media_source

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    r = dict(self.records[int(i)])
    if "index" in r and self.media is not None:
      ex = self.media[int(r["index"])]
      for k in ("image", "frames", "video"):
        if k in ex:
          r[k] = ex[k]
    return r

  def __repr__(self):
    return f"PairsSource({len(self)} pairs)"


def tokenize_pair(record: dict, *, tokenizer, seq_len: int, visual_tokens=None, image_size=32,
                  gt: bool = False, media_fields=None, n_frames: int = 0, fps: float = 0.0) -> dict:
  """A pairs record -> chosen_*/rejected_* (and gt_*) int32 [seq_len] rows, ref log-probs
  (float32 [1]) when present, and images/frames (`mmjax.data.media.media_arrays`)."""
  with pipeline.located(record):
    return _tokenize_pair(record, tokenizer, seq_len, visual_tokens, image_size, gt, media_fields, n_frames, fps)


def _tokenize_pair(record, tokenizer, seq_len, visual_tokens, image_size, gt, media_fields, n_frames, fps):
  out = {}
  prefixes = [("chosen", "chosen"), ("rejected", "rejected")] + ([("gt", "ground_truth")] if gt else [])
  for prefix, key in prefixes:
    rec = _marker(record, record[key])
    row = pipeline.pad_example(pipeline.tokenize_example(rec, tokenizer, seq_len, visual_tokens), seq_len,
                               tokenizer.pad_id)
    out.update({f"{prefix}_{_RENAME[k]}": v for k, v in row.items()})
  for k in ("ref_chosen_logps", "ref_rejected_logps"):
    if k in record:
      out[k] = np.full((1,), record[k], np.float32)  # [1]: batches are [B, 1] like every other field's rank >= 2
  out.update(media.media_arrays(record, image_size, media_fields, n_frames, fps))
  return out


def make_train_iterator(path: str, config, *, tokenizer, visual_tokens=None, process_index: int = 0,
                        process_count: int = 1, gt: bool = False, need_ref: bool = False,
                        media_fields=None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of local pair batches (`config.batch_size` pairs
  globally), shuffled per epoch with `config.seed`; process p reads pairs p, p+P, ..."""
  records = read_pairs(path)
  source = media_source(config)
  check_pairs(records, tokenizer, config.seq_len, visual_tokens, media=source)
  for r in records:
    if gt and "ground_truth" not in r:
      raise PairsError(f"{r['_where']}: config.dpo.gt_weight > 0 needs a 'ground_truth' response")
    if need_ref and not all(k in r for k in ("ref_chosen_logps", "ref_rejected_logps")):
      raise PairsError(f"{r['_where']}: config.dpo.reference='precomputed' needs ref_chosen_logps and "
                       f"ref_rejected_logps")
  local = pipeline.local_batch(config.batch_size, process_index, process_count)
  ds = grain.MapDataset.source(PairsSource(records, source))
  if config.data.shuffle:
    ds = ds.shuffle(seed=int(config.seed) % 2**32)
  ds = ds.repeat()[process_index::process_count]
  d = config.data
  ds = ds.map(functools.partial(tokenize_pair, tokenizer=tokenizer, seq_len=config.seq_len,
                                visual_tokens=visual_tokens, image_size=pixels.for_data(d), gt=gt,
                                media_fields=media_fields, n_frames=d.video_frames, fps=d.video_fps))
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(ds.batch(local, drop_remainder=True).to_iter_dataset(read))


def write_pairs(path: str, records: list[dict]) -> None:
  """Writes records as JSONL atomically (`mmjax.files`), without the `_where` keys."""
  atomic_write(path, jsonl(records))
