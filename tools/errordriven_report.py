"""The error-driven selection claims, checked on a finished `tools/seeds.py` run of
configs/shapes_errordriven.py.

  python tools/seeds.py --config configs/shapes_errordriven.py --seeds 3 --workdir W
  python tools/errordriven_report.py --workdir W [--metric gen_answer_match] [--budget 300]

Per seed (W/seed_K/results.json and the stages' selection.json files) and as mean ± sd:
the student, error-driven and random selections at the budget (default: the largest) and
the full pool; error-driven as a share of the full pool; error-driven minus random; the
share of the error-driven selection tagged with a missing skill (on_missing_skill) and the
stricter share whose question asks one (asks_missing_skill); the headroom (full minus
student). Then each target of the paper (issue 15) as holds / does not hold:

  headroom         full - student >= 0.15 on every seed (else the experiment is invalid)
  share of full    error-driven >= 0.94 x full on average over the seeds
  beats random     error-driven - random >= 0.10 on every seed
  on target        >= 70% of the selected records exercise a missing skill (every seed)

Writes W/errordriven_report.txt (and prints it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmjax.recipes.claims import publish, ReportError, after, seed_results, table, verdicts  # noqa: E402


def asks_missing(seed_dir: str, stage: str, indices, profile: dict, min_weight: float = 0.1) -> float:
  """Share of the selected pool records whose question *asks* a missing skill (its first
  skill tag has profile weight >= min_weight), from the run's own config.json: stricter than
  `on_missing_skill`, which counts any tag (a plain "is there an object at the top?" is
  tagged existence and position)."""
  import ml_collections
  from mmjax.config import core
  from mmjax.data import catalog
  from mmjax.recipes import select
  path = os.path.join(seed_dir, "config.json")
  if not os.path.exists(path) or not indices:
    return float("nan")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  pool = catalog.open_source(select.pool_data(core.stage_config(config, stage)), "train")
  missing = {k for k, w in profile.items() if w >= min_weight}
  asks = [tuple(pool[int(i)].get("skills", ()))[:1] for i in indices]
  return sum(bool(a and a[0] in missing) for a in asks) / len(asks)


def seed_rows(workdir: str, metric: str, budget: int | None) -> list[dict]:
  """One dict per finished seed: the compared rates and the selection's statistics."""
  rows = []
  for seed, seed_dir, results in seed_results(workdir):
    budgets = sorted(int(k.split("_")[1]) for k in results if re.fullmatch(r"errors_\d+", k))
    if not budgets:
      raise ReportError(f"{seed_dir}/results.json has no errors_B stage: is this an error-driven recipe's run?")
    b = budget or budgets[-1]
    if b not in budgets:
      raise ReportError(f"--budget={b} is not a budget of {seed_dir}; budgets: {', '.join(map(str, budgets))}")
    sel = os.path.join(seed_dir, "stages", f"errors_{b}", "selection.json")
    if not os.path.exists(sel):
      raise ReportError(f"{sel} is missing: the errors_{b} stage of seed {seed_dir} did not select")
    with open(sel) as f:
      selection = json.load(f)
    meta, idx = selection["meta"], selection["indices"]
    row = dict(seed=seed, budget=b,
               asks_missing_skill=asks_missing(seed_dir, f"errors_{b}", idx, meta.get("profile") or {}),
               student=after(results, "student", metric), errors=after(results, f"errors_{b}", metric),
               random=after(results, f"random_{b}", metric), full=after(results, "full", metric),
               on_missing_skill=float(meta.get("on_missing_skill", float("nan"))))
    row.update(headroom=row["full"] - row["student"], share_of_full=row["errors"] / row["full"] if row["full"] else
               float("nan"), errors_minus_random=row["errors"] - row["random"])
    rows.append(row)
  return rows


COLUMNS = ("student", "errors", "random", "full", "share_of_full", "errors_minus_random", "on_missing_skill",
           "asks_missing_skill", "headroom")


def report(rows: list[dict], metric: str) -> str:
  lines = table(f"error-driven selection, {metric}, budget {rows[0]['budget']} ({len(rows)} seeds)", rows, COLUMNS)
  mean = lambda c: sum(r[c] for r in rows) / len(rows)
  checks = [("headroom: full - student >= 0.15 on every seed", all(r["headroom"] >= 0.15 for r in rows)),
            ("share of full: error-driven >= 0.94 x full (mean)", mean("errors") >= 0.94 * mean("full")),
            ("beats random: error-driven - random >= 0.10 on every seed",
             all(r["errors_minus_random"] >= 0.10 for r in rows)),
            ("on target: >= 70% of selected records on a missing skill (every seed)",
             all(r["on_missing_skill"] >= 0.70 for r in rows))]
  lines.append("")
  lines += verdicts(checks)
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
  publish(args.workdir, "errordriven_report.txt", text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
