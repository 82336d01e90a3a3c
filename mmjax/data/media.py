"""A record's pixels and their placeholders in the token sequence (VLM inputs).

Placeholders. A model that reads media (`visual_tokens`: 'image' / 'video' -> (placeholder
token id, tokens per image / video)) has each image's features spliced at that many
placeholder tokens. A record's text may mark where its image or video goes with `<image>` /
`<video>` (the LLaVA convention; the tokenizer turns the marker into the placeholder id):
the marker expands in place. Without a marker the placeholders go first. A marker without
media, or more markers than the record's one image or video, is a one-line error.

Pixels. `image` (a file path or uint8 pixels) becomes float32 [H, W, 3] by the data's
`mmjax.data.pixels.Pixels`; a video is `frames` (a list of images) or `video` (a video file,
decoded with PyAV: `mmjax.data.video`), `n_frames` of them, float32 [T, H, W, 3]. With
`fields` (the batch's pixel fields), a record lacking one gets zeros of the same shape, so
text-only, image and video records share one batch.
"""
from __future__ import annotations

import numpy as np

from mmjax.data import video as video_lib
from mmjax.data.pixels import Pixels

MARKERS = {"image": "<image>", "video": "<video>"}


def media_kind(record: dict) -> str | None:
  """'image' or 'video' when a record carries media (pixels or a file), else None."""
  if "frames" in record or "video" in record:
    return "video"
  if "image" in record:
    return "image"
  return None


def placeholder(visual_tokens: dict, kind: str, tokenizer) -> tuple[int, int]:
  """(placeholder id, count) of `kind`; a bare count means the tokenizer's `<image>` id."""
  v = visual_tokens[kind]
  if isinstance(v, (tuple, list)):
    return int(v[0]), int(v[1])
  if getattr(tokenizer, "image_id", None) is None:
    raise ValueError("the tokenizer has no '<image>' token to mark visual positions; add one to its vocabulary")
  return tokenizer.image_id, int(v)


def with_placeholders(record: dict, ids: list, mask: list, tokenizer, visual_tokens, seq_len: int):
  """(ids, mask) with the record's media placeholders expanded in place or prefixed (mask 0)."""
  kind = media_kind(record)
  markers = {i for i in (getattr(tokenizer, "image_id", None), getattr(tokenizer, "video_id", None)) if i is not None}
  if kind is None:
    found = [t for t in ids if t in markers]
    if found:
      raise ValueError(f"the text has a visual marker (token {found[0]}) but the record has no image or video")
    return ids, mask
  if not visual_tokens or kind not in visual_tokens:
    raise ValueError(f"a record has an {kind} but the model takes no {kind} input")
  token, n = placeholder(visual_tokens, kind, tokenizer)
  if n >= seq_len:
    raise ValueError(f"seq_len={seq_len} cannot hold the {n} visual tokens of an {kind} plus text; raise seq_len")
  at = [i for i, t in enumerate(ids) if t == token]
  other = [t for t in ids if t in markers and t != token]
  if other:
    raise ValueError(f"the text has a marker for another kind of media (token {other[0]}) than its {kind}")
  if len(at) > 1:
    raise ValueError(f"the text has {len(at)} {MARKERS[kind]} markers but the record has one {kind}")
  i = at[0] if at else 0
  ids = ids[:i] + [token] * n + ids[i + len(at):]
  mask = mask[:i] + [0] * n + mask[i + len(at):]
  return ids, mask


def check_fits(ids: list, token_ids, seq_len: int) -> None:
  """A sequence cut at seq_len + 1 must keep all of its placeholders (a cut image would splice
  only part of its features)."""
  last = max((i for i, t in enumerate(ids) if t in token_ids), default=-1)
  if last >= seq_len:
    raise ValueError(f"the visual tokens end at position {last}, past seq_len={seq_len}; shorten the text "
                     "before the media or raise seq_len")


def load_image(image, pixels) -> np.ndarray:
  """uint8 [H, W, 3] pixels or an image file path -> float32 [h, w, 3] (`pixels`: a `Pixels`,
  or an int: the built-in scaling at that size)."""
  return _pixels(pixels)(image)


def load_frames(record: dict, pixels, n_frames: int = 0, fps: float = 0.0) -> np.ndarray:
  """The record's video as float32 [T, h, w, 3]: its `frames` (resampled to n_frames when that
  is set and differs), or `n_frames` frames decoded from its `video` file."""
  px = _pixels(pixels)
  if "video" in record:
    if not n_frames:
      raise ValueError(f"video {record['video']}: data.video_frames must be > 0 to decode a video file")
    return np.stack([px(f) for f in video_lib.read_frames(record["video"], n_frames, fps)])
  frames = list(record["frames"])
  if n_frames and len(frames) != n_frames:
    frames = [frames[i] for i in video_lib.uniform_indices(len(frames), n_frames)]
  return np.stack([px(f) for f in frames])


def media_arrays(record: dict, pixels, fields=None, n_frames: int = 0, fps: float = 0.0) -> dict:
  """{'images': [h, w, 3]} and / or {'frames': [T, h, w, 3]} of a record; with `fields`, every
  one of them, zeros where the record has no such media."""
  px = _pixels(pixels)
  out = {}
  kind = media_kind(record)
  own = {"image": "images", "video": "frames"}.get(kind)
  if fields is not None and own is not None and own not in fields:
    raise ValueError(f"a record has an {kind}, but the batch takes only {', '.join(fields) or 'text'} "
                     "(set data.media to ('images', 'frames') to mix them)")
  if kind == "image":
    out["images"] = px(record["image"])
  elif kind == "video":
    out["frames"] = load_frames(record, px, n_frames, fps)
  for field in fields or ():
    if field not in out:
      h, w = px.size
      shape = (h, w, 3) if field == "images" else (n_frames or 1, h, w, 3)
      out[field] = np.zeros(shape, np.float32)
  return out


def _pixels(pixels) -> Pixels:
  return pixels if isinstance(pixels, Pixels) else Pixels.builtin_scaling(int(pixels))
