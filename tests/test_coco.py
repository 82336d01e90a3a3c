"""The COCO source: tiny round trip (pixels vs boxes/masks/classes/captions), RLE and polygon
rasterising, crowd / degenerate / max_objects rules, one-line errors, pad_targets, pickling."""
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from mmjax import boxes as detection
from mmjax.data import coco, coco_tiny, shapes, shapes_draw

SPLIT = "train2017"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return coco_tiny.write_tiny_coco(str(tmp_path_factory.mktemp("coco")), SPLIT, 8)


@pytest.fixture
def copy(tiny, tmp_path):
  """A private copy of the tiny set, for tests that break it."""
  root = str(tmp_path / "coco")
  shutil.copytree(tiny, root)
  return root


def _instances_path(root, split=SPLIT):
  return os.path.join(root, "annotations", f"instances_{split}.json")


def _load(path):
  with open(path) as f:
    return json.load(f)


def _edit(root, fn, kind="instances"):
  path = os.path.join(root, "annotations", f"{kind}_{SPLIT}.json")
  data = _load(path)
  fn(data)
  with open(path, "w") as f:
    json.dump(data, f)
  return path


def _custom(root, anns, width=40, height=20, categories=({"id": 1, "name": "thing"},)):
  """One background image of width x height and an instances file with `anns` (ids, image id
  and category filled in when absent)."""
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  os.makedirs(os.path.join(root, SPLIT), exist_ok=True)
  Image.new("RGB", (width, height), shapes_draw.BACKGROUND).save(os.path.join(root, SPLIT, "a.png"))
  anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, **a} for i, a in enumerate(anns)]
  data = {"images": [{"id": 1, "file_name": "a.png", "width": width, "height": height}],
          "annotations": anns, "categories": list(categories)}
  with open(_instances_path(root), "w") as f:
    json.dump(data, f)
  return root


def _rect(x0, y0, x1, y1, **kw):
  return {"bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]], **kw}


def _tight_box(mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)


# ----------------------------------------------------------------------------- an encoder of
# the test's own (pycocotools' documented format), independent of coco.py's code


def _runs(mask):
  """Column-major run lengths starting with zeros, by a plain loop."""
  counts, run, value = [], 0, False
  for v in np.asarray(mask, bool).flatten(order="F"):
    if v != value:
      counts.append(run)
      run, value = 0, v
    run += 1
  counts.append(run)
  return counts


def _compress(counts):
  """pycocotools `rleToString`: deltas to the count two back from the 4th on, 5-bit groups
  low first, chr(48 + group), 0x20 = more groups follow, 0x10 of the last group = sign."""
  chars = []
  for i, count in enumerate(counts):
    x = count - counts[i - 2] if i > 2 else count
    while True:
      group, x = x & 0x1F, x >> 5
      last = x == (-1 if group & 0x10 else 0)
      chars.append(chr(48 + group + (0 if last else 0x20)))
      if last:
        break
  return "".join(chars)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("size", [48, 96])
def test_round_trip_pixels_boxes_masks_classes(tiny, size):
  src = coco.CocoSource(tiny, SPLIT, size, 10)
  inst = _load(_instances_path(tiny))
  assert len(src) == 8 and src.class_names == ("rectangle", "triangle", "square")
  assert src.category_ids == (2, 5, 9) and src.num_classes == 3
  seen = set()
  for i in range(len(src)):
    ex = src[i]
    meta = inst["images"][i]  # written in id order
    assert (ex["index"], ex["image_id"], ex["file_name"]) == (i, meta["id"], meta["file_name"])
    anns = [a for a in inst["annotations"] if a["image_id"] == meta["id"]]
    n = len(anns)
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (size, size, 3)
    assert ex["boxes"].dtype == np.float32 and ex["boxes"].shape == (n, 4)
    assert ex["masks"].dtype == bool and ex["masks"].shape == (n, size, size)
    assert ex["classes"].dtype == np.int32 and ex["classes"].shape == (n,)
    assert [src.category_ids[c] for c in ex["classes"]] == [a["category_id"] for a in anns]
    seen.update(ex["classes"].tolist())
    orig = np.array(Image.open(os.path.join(tiny, SPLIT, meta["file_name"])))
    h, w = orig.shape[:2]
    fg = (orig != shapes_draw.BACKGROUND).any(-1)
    scale = np.array([size / w, size / h] * 2)
    rr, cc = np.mgrid[0:size, 0:size]
    nearest = fg[((rr + 0.5) * h / size).astype(int), ((cc + 0.5) * w / size).astype(int)]
    for box, mask in zip(ex["boxes"], ex["masks"]):
      # The drawn pixels of this object (objects do not overlap): their box, scaled.
      x0, y0, x1, y1 = box / scale
      region = np.zeros_like(fg)
      region[max(int(y0) - 1, 0):int(np.ceil(y1)) + 1, max(int(x0) - 1, 0):int(np.ceil(x1)) + 1] = True
      drawn = fg & region
      np.testing.assert_allclose(box, _tight_box(drawn) * scale, atol=1e-4)
      assert np.abs(_tight_box(mask) - box).max() <= 1.0
      resized = nearest & region[((rr + 0.5) * h / size).astype(int), ((cc + 0.5) * w / size).astype(int)]
      assert (mask & resized).sum() / (mask | resized).sum() > 0.6
      colour = orig[drawn][0].astype(float)
      # Bilinear resizing blends edge pixels: compare the interior (or, if none, be lenient).
      inner = mask & np.all([np.roll(mask, d, a) for d in (1, -1) for a in (0, 1)], 0)
      got = np.median(ex["image"][inner if inner.any() else mask], 0)
      tol = 12 if inner.any() else 0.5 * np.abs(colour - shapes_draw.BACKGROUND).max()
      assert np.abs(got - colour).max() <= tol
    background = ~ex["masks"].any(0)
    assert np.abs(np.median(ex["image"][background], 0) - shapes_draw.BACKGROUND).max() <= 2
  assert seen == {0, 1, 2}


def test_captions_and_record_keys(tiny, tmp_path):
  src = coco.CocoSource(tiny, SPLIT, 32, 3)
  caps = _load(os.path.join(tiny, "annotations", f"captions_{SPLIT}.json"))
  ex = src[3]
  want = [a["caption"] for a in caps["annotations"] if a["image_id"] == ex["image_id"]]
  assert ex["captions"] == want and len(want) == 2
  assert ex["caption"] == want[3 % 2] == ex["response"] and src[2]["caption"] == src[2]["captions"][0]
  assert ex["prompt"] == shapes.IMAGE_PROMPT and ex["kind"] == "image_caption"
  assert ex["facts"] == [] and ex["skills"] == () and ex["qa"] == []
  shape_ex = shapes.ShapesSource("image_caption", 1)[0]
  assert set(shape_ex) <= set(ex)
  off = coco.CocoSource(tiny, SPLIT, 32, 3, captions=False)[3]
  assert off["caption"] == off["response"] == "" and off["captions"] == []
  root = str(tmp_path / "nocaps")
  shutil.copytree(tiny, root)
  os.remove(os.path.join(root, "annotations", f"captions_{SPLIT}.json"))
  assert coco.CocoSource(root, SPLIT, 32, 3)[0]["caption"] == ""


def test_image_without_objects_is_kept(tiny):
  ex = coco.CocoSource(tiny, SPLIT, 40, 3)[7]
  assert ex["boxes"].shape == (0, 4) and ex["masks"].shape == (0, 40, 40) and ex["classes"].shape == (0,)
  assert ex["caption"]
  with pytest.raises(IndexError):
    coco.CocoSource(tiny, SPLIT, 40, 3)[8]


def test_write_tiny_coco_is_deterministic(tmp_path):
  a, b, c = (coco_tiny.write_tiny_coco(str(tmp_path / d), "val", 5, seed=s)
             for d, s in (("a", 0), ("b", 0), ("c", 1)))
  files = sorted(os.listdir(os.path.join(a, "val"))) + ["../annotations/instances_val.json",
                                                        "../annotations/captions_val.json"]
  read = lambda root, f: open(os.path.join(root, "val", f), "rb").read()
  assert all(read(a, f) == read(b, f) for f in files)
  assert read(a, files[-2]) != read(c, files[-2])


# ----------------------------------------------------------------------------- segmentation


def test_compressed_rle_matches_uncompressed():
  # Hand-derived from the pycocotools format: multi-group counts, and a negative delta.
  assert coco.rle_counts_from_string("53T3U1") == [5, 3, 100, 40]
  assert coco.rle_counts_from_string(":d05^O") == [10, 20, 5, 2]
  assert _compress([5, 3, 100, 40]) == "53T3U1" and _compress([10, 20, 5, 2]) == ":d05^O"
  rng = np.random.default_rng(0)
  masks = [np.zeros((5, 7), bool), np.ones((6, 4), bool), rng.random((33, 47)) < 0.5]
  blob = np.zeros((60, 80), bool)
  blob[10:50, 5:70] = True
  blob[20:30, 30:40] = False  # a hole: polygons cannot say this, RLE can
  masks += [blob, np.pad(blob, 1, constant_values=True)]
  for m in masks:
    counts = _runs(m)
    plain = coco.decode_rle({"counts": counts, "size": list(m.shape)})
    packed = coco.decode_rle({"counts": _compress(counts), "size": list(m.shape)})
    np.testing.assert_array_equal(plain, m)
    np.testing.assert_array_equal(packed, m)
    assert coco.encode_rle(m) == {"counts": _compress(counts), "size": list(m.shape)}


def test_rle_through_the_source(tmp_path):
  mask = np.zeros((20, 40), bool)
  mask[4:16, 6:30] = True
  mask[8:12, 10:14] = False
  counts = _runs(mask)
  anns = [{"bbox": [6, 4, 24, 12], "segmentation": {"counts": _compress(counts), "size": [20, 40]}},
          {"bbox": [6, 4, 24, 12], "segmentation": {"counts": counts, "size": [20, 40]}}]
  ex = coco.CocoSource(_custom(str(tmp_path), anns), SPLIT, 20, 5)[0]
  np.testing.assert_array_equal(ex["masks"][0], ex["masks"][1])
  # 40 -> 20 columns: output pixel c covers input columns 2c, 2c + 1 (half each).
  want = np.zeros((20, 20), bool)
  want[4:16, 3:15] = True
  want[8:12, 5:7] = False
  np.testing.assert_array_equal(ex["masks"][0], want)
  np.testing.assert_allclose(ex["boxes"][0], [3, 4, 15, 16])


def test_polygon_rasterises_a_known_rectangle(tmp_path):
  want = np.zeros((12, 12), bool)
  want[3:7, 2:10] = True  # edges x 2..10, y 3..7
  rect = np.array([[2, 3], [10, 3], [10, 7], [2, 7]], float)
  np.testing.assert_array_equal(coco.polygon_mask([rect], 12), want)
  half = np.zeros((12, 12), bool)
  half[3:7, 2:11] = True  # x 2.5..10.5: the half-covered edge pixels count
  np.testing.assert_array_equal(coco.polygon_mask([rect + [0.5, 0]], 12), half)
  thin = np.zeros((12, 12), bool)
  thin[3:7, 3:9] = True  # x 2.8..9.2: the 0.2-covered edge pixels do not
  np.testing.assert_array_equal(coco.polygon_mask([rect * [0.8, 1] + [1.2, 0]], 12), thin)
  assert not coco.polygon_mask([rect[:2]], 12).any()  # two points enclose nothing
  ex = coco.CocoSource(_custom(str(tmp_path), [_rect(4, 3, 20, 7)]), SPLIT, 20, 5)[0]
  expected = np.zeros((20, 20), bool)
  expected[3:7, 2:10] = True  # columns halve, rows stay
  np.testing.assert_array_equal(ex["masks"][0], expected)
  np.testing.assert_allclose(ex["boxes"][0], [2, 3, 10, 7])


# ----------------------------------------------------------------------------- object rules


def test_crowd_and_degenerate_boxes_are_skipped(tmp_path):
  crowd = {"bbox": [0, 0, 40, 20], "iscrowd": 1, "segmentation": {"counts": [0, 800], "size": [20, 40]}}
  flat = {"bbox": [5, 5, 0, 4], "segmentation": [[5, 5, 5, 9, 5, 5]]}
  outside = {"bbox": [50, 5, 4, 4], "segmentation": [[50, 5, 54, 5, 54, 9]]}
  ex = coco.CocoSource(_custom(str(tmp_path), [crowd, _rect(2, 2, 10, 8), flat, outside]), SPLIT, 40, 5)[0]
  assert ex["masks"].shape == (1, 40, 40)
  np.testing.assert_allclose(ex["boxes"], [[2, 4, 10, 16]])


def test_max_objects_keeps_the_largest_in_file_order(tmp_path):
  widths = [3, 6, 2, 5, 4]  # areas 3h, 6h, ...: the largest three are 6, 5, 4
  anns = [_rect(8 * i, 0, 8 * i + w, 10) for i, w in enumerate(widths)]
  src = coco.CocoSource(_custom(str(tmp_path), anns), SPLIT, 20, 3)
  ex = src[0]
  np.testing.assert_allclose(ex["boxes"][:, 2] - ex["boxes"][:, 0], [3, 2.5, 2])  # 6, 5, 4 at x 0.5
  np.testing.assert_allclose(ex["boxes"][:, 0], [4, 12, 16])
  assert len(coco.CocoSource(str(tmp_path), SPLIT, 20, 5)[0]["classes"]) == 5
  assert len(coco.CocoSource(str(tmp_path), SPLIT, 20, 0)[0]["classes"]) == 0


def test_pad_targets_accepts_items(tiny):
  src = coco.CocoSource(tiny, SPLIT, 48, 3)
  items = [src[i] for i in range(len(src))]
  out = detection.pad_targets(items, src.max_objects)
  assert out["tgt_masks"].shape == (8, 3, 48, 48) and out["tgt_boxes"].shape == (8, 3, 4)
  for i, ex in enumerate(items):
    n = len(ex["classes"])
    assert out["tgt_valid"][i].sum() == n
    np.testing.assert_array_equal(out["tgt_masks"][i, :n], ex["masks"])
    np.testing.assert_array_equal(out["tgt_boxes_xyxy"][i, :n], ex["boxes"])


def test_pickles(tiny):
  src = coco.CocoSource(tiny, SPLIT, 32, 3)
  again = pickle.loads(pickle.dumps(src))
  assert repr(again) == repr(src) and "n=8" in repr(src)
  a, b = src[4], again[4]
  for k in a:
    if isinstance(a[k], np.ndarray):
      np.testing.assert_array_equal(a[k], b[k])
    else:
      assert a[k] == b[k], k


# ----------------------------------------------------------------------------- bad input


def _error(fn, *needles):
  with pytest.raises(ValueError) as info:
    fn()
  msg = str(info.value)
  assert "\n" not in msg, msg
  for needle in needles:
    assert needle in msg, (needle, msg)
  return msg


def test_missing_instances_file_names_the_expected_path(tiny, tmp_path):
  _error(lambda: coco.CocoSource(str(tmp_path), "val2017", 32, 3),
         _instances_path(str(tmp_path), "val2017"), "does not exist")
  _error(lambda: coco.CocoSource(tiny, "val2017", 32, 3), _instances_path(tiny, "val2017"),
         f"instances_{SPLIT}.json")  # says what is there


def test_malformed_json_names_file_and_position(tiny, copy):
  path = _instances_path(copy)
  with open(path, "w") as f:
    f.write('{"images": [{"id": 1,,}]}')
  _error(lambda: coco.CocoSource(copy, SPLIT, 32, 3), path, "not valid JSON", "line 1 column")
  shutil.copy(_instances_path(tiny), path)
  cpath = os.path.join(copy, "annotations", f"captions_{SPLIT}.json")
  with open(cpath, "w") as f:
    f.write("[")
  _error(lambda: coco.CocoSource(copy, SPLIT, 32, 3), cpath, "not valid JSON")
  coco.CocoSource(copy, SPLIT, 32, 3, captions=False)  # not read when not wanted


@pytest.mark.parametrize("key", ["bbox", "category_id", "segmentation", "id"])
def test_missing_annotation_key_names_id_and_key(copy, key):
  path = _edit(copy, lambda d: d["annotations"][1].pop(key))
  where = "annotation #1" if key == "id" else "annotation id 2"
  _error(lambda: coco.CocoSource(copy, SPLIT, 32, 3), path, where, repr(key))


def test_bad_entries_name_the_entry(copy):
  path = _edit(copy, lambda d: d["images"][2].pop("file_name"))
  _error(lambda: coco.CocoSource(copy, SPLIT, 32, 3), path, "image id 1014", "'file_name'")
  path = _edit(copy, lambda d: d["images"][2].update(file_name="x.png"))
  _edit(copy, lambda d: d["annotations"][0].update(bbox=[1, 2, 3]))
  _error(lambda: coco.CocoSource(copy, SPLIT, 32, 3), path, "annotation id 1", "[x, y, w, h]")
  _edit(copy, lambda d: d["annotations"][0].update(bbox=[1, 2, 3, 4], image_id=5))
  _error(lambda: coco.CocoSource(copy, SPLIT, 32, 3), path, "annotation id 1", "image_id 5", "'images'")


def test_unknown_category_names_the_annotation(copy):
  path = _edit(copy, lambda d: d["annotations"][0].update(category_id=999))
  _error(lambda: coco.CocoSource(copy, SPLIT, 32, 3), path, "annotation id 1", "category_id 999",
         "valid ids: 2, 5, 9")


def test_missing_or_unreadable_image_names_the_path(copy):
  src = coco.CocoSource(copy, SPLIT, 32, 3)
  first = os.path.join(copy, SPLIT, src[0]["file_name"])
  second = os.path.join(copy, SPLIT, src[1]["file_name"])
  os.remove(first)
  _error(lambda: src[0], first, "does not exist")
  with open(second, "wb") as f:
    f.write(b"not a png")
  _error(lambda: src[1], second, "not a readable image")
  third = os.path.join(copy, SPLIT, src[2]["file_name"])
  Image.new("RGB", (10, 10)).save(third)
  _error(lambda: src[2], third, "10x10", "64x48")


def test_bad_rle_names_the_annotation(tmp_path):
  anns = [{"bbox": [0, 0, 4, 4], "segmentation": {"counts": [3, 4], "size": [20, 40]}}]
  src = coco.CocoSource(_custom(str(tmp_path), anns), SPLIT, 20, 5)
  _error(lambda: src[0], _instances_path(str(tmp_path)), "annotation id 1", "sum to 7")
  anns = [{"bbox": [0, 0, 4, 4], "segmentation": {"counts": [800], "size": [10, 40]}}]
  _error(lambda: coco.CocoSource(_custom(str(tmp_path), anns), SPLIT, 20, 5), "annotation id 1",
         "[20, 40]")
