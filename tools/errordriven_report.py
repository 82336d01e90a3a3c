"""The error-driven selection claims, checked on a finished `tools/seeds.py` run of
configs/shapes_errordriven.py.

  python tools/seeds.py --config configs/shapes_errordriven.py --seeds 3 --workdir W
  python tools/errordriven_report.py --workdir W [--metric gen_answer_match] [--budget 300]

Per seed (W/seed_K/results.json and the stages' selection.json files) and as mean ± sd:
the student, error-driven and random selections at the budget (default: the largest) and
the full pool; error-driven as a share of the full pool; error-driven minus random; the
share of the error-driven selection tagged with a missing skill; the headroom (full minus
student). Then each target of the paper (issue 15) as holds / does not hold:

  headroom         full - student >= 0.15 on every seed (else the experiment is invalid)
  share of full    error-driven >= 0.94 x full on average over the seeds
  beats random     error-driven - random >= 0.10 on every seed
  on target        >= 70% of the selected records exercise a missing skill (every seed)

Writes W/errordriven_report.txt (and prints it).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmjax.files import atomic_write  # noqa: E402


def _after(results: dict, stage: str, metric: str) -> float:
  try:
    return float(results[stage]["eval_after"][metric])
  except (KeyError, TypeError):
    raise SystemExit(f"results.json has no {metric} for stage {stage!r}; stages: "
                     f"{', '.join(k for k in results if not k.startswith('_'))}") from None


def seed_rows(workdir: str, metric: str, budget: int | None) -> list[dict]:
  """One dict per finished seed: the compared rates and the selection's statistics."""
  rows = []
  for path in sorted(glob.glob(os.path.join(workdir, "seed_*", "results.json")),
                     key=lambda p: int(re.search(r"seed_(\d+)", p).group(1))):
    seed_dir = os.path.dirname(path)
    with open(path) as f:
      results = json.load(f)
    budgets = sorted(int(k.split("_")[1]) for k in results if re.fullmatch(r"errors_\d+", k))
    if not budgets:
      raise SystemExit(f"{path} has no errors_B stage: is this an error-driven recipe's run?")
    b = budget or budgets[-1]
    if b not in budgets:
      raise SystemExit(f"--budget={b} is not a budget of {path}; budgets: {', '.join(map(str, budgets))}")
    sel = os.path.join(seed_dir, "stages", f"errors_{b}", "selection.json")
    if not os.path.exists(sel):
      raise SystemExit(f"{sel} is missing: the errors_{b} stage of seed {seed_dir} did not select")
    with open(sel) as f:
      meta = json.load(f)["meta"]
    row = dict(seed=int(re.search(r"seed_(\d+)", seed_dir).group(1)), budget=b,
               student=_after(results, "student", metric), errors=_after(results, f"errors_{b}", metric),
               random=_after(results, f"random_{b}", metric), full=_after(results, "full", metric),
               on_missing_skill=float(meta.get("on_missing_skill", float("nan"))))
    row.update(headroom=row["full"] - row["student"], share_of_full=row["errors"] / row["full"] if row["full"] else
               float("nan"), errors_minus_random=row["errors"] - row["random"])
    rows.append(row)
  if not rows:
    raise SystemExit(f"no seed_K/results.json under {workdir}; run tools/seeds.py first")
  return rows


def _mean_sd(values) -> str:
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return f"{mean:.4f}"
  return f"{mean:.4f} ± {math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)):.4f}"


COLUMNS = ("student", "errors", "random", "full", "share_of_full", "errors_minus_random", "on_missing_skill",
           "headroom")


def report(rows: list[dict], metric: str) -> str:
  b = rows[0]["budget"]
  lines = [f"error-driven selection, {metric}, budget {b} ({len(rows)} seeds)",
           "seed  " + "".join(f"{c:>21}" for c in COLUMNS)]
  for r in rows:
    lines.append(f"{r['seed']:<6}" + "".join(f"{r[c]:>21.4f}" for c in COLUMNS))
  lines.append("mean  " + "".join(f"{_mean_sd([r[c] for r in rows]):>21}" for c in COLUMNS))
  mean = lambda c: sum(r[c] for r in rows) / len(rows)
  checks = [("headroom: full - student >= 0.15 on every seed", all(r["headroom"] >= 0.15 for r in rows)),
            ("share of full: error-driven >= 0.94 x full (mean)", mean("errors") >= 0.94 * mean("full")),
            ("beats random: error-driven - random >= 0.10 on every seed",
             all(r["errors_minus_random"] >= 0.10 for r in rows)),
            ("on target: >= 70% of selected records on a missing skill (every seed)",
             all(r["on_missing_skill"] >= 0.70 for r in rows))]
  lines.append("")
  lines += [f"{'holds' if ok else 'does not hold':<14} {text}" for text, ok in checks]
  if not checks[0][1]:
    lines.append("(without headroom the other rows are not a result: the full pool cannot teach the target)")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="the tools/seeds.py workdir (with seed_K/ folders)")
  p.add_argument("--metric", default="gen_answer_match")
  p.add_argument("--budget", type=int, default=None, help="default: the largest budget")
  args = p.parse_args(argv)
  text = report(seed_rows(args.workdir, args.metric, args.budget), args.metric)
  atomic_write(os.path.join(args.workdir, "errordriven_report.txt"), text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
