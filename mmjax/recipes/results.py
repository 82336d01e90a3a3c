"""A finished recipe's results: the table of every stage's held-out metrics (printed and
written to WORKDIR/results.txt), WORKDIR/results.json and the loss curves."""
from __future__ import annotations

import json
import os

from mmjax.files import atomic_write
from mmjax.recipes import stop as stop_lib
from mmjax.train import plots


# Per-stage numbers beside the metrics, last in the table: a DPO round's first-step loss, the
# rows its prepared files hold (online pairs, rebirth answers) and the stop rule's validation
# value (`mmjax.recipes.stop`).
EXTRAS = ("first_dpo_loss", "pairs", "distill_rows", "validation")
FILES = {"pairs": "pairs.jsonl", "distill_rows": "distill.jsonl"}


def count_rows(path: str) -> int | None:
  """Non-empty lines of a JSONL file, or None when there is none."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return sum(1 for line in f if line.strip())


def first_step(sdir: str) -> dict:
  """The step-1 train metrics of a stage (from its metrics.jsonl), or {}."""
  rows = plots.read_rows(os.path.join(sdir, "metrics.jsonl"))
  return next((r for r in rows if r["split"] == "train" and r["step"] == 1), {})


def _agree(a: dict, b: dict) -> bool:
  """Two metric dicts share keys and agree on all of them (a DPO round scores fewer keys)."""
  common = set(a) & set(b)
  return bool(common) and all(a[k] == b[k] for k in common)


def table_rows(results: dict) -> list[tuple[str, dict]]:
  """(label, metrics) per table row: each stage's eval after training (with its
  `first_dpo_loss` when it has one), and a `NAME @start` row before a stage whose starting
  metrics are in no row above (a new eval task, e.g. the base model a comparison starts
  from). Keys of `results` starting with '_' are not stages."""
  rows, shown = [], []
  for name, r in results.items():
    if name.startswith("_"):  # not a stage (results.json's _headroom, _stop)
      continue
    before = r.get("eval_before") or {}
    if shown and before and not any(_agree(before, x) for x in shown):  # a new eval task or starting point
      rows.append((f"{name} @start", dict(before)))
      shown.append(before)
    ev = r.get("eval_after") or {}
    extra = {k: r[k] for k in EXTRAS if r.get(k) is not None}
    rows.append((name, {**ev, **extra}))
    shown.append(ev)
  return rows


def metric_keys(rows) -> list[str]:
  """The metric names of table rows in first-seen order, the EXTRAS last."""
  keys = []
  for _, m in rows:
    for k in m:
      if k not in keys:
        keys.append(k)
  return [k for k in keys if k not in EXTRAS] + [k for k in EXTRAS if k in keys]


def table(results: dict) -> str:
  """The recipe's table: `table_rows`, one column per metric."""
  rows = table_rows(results)
  keys = metric_keys(rows)
  w = max([14] + [len(k) + 2 for k in keys])
  lines = [f"{'stage':<16}" + "".join(f"{k:>{w}}" for k in keys)]
  for label, m in rows:
    blank = lambda k: "" if k in EXTRAS else "nan"
    lines.append(f"{label:<16}" + "".join(f"{m[k]:>{w}.4f}" if k in m else f"{blank(k):>{w}}" for k in keys))
  return "\n".join(lines)


def headroom(results: dict, check) -> dict | None:
  """The recipe's validity check (`config.headroom`): {metric, floor, ceiling, value, min,
  valid, lower_is_better}, value = ceiling stage's metric - floor stage's (eval after
  training; floor's - ceiling's for an error rate, `lower_is_better`); None when
  there is no check or a stage lacks the metric."""
  if not check or not check.metric:
    return None
  ev = lambda stage: (results.get(stage) or {}).get("eval_after") or {}
  lo, hi = ev(check.floor).get(check.metric), ev(check.ceiling).get(check.metric)
  if lo is None or hi is None:
    return None
  lower = bool(check.get("lower_is_better", False))
  value = (float(lo) - float(hi)) if lower else (float(hi) - float(lo))
  return dict(metric=check.metric, floor=check.floor, ceiling=check.ceiling, value=value, min=float(check.min),
              valid=value >= check.min, lower_is_better=lower)


def headroom_line(h: dict) -> str:
  verdict = ("valid" if h["valid"] else
             f"INVALID: below {h['min']:.2f}, the ceiling is too close to the floor for the compared methods "
             "to differ; this table is not a result")
  metric = h["metric"] + (" (lower is better)" if h.get("lower_is_better") else "")
  return (f"headroom {metric}: {h['ceiling']} {h['value'] + 0:+.4f} over {h['floor']} "
          f"(minimum {h['min']:.2f}): {verdict}")


def write(workdir: str, results: dict, stage_dirs: list[tuple[str, str]], recipe: bool, check_cfg=None,
          stop: dict | None = None) -> None:
  """Loss curves for every stage; for a recipe also the table (printed, results.txt) and
  results.json. A DPO round's first-step loss (log 2 for sigmoid: policy = reference) and the
  rows of a stage's pairs / rebirth file join the table, and the headroom check
  (`config.headroom`) and what the stop rule decided (`stop`: `mmjax.recipes.stop.Rule.summary`)
  follow it."""
  png = plots.loss_curves(workdir, stage_dirs)
  if recipe:
    for n, sdir in stage_dirs:
      if not isinstance(results[n], dict):
        continue
      first = first_step(sdir)
      if "dpo_loss" in first:
        results[n]["first_dpo_loss"] = first["dpo_loss"]
      for key, file in FILES.items():
        rows = count_rows(os.path.join(sdir, file))
        if rows is not None:
          results[n][key] = rows
    text = table(results)
    check = headroom(results, check_cfg)
    if check is not None:
      text += "\n" + headroom_line(check)
    if stop is not None:
      text += "\n" + stop_lib.line(stop)
    print(text, flush=True)
    atomic_write(os.path.join(workdir, "results.txt"), text + "\n")  # the table as printed
    summary = {n: {k: r.get(k) for k in ("eval_before", "eval_after") + EXTRAS} for n, r in results.items()}
    for n, r in results.items():
      if r.get("skipped_for"):  # a round the stop rule did not train: its model is that stage's
        summary[n]["skipped_for"] = r["skipped_for"]
    if check is not None:
      summary["_headroom"] = check
    if stop is not None:
      summary["_stop"] = stop
    atomic_write(os.path.join(workdir, "results.json"), json.dumps(summary, indent=1))
  print(f"loss curves: {png}", flush=True)
