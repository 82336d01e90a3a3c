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

import contextlib
import functools

import grain
import numpy as np

from mmjax.data import catalog, media, pixels, sources

FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
MEDIA_FIELDS = ("images", "frames")


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


def tokenize_example(record: dict, tokenizer, seq_len: int, visual_tokens: dict | None = None) -> dict:
  """Unpadded `tokens`, `targets`, `loss_mask` (int32 [n], 1 <= n <= seq_len) of a record.

  Sequence: [bos] + content + [eos] (bos when the tokenizer has one and the content does not
  already start with it; eos unless the content already ends with it), truncated to
  seq_len + 1 and shifted by one. `visual_tokens` maps 'image' / 'video' to (placeholder id,
  count) of the tokens the model replaces with visual embeddings: a media record's `<image>` /
  `<video>` marker expands to them in place, or they go first (`mmjax.data.media`).
  """
  ids, mask, eos_mask = _content(record, tokenizer)
  ids, mask = media.with_placeholders(record, list(ids), list(mask), tokenizer, visual_tokens, seq_len)
  if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
    ids, mask = [tokenizer.bos_id] + ids, [0] + mask
  if not ids or ids[-1] != tokenizer.eos_id:
    ids, mask = ids + [tokenizer.eos_id], mask + [eos_mask]
  if len(ids) < 2:  # no bos and empty content: give the eos something to be predicted from
    ids, mask = [tokenizer.pad_id] + ids, [0] + mask
  if media.media_kind(record) is not None:
    media.check_fits(ids, {media.placeholder(visual_tokens, media.media_kind(record), tokenizer)[0]}, seq_len)
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
  ids, _ = media.with_placeholders(record, list(ids), [0] * len(ids), tokenizer, visual_tokens, seq_len)
  if tokenizer.bos_id is not None and (not ids or ids[0] != tokenizer.bos_id):
    ids = [tokenizer.bos_id] + ids
  return ids


def question(record: dict) -> str:
  """The text a record asks (for display): its prompt, or its last user turn before the answer."""
  if "prompt" in record:
    return record["prompt"]
  msgs = record.get("messages", ())
  last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
  users = [m["content"] for m in msgs[:last] if m["role"] == "user"]
  return users[-1] if users else record.get("text", "")


def reference(record: dict) -> str:
  """The answer a record expects after `prompt_ids`: its response, or its last assistant turn."""
  if "response" in record:
    return record["response"]
  turns = [m["content"] for m in record.get("messages", ()) if m["role"] == "assistant"]
  if not turns:
    raise ValueError(f"record has keys {sorted(record)}; an answer needs a prompt/response or messages record")
  return turns[-1]


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
                    image_size=32, media_fields=None, n_frames: int = 0, fps: float = 0.0) -> dict:
  """A record -> dict of int32 [seq_len] arrays: tokens, targets, loss_mask, segment_ids,
  positions; plus `images` float32 [H, W, 3] and / or `frames` [T, H, W, 3] for media
  (`mmjax.data.media.media_arrays`: `image_size` is a `Pixels` or the size of the built-in
  scaling; `media_fields` the batch's pixel fields, zero-filled when the record lacks one)."""
  with located(record):
    out = pad_example(tokenize_example(record, tokenizer, seq_len, visual_tokens), seq_len, tokenizer.pad_id)
    out.update(media.media_arrays(record, image_size, media_fields, n_frames, fps))
  return out


@contextlib.contextmanager
def located(record: dict):
  """Re-raises a ValueError about a record as a one-line `RecordError` that starts with where
  the record came from (its file and line), when the source said."""
  try:
    yield
  except ValueError as e:
    where = getattr(record, "where", None)
    if where is None or str(e).startswith(str(where)):
      raise
    raise sources.RecordError(f"{where}: {e}") from None


def _tokenize_padded(record, *, tokenizer, seq_len, visual_tokens=None, image_size=32, media_fields=None,
                     n_frames=0, fps=0.0):
  return tokenize_record(record, tokenizer, seq_len, visual_tokens, image_size, media_fields, n_frames, fps)


def _tokenize_unpadded(record, *, tokenizer, seq_len):
  return tokenize_example(record, tokenizer, seq_len)


def _from_packed(packed: dict) -> dict:
  """Grain's packer names the aux fields per feature; all features share one layout."""
  return {"tokens": packed["tokens"], "targets": packed["targets"], "loss_mask": packed["loss_mask"],
          "segment_ids": packed["tokens_segment_ids"], "positions": packed["tokens_positions"]}


def _own_arrays(batch: dict) -> dict:
  return {k: np.array(v, np.float32 if k in MEDIA_FIELDS else np.int32) for k, v in batch.items()}


# ----------------------------------------------------------------------------- iterators


def fixed_chunks(items, size: int):
  """Yields (chunk, n_real): consecutive runs of `size` items (a list or an array), the last
  one filled up with copies of its last item, so every chunk has one shape (one compiled
  function); results for the filler rows are to be dropped (`[:n_real]`)."""
  for start in range(0, len(items), size):
    real = items[start:start + size]
    pad = size - len(real)
    if pad and isinstance(real, np.ndarray):
      real = np.concatenate([real, np.repeat(real[-1:], pad, axis=0)])
    elif pad:
      real = list(real) + [real[-1]] * pad
    yield real, size - pad


def local_batch(global_batch: int, process_index: int, process_count: int) -> int:
  """This process's rows of a global batch (which the process count must divide)."""
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not valid for process_count={process_count}")
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f"global batch {global_batch} must be a positive multiple of the process "
                     f"count {process_count}")
  return global_batch // process_count


def record_fn(data_cfg, *, tokenizer, seq_len: int, visual_tokens=None, media_fields=None):
  """record -> padded batch row (`tokenize_record`) with the data's pixel preprocessing
  (`mmjax.data.pixels.for_data`) and video sampling (`data.video_frames`, `data.video_fps`)."""
  return functools.partial(_tokenize_padded, tokenizer=tokenizer, seq_len=seq_len, visual_tokens=visual_tokens,
                           image_size=pixels.for_data(data_cfg), media_fields=media_fields,
                           n_frames=data_cfg.video_frames, fps=data_cfg.video_fps)


def make_train_dataset(data_cfg, *, global_batch: int, seq_len: int, seed: int, tokenizer,
                       process_index: int = 0, process_count: int = 1,
                       visual_tokens: dict | None = None, example_fn=None, media_fields=None) -> grain.IterDataset:
  """The infinite train `IterDataset` of local batches (see the module docstring).

  `example_fn(record) -> dict of arrays` replaces the tokenizing of records (an objective
  with other batch fields, e.g. ViSFT's images and detection targets); `media_fields` are
  the batch's pixel fields (every row gets each, zeros where a record has none)."""
  catalog.validate_data_config(data_cfg)
  local = local_batch(global_batch, process_index, process_count)
  seed = int(seed) % 2**32
  source = catalog.open_source(data_cfg, "train")
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
    ds = ds.map(record_fn(data_cfg, tokenizer=tokenizer, seq_len=seq_len, visual_tokens=visual_tokens,
                          media_fields=media_fields))
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
                        visual_tokens: dict | None = None, example_fn=None,
                        media_fields=None) -> grain.DatasetIterator:
  """An endless iterator of local batches (dicts of int32 [global_batch // process_count,
  seq_len] arrays) with `get_state()` / `set_state()` for exact resume."""
  return iter(make_train_dataset(data_cfg, global_batch=global_batch, seq_len=seq_len, seed=seed,
                                 tokenizer=tokenizer, process_index=process_index,
                                 process_count=process_count, visual_tokens=visual_tokens,
                                 example_fn=example_fn, media_fields=media_fields))


def _blank(example: dict) -> dict:
  return dict(example, loss_mask=np.zeros_like(example["loss_mask"]))


def make_eval_batches(data_cfg, *, batch: int, seq_len: int, tokenizer,
                      process_index: int = 0, process_count: int = 1,
                      visual_tokens: dict | None = None, example_fn=None, blank=None,
                      limit: int = 0, media_fields=None) -> list[dict]:
  """Every eval record once (the first `limit` when > 0), in order, as local batches of
  `batch // process_count` rows.

  `batch` is the global eval batch; process p holds rows p, p+P, ... of each global batch.
  The last global batch is filled with `blank(example 0)` (default: record 0 with an all-0
  loss_mask), so every process has the same number of equally shaped batches. [] when there
  is no eval set. `example_fn` as in `make_train_dataset`.
  """
  catalog.validate_data_config(data_cfg)
  local = local_batch(batch, process_index, process_count)
  source = catalog.open_source(data_cfg, "eval")
  if source is None:
    return []
  fn = example_fn or record_fn(data_cfg, tokenizer=tokenizer, seq_len=seq_len, visual_tokens=visual_tokens,
                               media_fields=media_fields)
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
