"""The pixels a vision tower expects: how an image (a file path or uint8 pixels [H, W, C])
becomes the float32 [H, W, 3] array the tower reads. One implementation for training,
evaluation and sampling (`mmjax.data.pipeline.load_image`).

  Pixels.builtin(size)   mmjax's own towers: a bicubic resize to size x size, then x / 127.5 - 1
  Pixels.from_hf(dict)   a Hugging Face `preprocessor_config.json` (CLIP: resize the shortest
                         edge, centre crop, rescale, normalise with the tower's mean / std;
                         SigLIP: resize to a fixed size, rescale, normalise), with the same
                         numerics as transformers' PIL image processors: PIL resampling of the
                         uint8 image, a float64 rescale cast to float32, a float32 normalise.

`data.image_processor` names a directory with `preprocessor_config.json` ('' = builtin).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import numpy as np
from PIL import Image

_RESAMPLE = {0: Image.NEAREST, 1: Image.LANCZOS, 2: Image.BILINEAR, 3: Image.BICUBIC, 4: Image.BOX,
             5: Image.HAMMING}


@dataclasses.dataclass(frozen=True)
class Pixels:
  """A tower's preprocessing (see the module docstring). `size` is the output (height, width)."""
  size: tuple
  builtin: bool = False
  shortest_edge: int = 0  # resize so the shorter side is this long, keeping the aspect ratio
  resize: tuple | None = None  # or resize to (height, width); neither: no resize
  crop: tuple | None = None  # centre crop to (height, width), zero-padding a smaller image
  resample: int = 3  # PIL resampling filter (3 = bicubic)
  rescale: float | None = 1 / 255
  mean: tuple | None = None
  std: tuple | None = None

  @classmethod
  def builtin_scaling(cls, size: int) -> "Pixels":
    return cls(size=(int(size), int(size)), builtin=True)

  @classmethod
  def from_hf(cls, cfg: dict, where: str = "preprocessor_config.json") -> "Pixels":
    """From a `preprocessor_config.json` dict; an unsupported setting is a one-line ValueError."""
    def bad(key, valid):
      return ValueError(f"{where}: {key}={cfg.get(key)!r} is not supported; {valid}")
    size = cfg.get("size")
    shortest, resize = 0, None
    if cfg.get("do_resize", True):
      if isinstance(size, int):
        shortest = size
      elif isinstance(size, dict) and size.get("shortest_edge") and not size.get("longest_edge"):
        shortest = int(size["shortest_edge"])
      elif isinstance(size, dict) and size.get("height") and size.get("width"):
        resize = (int(size["height"]), int(size["width"]))
      else:
        raise bad("size", "expected {'shortest_edge': n} or {'height': h, 'width': w}")
    crop = None
    if cfg.get("do_center_crop", False):
      c = cfg.get("crop_size")
      c = {"height": c, "width": c} if isinstance(c, int) else c
      if not isinstance(c, dict) or not c.get("height") or not c.get("width"):
        raise bad("crop_size", "expected {'height': h, 'width': w}")
      crop = (int(c["height"]), int(c["width"]))
    out = crop or resize
    if out is None:
      raise bad("do_center_crop", "a shortest-edge resize needs a centre crop for a fixed pixel size")
    resample = int(cfg.get("resample", 3))
    if resample not in _RESAMPLE:
      raise bad("resample", f"expected one of {sorted(_RESAMPLE)} (PIL filters)")
    mean = std = None
    if cfg.get("do_normalize", True):
      mean, std = cfg.get("image_mean"), cfg.get("image_std")
      mean = [mean] * 3 if isinstance(mean, (int, float)) else mean
      std = [std] * 3 if isinstance(std, (int, float)) else std
      if not (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) == 3):
        raise bad("image_mean", "expected image_mean and image_std with 3 values")
      mean, std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
    rescale = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else None
    return cls(size=out, shortest_edge=shortest, resize=resize, crop=crop, resample=resample, rescale=rescale,
               mean=mean, std=std)

  def __call__(self, image) -> np.ndarray:
    """uint8 pixels [H, W, C] (or an image file path) -> float32 [h, w, 3]."""
    if isinstance(image, (str, os.PathLike)):
      try:
        with Image.open(image) as im:
          image = np.asarray(im.convert("RGB"))
      except (OSError, ValueError) as e:
        raise ValueError(f"image {image}: cannot be read ({e})") from None
    image = np.asarray(image)
    if self.builtin:
      if image.shape[:2] != self.size:
        image = np.asarray(Image.fromarray(image.astype(np.uint8)).resize(self.size[::-1], Image.BICUBIC))
      return image.astype(np.float32) / 127.5 - 1.0
    x = image.astype(np.uint8)
    if x.ndim == 2:
      x = np.repeat(x[..., None], 3, axis=-1)
    x = x[..., :3]
    h, w = x.shape[:2]
    target = self.resize
    if self.shortest_edge:
      short, long = (w, h) if w <= h else (h, w)
      new_long = int(self.shortest_edge * long / short)
      target = (new_long, self.shortest_edge) if w <= h else (self.shortest_edge, new_long)
    if target is not None and target != (h, w):
      x = np.asarray(Image.fromarray(x).resize(target[::-1], resample=_RESAMPLE[self.resample]))
    if self.crop is not None:
      x = _center_crop(x, self.crop)
    y = x.astype(np.float64) * self.rescale if self.rescale is not None else x.astype(np.float64)
    y = y.astype(np.float32)
    if self.mean is not None:
      y = (y - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
    return y


def _center_crop(x: np.ndarray, size: tuple) -> np.ndarray:
  """Centre crop (top/left = (H - h) // 2), zero-padding a smaller image as transformers does."""
  h, w = x.shape[:2]
  ch, cw = size
  if ch > h or cw > w:
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((nh, nw) + x.shape[2:], x.dtype)
    top, left = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded[top:top + h, left:left + w] = x
    x, h, w = padded, nh, nw
  top, left = (h - ch) // 2, (w - cw) // 2
  return x[top:top + ch, left:left + cw]


@functools.lru_cache(maxsize=16)
def _from_dir(path: str) -> Pixels:
  file = os.path.join(path, "preprocessor_config.json")
  if not os.path.isfile(file):
    raise ValueError(f"data.image_processor={path!r}: no preprocessor_config.json in it")
  with open(file) as f:
    try:
      cfg = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} is not valid JSON ({e.msg} at line {e.lineno})") from None
  return Pixels.from_hf(cfg, where=file)


def for_data(data_cfg) -> Pixels:
  """The preprocessing of a data config: `data.image_processor`'s, else the built-in scaling
  at `data.image_size`."""
  path = data_cfg.get("image_processor", "")
  return _from_dir(os.path.abspath(path)) if path else Pixels.builtin_scaling(data_cfg.image_size)
