"""Runs a recipe with several seeds and tabulates every stage's metrics as mean ± sd.

  python tools/seeds.py --config configs/shapes_directed.py:scale=0.5 --seeds 3 --workdir /tmp/directed_seeds \
      [-- --config.key=value ...]

Seed K runs `python -m mmjax.main --config CONFIG:...,seed=K --workdir WORKDIR/seed_K` (the
recipe's `seed` arg sets the run seed, so initialisation and data order, and the generated
train / eval sets: `mmjax.config.core.apply_seed`). A seed whose results.json exists is not
run again, and an interrupted one resumes, so rerunning the command completes the set.
Each seed's own table is its results.txt. With `--reuse_from W0` (an earlier run of this tool),
seed K gets `--config.reuse_from=W0/seed_K` (when W0 ran seed K): the stages it finished with the same
stage config are copied instead of trained (`mmjax.recipes.reuse`), so an ablation of the
later stages retrains only what it changes. The seeds share one compilation cache,
WORKDIR/compile_cache (`mmjax.runtime.compile_cache`; unless `-- --compile_cache=...` or
$JAX_COMPILATION_CACHE_DIR names another), so seed 1 on reuses what seed 0 compiled. Then:

  WORKDIR/seeds.json  {"seeds": [...], "rows": {row: {metric: {"values", "mean", "sd", "se", "n"}}}}
  WORKDIR/seeds.txt   one row per table row (`mmjax.recipes.results.table_rows`), each metric
                      as mean ± sd over the seeds (sd with n - 1; se = sd / sqrt(n))

Differences between two rows are meaningful only beyond about two standard errors of each;
per-caption and micro-averaged caption rates both appear when the recipe reports them, and so
does the recipe's headroom check (`config.headroom`) per seed, and how many rounds the stop rule
kept (`config.stop`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmjax import runtime  # noqa: E402
from mmjax.files import atomic_write  # noqa: E402
from mmjax.recipes import results as results_lib, reuse  # noqa: E402


def seeded_config(spec: str, seed: int) -> str:
  """CONFIG[:ARGS] with `seed=K` added to its args."""
  path, _, arg = spec.partition(":")
  args = [a for a in arg.split(",") if a and not a.startswith("seed=")]
  return f"{path}:{','.join(args + [f'seed={seed}'])}"


def run_seed(spec: str, seed: int, workdir: str, extra: list[str], reuse_from: str = "") -> dict:
  """The recipe's results.json for `seed`, running it first when it has not finished (with
  `reuse_from`, the stages seed_K of that seeds.py workdir finished alike are copied in)."""
  out = os.path.join(workdir, f"seed_{seed}")
  done = os.path.join(out, "results.json")
  if not os.path.exists(done):
    source = os.path.join(reuse_from, f"seed_{seed}") if reuse_from else ""
    if source and reuse.is_run(source):
      extra = [f"--config.reuse_from={source}", *extra]
    elif source:
      print(f"seed {seed}: {source} holds no run; every stage is trained", flush=True)
    if not any(a.startswith("--compile_cache") for a in extra):  # one cache for every seed
      extra = [f"--compile_cache={runtime.compile_cache(None, workdir)}", *extra]
    cmd = [sys.executable, "-m", "mmjax.main", "--config", seeded_config(spec, seed), "--workdir", out, *extra]
    print(f"seed {seed}: {' '.join(cmd[1:])}", flush=True)
    r = subprocess.run(cmd, cwd=ROOT)
    if r.returncode != 0 or not os.path.exists(done):
      raise SystemExit(f"seed {seed} did not finish (exit code {r.returncode}); see {out}; rerun to resume it")
  with open(done) as f:
    return json.load(f)


def summarise(per_seed: dict[int, dict]) -> dict:
  """{row: {metric: {values, mean, sd, se, n}}} over the seeds' results (rows in table order)."""
  rows: dict[str, dict[str, list]] = {}
  for _, results in sorted(per_seed.items()):
    for label, metrics in results_lib.table_rows(results):
      row = rows.setdefault(label, {})
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and v is not None and math.isfinite(float(v)):
          row.setdefault(k, []).append(float(v))
  checks = [r["_headroom"] for _, r in sorted(per_seed.items()) if "_headroom" in r]
  if checks:  # the recipe's validity check per seed (config.headroom)
    h = checks[0]
    first, second = (h["floor"], h["ceiling"]) if h.get("lower_is_better") else (h["ceiling"], h["floor"])
    rows[f"headroom ({first} - {second}, {h['metric']})"] = {"value": [c["value"] for c in checks]}
  stops = [r["_stop"] for _, r in sorted(per_seed.items()) if "_stop" in r]
  if stops:  # the recipe's stop rule per seed (config.stop): how many rounds it kept
    rows[f"stop rule (rounds kept of {stops[0]['rounds']})"] = {"value": [float(s["kept_rounds"]) for s in stops]}
  out = {}
  for label, row in rows.items():
    out[label] = {}
    for k, values in row.items():
      n = len(values)
      mean = sum(values) / n
      sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1)) if n > 1 else float("nan")
      out[label][k] = dict(values=values, mean=mean, sd=sd, se=sd / math.sqrt(n) if n > 1 else float("nan"), n=n)
  return out


def format_table(summary: dict, seeds: list[int]) -> str:
  keys = results_lib.metric_keys([(label, row) for label, row in summary.items()])
  cell = lambda s: f"{s['mean']:.4f} ± {s['sd']:.4f}" if s["n"] > 1 else f"{s['mean']:.4f}"
  w = max([14] + [len(k) + 2 for k in keys] + [len(cell(s)) + 2 for row in summary.values() for s in row.values()])
  lines = [f"mean ± sd over seeds {', '.join(map(str, seeds))}",
           f"{'stage':<16}" + "".join(f"{k:>{w}}" for k in keys)]
  for label, row in summary.items():
    lines.append(f"{label:<16}" + "".join(f"{cell(row[k]) if k in row else '':>{w}}" for k in keys))
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  extra = []
  if "--" in argv:
    i = argv.index("--")
    argv, extra = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="configs/NAME.py[:ARGS] of a recipe with a `seed` arg")
  p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
  p.add_argument("--first_seed", type=int, default=0)
  p.add_argument("--workdir", required=True)
  p.add_argument("--reuse_from", default="", help="an earlier seeds.py workdir: each seed copies the stages its "
                 "seed_K finished with the same stage config instead of training them (config.reuse_from)")
  args = p.parse_args(argv)
  if args.seeds < 1:
    p.error(f"--seeds={args.seeds} must be at least 1")
  if args.reuse_from and not os.path.isdir(args.reuse_from):
    p.error(f"--reuse_from={args.reuse_from!r} is not a directory; give an earlier seeds.py --workdir")
  seeds = list(range(args.first_seed, args.first_seed + args.seeds))
  per_seed = {s: run_seed(args.config, s, args.workdir, extra, args.reuse_from) for s in seeds}
  summary = summarise(per_seed)
  text = format_table(summary, seeds)
  atomic_write(os.path.join(args.workdir, "seeds.json"), json.dumps(dict(seeds=seeds, rows=summary), indent=1))
  atomic_write(os.path.join(args.workdir, "seeds.txt"), text + "\n")
  print(text, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
