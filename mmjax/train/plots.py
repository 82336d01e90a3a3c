"""A PNG of a run's loss curves, read back from its metrics.jsonl files."""
from __future__ import annotations

import json
import os

from mmjax.files import atomic_write


def read_rows(path) -> list[dict]:
  """The rows of a metrics.jsonl file, one per (split, step), sorted by step ([] if absent)."""
  if not os.path.exists(path):
    return []
  rows = {}
  for line in open(path):
    r = json.loads(line)
    rows[(r["split"], r["step"])] = r  # a resumed run rewrites steps after its checkpoint
  return sorted(rows.values(), key=lambda r: r["step"])


def loss_curves(workdir: str, stages: list[tuple[str, str]], out: str = "loss_curves.png") -> str:
  """Plots train (lines) and eval (dots) loss of each (name, stage workdir) on one step
  axis, stages one after another. Returns the PNG path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
  offset = 0
  values = []
  for i, (name, sdir) in enumerate(stages):
    rows = read_rows(os.path.join(sdir, "metrics.jsonl"))
    train = [r for r in rows if r["split"] == "train" and r.get("loss") is not None]
    evals = [r for r in rows if r["split"] == "eval" and r.get("loss") is not None]
    values += [r["loss"] for r in train + evals]
    colour = f"C{i}"
    if train:
      ax.plot([offset + r["step"] for r in train], [r["loss"] for r in train], color=colour, label=f"{name} train")
    if evals:
      ax.plot([offset + r["step"] for r in evals], [r["loss"] for r in evals], "o", color=colour,
              label=f"{name} eval")
    last = max([r["step"] for r in rows], default=0)
    if i < len(stages) - 1:
      ax.axvline(offset + last, color="grey", lw=0.5, ls="--")
    offset += last
  ax.set_xlabel("step (stages in order)")
  ax.set_ylabel("loss")
  if values and min(values) > 0:
    ax.set_yscale("log")
  if values:
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = os.path.join(workdir, out)
  atomic_write(path, lambda f: fig.savefig(f, format=os.path.splitext(out)[1][1:] or "png"))
  plt.close(fig)
  return path
