"""Drawing the shapes data set: the shapes, the palette, the 3 x 3 grid of cells, and painting
an object (a shape of a colour and size at a corner in a cell) into an image and its mask.
The scenes, captions and questions are in `mmjax.data.shapes`."""
from __future__ import annotations

import functools
import random

import numpy as np

SHAPES = ("square", "circle", "triangle", "diamond", "cross")
PALETTE = {  # distinct RGB, none equal to BACKGROUND; "a"-words only (no "an orange")
    "red": (230, 40, 40), "green": (40, 200, 70), "blue": (50, 100, 245), "yellow": (240, 220, 40),
    "purple": (160, 60, 220), "white": (240, 240, 240), "cyan": (40, 215, 225), "pink": (250, 140, 190)}
BACKGROUND = (16, 16, 24)


def cell_edges(size: int) -> np.ndarray:
  """Pixel edges of the 3 x 3 grid of an image of side `size`."""
  return np.round(np.arange(4) * size / 3).astype(int)  # 32 -> [0, 11, 21, 32]


def object_sides(size: int) -> dict:
  """Side in pixels of the square an object is drawn in: {"small": s, "large": l}."""
  cell = size // 3
  return {"small": max(5, (cell + 1) // 2), "large": min(cell - 2, round(0.85 * cell))}


@functools.lru_cache(maxsize=None)
def patch_mask(shape: str, side: int) -> np.ndarray:
  """bool [side, side]: the shape sampled at pixel centres of its unit square."""
  c = (np.arange(side) + 0.5) / side - 0.5  # centred coordinates in (-0.5, 0.5)
  u, v = c[None, :], c[:, None]
  if shape == "square":
    m = np.ones((side, side), bool)
  elif shape == "circle":
    m = u * u + v * v <= 0.25
  elif shape == "diamond":
    m = np.abs(u) + np.abs(v) <= 0.5
  elif shape == "triangle":  # apex up, base on the bottom row
    m = np.abs(u) <= (v + 0.5) / 2
  elif shape == "cross":
    m = (np.abs(u) <= 1 / 6) | (np.abs(v) <= 1 / 6)  # arms a third wide
  else:
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")
  m = np.broadcast_to(m, (side, side)).copy()
  m.flags.writeable = False
  return m


@functools.lru_cache(maxsize=None)
def patch_box(shape: str, side: int) -> tuple:
  """(x0, y0, x1, y1) of the shape's pixels inside its square."""
  m = patch_mask(shape, side)
  rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
  return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def place(rng: random.Random, cell: int, side: int, size: int, jitter: bool) -> tuple:
  """Top-left corner (x, y) of a side x side square inside `cell`, 1 pixel from its edges."""
  e = cell_edges(size)
  out = []
  for lo, hi in ((e[cell % 3], e[cell % 3 + 1]), (e[cell // 3], e[cell // 3 + 1])):
    first, last = lo + 1, hi - 1 - side
    out.append(rng.randint(first, last) if jitter else (first + last) // 2)
  return tuple(out)


def draw(image, mask, obj, size):
  """Paints `obj` = (shape, colour, size_name, cell, (x, y)) into image [H, W, 3] and
  mask [H, W]; returns its float32 box."""
  shape, colour, size_name, _, (x, y) = obj
  side = object_sides(size)[size_name]
  m = patch_mask(shape, side)
  image[y:y + side, x:x + side][m] = PALETTE[colour]
  mask[y:y + side, x:x + side] = m
  x0, y0, x1, y1 = patch_box(shape, side)
  return np.array([x + x0, y + y0, x + x1, y + y1], np.float32)


def canvas(n_frames, size):
  """uint8 [n_frames, size, size, 3] filled with the background colour."""
  return np.broadcast_to(np.array(BACKGROUND, np.uint8), (n_frames, size, size, 3)).copy()
