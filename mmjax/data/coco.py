"""COCO-format detection, instance-segmentation and caption data: `CocoSource`, `write_tiny_coco`.

Layout (the real COCO one; split is e.g. "train2017"):

  ROOT/annotations/instances_{split}.json   images, annotations (boxes, masks), categories
  ROOT/annotations/captions_{split}.json    optional: annotations with "image_id", "caption"
  ROOT/{split}/{file_name}                  the images

`CocoSource(root, split, image_size, max_objects, captions=True)` is a random-access source
(`__len__`, `__getitem__`) for Grain: one item per image of the instances file, in order of
image id, with the keys of a shapes image example (`mmjax.data.shapes`):

  image      uint8 [S, S, 3]  RGB; the whole image resized to S x S with PIL bilinear. No
                              letterboxing: the aspect ratio is not kept
  boxes      float32 [n, 4]   COCO's [x, y, w, h] (original pixels) as pixel edges
                              [x0, y0, x1, y1] of the resized image, clipped to [0, S]
  masks      bool [n, S, S]   instance masks at S x S: a pixel is set when at least half of it
                              is covered (polygons are filled with PIL ImageDraw at 4x and
                              area-averaged; RLE is decoded at the original size and box-filtered)
  classes    int32 [n]        0..C-1: categories in order of category id (`class_names`,
                              `category_ids`)
  caption    str              captions[index % len(captions)]; "" if the image has none
  captions   list[str]        every caption of the image, in file order
  prompt / response           "describe the image." / caption
  kind "image_caption", facts [], qa [], skills (), index, image_id, file_name

Objects: crowd annotations (iscrowd=1) are skipped, and so are degenerate boxes (w or h <= 0,
or nothing left after clipping to the image). An image with more than `max_objects` objects
keeps the `max_objects` largest by area (COCO's "area", else w * h of the box; ties go to the
earlier annotation), still in file order: `mmjax.boxes.pad_targets` raises on more, and
dropping the smallest loses the least. Images without objects are kept (n = 0: boxes [0, 4],
masks [0, S, S], classes [0]). Captions of images absent from the instances file are ignored.

Segmentations are polygons ([[x0, y0, x1, y1, ...], ...] in continuous pixel coordinates,
(0, 0) the top-left corner of the image) or RLE ({"counts", "size": [h, w]}) with `counts`
either a list of run lengths or COCO's compressed string (`decode_rle`, no pycocotools).

The JSON is read once in __init__; each image's objects are kept as one compact JSON string,
so the state is plain python (pickles cheaply into Grain workers, and COCO train takes a few
hundred MB instead of GBs of nested lists). Images and masks are decoded in __getitem__.

Bad input raises a one-line ValueError naming the file and what is wrong: a missing or
malformed JSON file, a missing key or bad value in an image, annotation or category entry
(naming its id), an annotation whose image or category id is not listed, and (when read) an
image file that is missing, unreadable or not the size the instances file says.
"""
from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image, ImageDraw

from mmjax.data import shapes

_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANN_KEYS = ("id", "image_id", "category_id", "bbox", "segmentation")
_CAPTION_KEYS = ("image_id", "caption")
_SUPERSAMPLE = 4  # polygon fill resolution: PIL snaps vertices to whole pixels and fills edges
#                   inclusively, which at 1x would grow every object by up to a pixel


# ----------------------------------------------------------------------------- RLE


def rle_counts_from_string(s: str) -> list[int]:
  """COCO's compressed RLE `counts` string -> run lengths (pycocotools `rleFrString`).

  Each count is a signed integer written in 5-bit groups, least significant first, one
  character per group: chr(48 + group), with bit 0x20 set when another group follows and bit
  0x10 of the last group the sign. From the fourth count on, the string stores the difference
  to the count two before (runs of the same value tend to be alike).
  """
  counts, p = [], 0
  while p < len(s):
    x, k, more = 0, 0, True
    while more:
      if p >= len(s):
        raise ValueError(f"compressed RLE string ends inside a count (at character {p})")
      c = ord(s[p]) - 48
      if not 0 <= c < 64:
        raise ValueError(f"compressed RLE string has {s[p]!r} at character {p}; valid: chr(48)..chr(111)")
      x |= (c & 0x1F) << (5 * k)
      more = bool(c & 0x20)
      p, k = p + 1, k + 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)  # sign-extend
    if len(counts) > 2:
      x += counts[-2]
    counts.append(x)
  return counts


def rle_counts_to_string(counts) -> str:
  """Run lengths -> COCO's compressed `counts` string (pycocotools `rleToString`)."""
  out = []
  for i, x in enumerate(int(c) for c in counts):
    if i > 2:
      x -= int(counts[i - 2])
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = x != -1 if c & 0x10 else x != 0
      out.append(chr(48 + (c | 0x20 if more else c)))
  return "".join(out)


def decode_rle(rle: dict) -> np.ndarray:
  """COCO RLE {"counts": list | str, "size": [h, w]} -> bool [h, w].

  Runs alternate 0, 1, 0, ... starting with zeros, over the pixels in column-major order.
  """
  h, w = (int(v) for v in rle["size"])
  counts = rle["counts"]
  if isinstance(counts, bytes):
    counts = counts.decode("ascii")
  if isinstance(counts, str):
    counts = rle_counts_from_string(counts)
  counts = np.asarray(counts)
  if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
    raise ValueError("RLE counts must be non-negative integers")
  if int(counts.sum()) != h * w:
    raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected h * w = {h} * {w} = {h * w}")
  flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
  return np.ascontiguousarray(flat.reshape(w, h).T)


def encode_rle(mask, compressed: bool = True) -> dict:
  """bool [h, w] -> COCO RLE {"counts": str (compressed) | list, "size": [h, w]}."""
  mask = np.asarray(mask, bool)
  flat = mask.T.reshape(-1)  # column-major
  change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  edges = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(edges).tolist()
  if flat.size and flat[0]:
    counts = [0] + counts  # runs start with zeros
  return {"counts": rle_counts_to_string(counts) if compressed else counts, "size": list(mask.shape)}


# ----------------------------------------------------------------------------- rasterising


def polygon_mask(polygons, size: int) -> np.ndarray:
  """bool [size, size]: pixels at least half covered by the union of `polygons`.

  polygons: arrays [k, 2] of (x, y) vertices in pixel-edge coordinates (pixel (r, c) spans
  [c, c + 1) x [r, r + 1)); ones with fewer than 3 vertices enclose nothing and are ignored.
  """
  mask = np.zeros((size, size), bool)
  polygons = [np.asarray(p, np.float64).reshape(-1, 2) for p in polygons]
  polygons = [p for p in polygons if len(p) >= 3]
  if not polygons:
    return mask
  pts = np.concatenate(polygons)
  lo = np.clip(np.floor(pts.min(0)), 0, size).astype(int)
  hi = np.clip(np.ceil(pts.max(0)), 0, size).astype(int)
  (x0, y0), (x1, y1) = lo, hi
  if x1 <= x0 or y1 <= y0:
    return mask
  k = _SUPERSAMPLE  # only the polygons' bounding box is drawn at k x, so big images stay cheap
  canvas = Image.new("L", ((x1 - x0) * k, (y1 - y0) * k), 0)
  draw = ImageDraw.Draw(canvas)
  for p in polygons:
    draw.polygon([tuple(v) for v in ((p - lo) * k).tolist()], fill=1)
  covered = np.asarray(canvas, np.uint8).reshape(y1 - y0, k, x1 - x0, k).sum((1, 3))
  mask[y0:y1, x0:x1] = 2 * covered >= k * k
  return mask


def resize_mask(mask, size: int) -> np.ndarray:
  """bool [h, w] -> bool [size, size]: output pixels at least half covered (box filter)."""
  mask = np.asarray(mask, bool)
  if mask.shape == (size, size):
    return mask.copy()
  small = Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.BOX)
  return np.asarray(small) >= 128


# ----------------------------------------------------------------------------- reading


def _one_line(e: Exception) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _read_json(path: str, what: str, layout: str) -> dict:
  """The parsed JSON object at `path`; `what` names the file in errors, `layout` its place."""
  if not os.path.isfile(path):
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
      there = f"{folder} does not exist"
    else:  # name what is there: usually the split is misspelt
      found = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
      there = f"{folder} has {', '.join(found[:8])}" if found else f"{folder} has no .json files"
    raise ValueError(f"COCO {what} file {path} does not exist; expected {layout} ({there})")
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({_one_line(e)})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object with COCO keys, got {type(data).__name__}")
  return data


def _entries(data: dict, key: str, path: str) -> list:
  if not isinstance(data.get(key), list):
    got = "missing" if key not in data else f"a {type(data[key]).__name__}"
    raise ValueError(f"{path}: top-level {key!r} is {got}; expected a list (COCO keys: images, "
                     "annotations, categories)")
  return data[key]


def _check_keys(entry, keys, what: str, path: str, i: int) -> str:
  """Raises if `entry` is not a dict with all `keys`; returns how errors name it."""
  if not isinstance(entry, dict):
    raise ValueError(f"{path}: {what} #{i} is a {type(entry).__name__}; expected an object with "
                     f"{', '.join(keys)}")
  where = f"{what} id {entry['id']!r}" if "id" in entry else f"{what} #{i}"
  for key in keys:
    if key not in entry:
      raise ValueError(f"{path}: {where} has no {key!r}; a COCO {what} needs {', '.join(keys)}")
  return where


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _clipped_box(bbox, width: int, height: int, path: str, where: str):
  """COCO [x, y, w, h] -> [x0, y0, x1, y1] clipped to the image, or None if degenerate."""
  if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
    raise ValueError(f"{path}: {where} has bbox {bbox!r}; expected [x, y, w, h] numbers")
  x, y, w, h = (float(v) for v in bbox)
  if w <= 0 or h <= 0:
    return None
  x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
  return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def _check_segmentation(seg, width: int, height: int, path: str, where: str):
  """Shape checks only (cheap on COCO train); the numbers are checked when decoded."""
  if isinstance(seg, list):
    for poly in seg:
      if not isinstance(poly, list) or len(poly) % 2:
        raise ValueError(f"{path}: {where} has a polygon that is not a flat [x0, y0, x1, y1, ...] list "
                         "of even length")
    return
  if isinstance(seg, dict) and "counts" in seg and "size" in seg:
    if not isinstance(seg["counts"], (str, list)):
      raise ValueError(f"{path}: {where} has RLE counts of type {type(seg['counts']).__name__}; "
                       "expected a list of run lengths or a compressed string")
    if seg["size"] != [height, width]:
      raise ValueError(f"{path}: {where} has RLE size {seg['size']!r} but its image is "
                       f"[height, width] = [{height}, {width}]")
    return
  raise ValueError(f"{path}: {where} has segmentation of type {type(seg).__name__}; expected polygons "
                   "[[x0, y0, ...], ...] or RLE {'counts', 'size'}")


def _largest(objects: list, max_objects: int) -> list:
  """The `max_objects` largest of (area, object) pairs by area, in their original order."""
  if len(objects) <= max_objects:
    return objects
  by_size = sorted(range(len(objects)), key=lambda i: -objects[i][0])  # stable: earlier wins ties
  return [objects[i] for i in sorted(by_size[:max_objects])]


# ----------------------------------------------------------------------------- source


class CocoSource:
  """Random-access COCO images with boxes, masks, classes and captions (see the module
  docstring for the layout, record keys and rules)."""

  def __init__(self, root: str, split: str, image_size: int, max_objects: int, *, captions: bool = True):
    if not isinstance(image_size, int) or image_size <= 0:
      raise ValueError(f"CocoSource image_size={image_size!r} is not valid; expected a positive integer")
    if not isinstance(max_objects, int) or max_objects < 0:
      raise ValueError(f"CocoSource max_objects={max_objects!r} is not valid; expected an integer >= 0")
    self.root, self.split = str(root), str(split)
    self.image_size, self.max_objects = image_size, max_objects
    self.image_dir = os.path.join(self.root, self.split)
    self.instances_path = os.path.join(self.root, "annotations", f"instances_{self.split}.json")
    self.captions_path = os.path.join(self.root, "annotations", f"captions_{self.split}.json")
    data = _read_json(self.instances_path, "instances", "ROOT/annotations/instances_{split}.json")
    cat_index = self._read_categories(data)
    self._read_images(data)
    self._read_objects(data, cat_index)
    self._read_captions(captions)

  def _read_categories(self, data) -> dict:
    path, cats = self.instances_path, {}
    for i, cat in enumerate(_entries(data, "categories", path)):
      where = _check_keys(cat, ("id", "name"), "category", path, i)
      if cat["id"] in cats:
        raise ValueError(f"{path}: {where} is listed twice; category ids must be unique")
      cats[cat["id"]] = str(cat["name"])
    try:
      ids = sorted(cats)
    except TypeError:
      raise ValueError(f"{path}: category ids {list(cats)[:8]} are not all comparable; "
                       "expected integers") from None
    self._category_ids, self._class_names = tuple(ids), tuple(cats[c] for c in ids)
    return {c: i for i, c in enumerate(ids)}

  def _read_images(self, data):
    path, images = self.instances_path, {}
    for i, im in enumerate(_entries(data, "images", path)):
      where = _check_keys(im, _IMAGE_KEYS, "image", path, i)
      w, h = im["width"], im["height"]
      if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (w, h)):
        raise ValueError(f"{path}: {where} has width {w!r}, height {h!r}; expected positive integers")
      if im["id"] in images:
        raise ValueError(f"{path}: {where} is listed twice; image ids must be unique")
      images[im["id"]] = (im["id"], str(im["file_name"]), w, h)
    # Sorted by id, so the order does not depend on how the file was written.
    self._images = sorted(images.values(), key=lambda r: (isinstance(r[0], str), r[0]))
    self._position = {r[0]: i for i, r in enumerate(self._images)}

  def _read_objects(self, data, cat_index: dict):
    path, per_image = self.instances_path, [[] for _ in self._images]
    valid_cats = ", ".join(str(c) for c in self._category_ids[:12]) + (", ..." if len(cat_index) > 12 else "")
    for i, ann in enumerate(_entries(data, "annotations", path)):
      where = _check_keys(ann, _ANN_KEYS, "annotation", path, i)
      pos = self._position.get(ann["image_id"])
      if pos is None:
        raise ValueError(f"{path}: {where} has image_id {ann['image_id']!r}, which is not in 'images'")
      cls = cat_index.get(ann["category_id"])
      if cls is None:
        raise ValueError(f"{path}: {where} has category_id {ann['category_id']!r}, which is not in "
                         f"'categories' (valid ids: {valid_cats or 'none'})")
      if ann.get("iscrowd", 0):
        continue  # crowd regions are "ignore" areas in COCO eval, not instances
      _, _, width, height = self._images[pos]
      box = _clipped_box(ann["bbox"], width, height, path, where)
      if box is None:
        continue
      _check_segmentation(ann["segmentation"], width, height, path, where)
      area = ann.get("area")
      area = float(area) if _is_number(area) else (box[2] - box[0]) * (box[3] - box[1])
      per_image[pos].append((area, [ann["id"], cls, box, ann["segmentation"]]))
    # One compact JSON string per image: plain, small state (see the module docstring).
    self._objects = [json.dumps([o for _, o in _largest(objs, self.max_objects)], separators=(",", ":"))
                     for objs in per_image]

  def _read_captions(self, wanted: bool):
    per_image = [[] for _ in self._images]
    if wanted and os.path.isfile(self.captions_path):
      path = self.captions_path
      data = _read_json(path, "captions", "ROOT/annotations/captions_{split}.json")
      for i, ann in enumerate(_entries(data, "annotations", path)):
        where = _check_keys(ann, _CAPTION_KEYS, "caption annotation", path, i)
        if not isinstance(ann["caption"], str):
          raise ValueError(f"{path}: {where} has a caption of type {type(ann['caption']).__name__}; "
                           "expected a string")
        pos = self._position.get(ann["image_id"])
        if pos is not None:
          per_image[pos].append(ann["caption"].strip())
    self._captions = [tuple(c) for c in per_image]

  @property
  def class_names(self) -> tuple:
    """Category names; class id i is `class_names[i]`."""
    return self._class_names

  @property
  def category_ids(self) -> tuple:
    """COCO category ids, sorted; class id i is category `category_ids[i]`."""
    return self._category_ids

  @property
  def num_classes(self) -> int:
    return len(self._class_names)

  def __len__(self):
    return len(self._images)

  def _load_image(self, image_id, file_name: str, width: int, height: int) -> np.ndarray:
    """uint8 [S, S, 3]: the image file, RGB, resized (bilinear, no letterboxing)."""
    path = os.path.join(self.image_dir, file_name)
    try:
      with Image.open(path) as im:
        size = im.size
        rgb = im.convert("RGB")  # COCO has some greyscale images
    except FileNotFoundError:
      raise ValueError(f"COCO image {path} (image id {image_id!r}) does not exist; expected images in "
                       f"ROOT/{self.split}/file_name") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
      raise ValueError(f"COCO image {path} (image id {image_id!r}) is not a readable image "
                       f"({_one_line(e)})") from None
    if size != (width, height):
      raise ValueError(f"COCO image {path} is {size[0]}x{size[1]} but {self.instances_path} says "
                       f"{width}x{height} for image id {image_id!r}; annotations would not line up")
    s = self.image_size
    return np.array(rgb.resize((s, s), Image.BILINEAR), np.uint8)

  def _mask(self, seg, ann_id, width: int, height: int) -> np.ndarray:
    """bool [S, S] of one annotation's segmentation (in original pixels)."""
    s = self.image_size
    try:
      if isinstance(seg, dict):
        return resize_mask(decode_rle(seg), s)
      scale = np.array([s / width, s / height])
      return polygon_mask([np.asarray(p, np.float64).reshape(-1, 2) * scale for p in seg], s)
    except (ValueError, TypeError) as e:
      raise ValueError(f"{self.instances_path}: annotation id {ann_id!r} has a bad segmentation "
                       f"({_one_line(e)})") from None

  def __getitem__(self, index):
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    image_id, file_name, width, height = self._images[index]
    image = self._load_image(image_id, file_name, width, height)
    objects = json.loads(self._objects[index])
    s, n = self.image_size, len(objects)
    boxes = np.zeros((n, 4), np.float32)
    masks = np.zeros((n, s, s), bool)
    classes = np.zeros((n,), np.int32)
    scale = np.array([s / width, s / height, s / width, s / height])
    for j, (ann_id, cls, box, seg) in enumerate(objects):
      boxes[j] = np.clip(np.asarray(box) * scale, 0, s)
      masks[j] = self._mask(seg, ann_id, width, height)
      classes[j] = cls
    captions = list(self._captions[index])
    caption = captions[index % len(captions)] if captions else ""
    return {"image": image, "boxes": boxes, "masks": masks, "classes": classes, "caption": caption,
            "captions": captions, "index": index, "image_id": image_id, "file_name": file_name,
            "prompt": shapes.IMAGE_PROMPT, "response": caption, "kind": "image_caption", "facts": [],
            "qa": [], "skills": ()}

  def __repr__(self):
    return (f"CocoSource({self.root!r}, {self.split!r}, image_size={self.image_size}, "
            f"max_objects={self.max_objects}, n={len(self)})")
