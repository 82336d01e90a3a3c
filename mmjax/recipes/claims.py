"""A paper's claims checked on a finished multi-seed run (`tools/seeds.py`): the helpers the
claim reports (`tools/errordriven_report.py`, `tools/directed_report.py`) share.

A report reads each seed's results.json, builds one row of compared numbers per seed, and
prints them with their mean ± sd and each claim as holds / does not hold.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re

from mmjax.files import atomic_write


class ReportError(SystemExit):
  """A run that cannot be reported (one line; exits the tool with it)."""


def seed_results(workdir: str) -> list[tuple[int, str, dict]]:
  """[(seed, seed_dir, results.json)] of every finished seed under a tools/seeds.py workdir."""
  out = []
  for path in glob.glob(os.path.join(workdir, "seed_*", "results.json")):
    with open(path) as f:
      out.append((int(re.search(r"seed_(\d+)", path).group(1)), os.path.dirname(path), json.load(f)))
  if not out:
    raise ReportError(f"no seed_K/results.json under {workdir}; run tools/seeds.py first")
  return sorted(out, key=lambda t: t[0])


def after(results: dict, stage: str, metric: str) -> float:
  """A stage's `metric` after training, or a one-line error naming what the run has."""
  try:
    return float(results[stage]["eval_after"][metric])
  except (KeyError, TypeError):
    raise ReportError(f"results.json has no {metric} for stage {stage!r}; stages: "
                      f"{', '.join(k for k in results if not k.startswith('_'))}") from None


def mean_sd(values) -> str:
  """'mean ± sd' (sd with n - 1; the mean alone for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return f"{mean:.4f}"
  return f"{mean:.4f} ± {math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)):.4f}"


def table(title: str, rows: list[dict], columns, width: int = 21) -> list[str]:
  """Lines: the title, a header, one line per seed and the mean ± sd line; each column at least
  `width` wide and one space wider than its widest cell, so cells never run together."""
  cells = {c: [c] + [f"{r[c]:.4f}" for r in rows] + [mean_sd([r[c] for r in rows])] for c in columns}
  w = {c: max(width, 1 + max(len(x) for x in cells[c])) for c in columns}
  lines = [title, "seed  " + "".join(f"{cells[c][0]:>{w[c]}}" for c in columns)]
  for i, r in enumerate(rows):
    lines.append(f"{r['seed']:<6}" + "".join(f"{cells[c][1 + i]:>{w[c]}}" for c in columns))
  lines.append("mean  " + "".join(f"{cells[c][-1]:>{w[c]}}" for c in columns))
  return lines


def verdicts(checks) -> list[str]:
  """'holds' / 'does not hold' lines of (text, ok) pairs; 'not run' where ok is None (the run
  lacks an arm the check needs)."""
  word = lambda ok: "not run" if ok is None else "holds" if ok else "does not hold"
  return [f"{word(ok):<14} {text}" for text, ok in checks]


def publish(workdir: str, name: str, text: str) -> None:
  """Writes a report to WORKDIR/NAME (atomically) and prints it."""
  atomic_write(os.path.join(workdir, name), text + "\n")
  print(text)
