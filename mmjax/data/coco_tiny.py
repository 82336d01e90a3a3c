"""A tiny synthetic COCO-format data set (instances and captions JSON plus images), written
for tests and smoke runs of the COCO source and the ViSFT recipe (`write_tiny_coco`)."""
from __future__ import annotations

import json
import os
import random

import numpy as np
from PIL import Image

from mmjax.data import shapes, shapes_draw
from mmjax.data.coco import encode_rle

# Unsorted, non-contiguous category ids, so users of the tiny set exercise the class mapping.
TINY_CATEGORIES = ({"id": 9, "name": "square", "supercategory": "shape"},
                   {"id": 2, "name": "rectangle", "supercategory": "shape"},
                   {"id": 5, "name": "triangle", "supercategory": "shape"})
_CELLS = ("on the left", "in the middle", "on the right")


def _tiny_object(rng: random.Random, cell: int, width: int, height: int) -> tuple:
  """(name, x0, y0, x1, y1) of one object inside column third `cell`, 1 pixel from its edges."""
  left, right = round(cell * width / 3), round((cell + 1) * width / 3)
  name = rng.choice(("rectangle", "triangle", "square"))
  if name == "rectangle":
    w, h = rng.randint(6, right - left - 2), rng.randint(6, height - 2)
  else:  # right isosceles triangles: with w == h their pixel mask is tight in the box
    w = h = rng.randint(6, min(right - left, height) - 2)
  x0, y0 = rng.randint(left + 1, right - 1 - w), rng.randint(1, height - 1 - h)
  return name, x0, y0, x0 + w, y0 + h


def _tiny_mask(name: str, box, width: int, height: int) -> np.ndarray:
  """bool [height, width]: the pixels drawn for an object (pixel centres inside it)."""
  x0, y0, x1, y1 = box
  mask = np.zeros((height, width), bool)
  mask[y0:y1, x0:x1] = True
  if name == "triangle":  # vertices (x0, y0), (x1, y1), (x0, y1): right angle bottom left
    r, c = np.mgrid[0:height, 0:width]
    mask &= c - x0 <= r - y0
  return mask


def _tiny_segmentation(name: str, box, mask: np.ndarray, ann_id: int):
  x0, y0, x1, y1 = (float(v) for v in box)
  if name == "rectangle":
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]
  if name == "triangle":
    return [[x0, y0, x1, y1, x0, y1]]
  return encode_rle(mask, compressed=ann_id % 2 == 0)  # squares: both RLE forms


def write_tiny_coco(root: str, split: str, n_images: int, image_size: int = 64, seed: int = 0) -> str:
  """Writes a small deterministic COCO-format data set under `root`; returns `root`.

  Images are PNGs `image_size` wide and 3 * image_size // 4 tall (not square, so the resize
  changes the aspect ratio) with 1..3 objects (none on every 8th image, i % 8 == 7), each a
  filled rectangle, right triangle or square of a distinct shapes_draw.PALETTE colour in its own
  third of the width (no overlaps). Segmentations: rectangles and triangles as polygons,
  squares as RLE (compressed or list counts by annotation id). Categories: TINY_CATEGORIES.
  Every image gets two captions in the builtin tokenizer's characters. Writes
  ROOT/annotations/{instances,captions}_{split}.json and ROOT/{split}/*.png.
  """
  if not isinstance(image_size, int) or image_size < 32:
    raise ValueError(f"write_tiny_coco image_size={image_size!r} is not valid; expected an integer >= 32")
  width, height = image_size, 3 * image_size // 4
  cat_ids = {c["name"]: c["id"] for c in TINY_CATEGORIES}
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  os.makedirs(os.path.join(root, split), exist_ok=True)
  images, anns, caps = [], [], []
  for i in range(n_images):
    rng = random.Random(f"tiny-coco/{seed}/{split}/{i}")
    image_id = 1000 + 7 * i  # ids are not positions
    file_name = f"{image_id:012d}.png"
    n = 0 if i % 8 == 7 else rng.randint(1, 3)
    cells, colours = sorted(rng.sample(range(3), n)), rng.sample(shapes.COLOURS, n)
    canvas = np.broadcast_to(np.array(shapes_draw.BACKGROUND, np.uint8), (height, width, 3)).copy()
    phrases = []
    for cell, colour in zip(cells, colours):
      name, *box = _tiny_object(rng, cell, width, height)
      mask = _tiny_mask(name, box, width, height)
      canvas[mask] = shapes_draw.PALETTE[colour]
      ann_id = len(anns) + 1
      anns.append({"id": ann_id, "image_id": image_id, "category_id": cat_ids[name],
                   "bbox": [float(box[0]), float(box[1]), float(box[2] - box[0]), float(box[3] - box[1])],
                   "area": float(mask.sum()), "iscrowd": 0,
                   "segmentation": _tiny_segmentation(name, box, mask, ann_id)})
      phrases.append(f"a {colour} {name} {_CELLS[cell]}")
    Image.fromarray(canvas).save(os.path.join(root, split, file_name))
    images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
    texts = ([" and ".join(phrases) + ".", f"{n} object{'s' if n > 1 else ''}."] if n else
             ["an empty image.", "nothing but background."])
    caps += [{"id": len(caps) + k + 1, "image_id": image_id, "caption": t} for k, t in enumerate(texts)]
  info = {"description": f"mmjax tiny coco, seed {seed}", "version": "1.0"}
  files = {"instances": {"info": info, "licenses": [], "images": images, "annotations": anns,
                         "categories": list(TINY_CATEGORIES)},
           "captions": {"info": info, "licenses": [], "images": images, "annotations": caps}}
  for kind, data in files.items():
    with open(os.path.join(root, "annotations", f"{kind}_{split}.json"), "w") as f:
      json.dump(data, f)
  return root
