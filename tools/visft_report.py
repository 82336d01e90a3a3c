"""The ViSFT claims, checked on a finished `tools/seeds.py` run of configs/shapes_visft.py.

  python tools/seeds.py --config configs/shapes_visft.py --seeds 3 --workdir W
  python tools/visft_report.py --workdir W

Per seed (W/seed_K/results.json) and as mean ± sd: the out-of-domain probe mean
(`probe_ood_mean`) of stage 1 (`heads`: the pretrained tower), stage 2 (`lora`) and the
compute-matched controls (stage 2 through the caption head alone, through detection and
segmentation alone, with other task weights; stage 1 trained longer; single-stage joint
tuning); then stage 2 minus stage 1 on each out-of-domain probe, and the paper's targets
(issue 16) as holds / does not hold:

  every probe    lora >= heads on every out-of-domain probe, on every seed
  controls       lora's probe mean >= the best control's + 0.03 on every seed
and the in-domain numbers (box mAP@0.5, mask IoU) of each stage, as measured.

Writes W/visft_report.txt (and prints it).
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmjax.recipes.claims import ReportError, after, mean_sd, publish, seed_results, table, verdicts  # noqa: E402

CONTROLS = ("lora_caption", "lora_detseg", "lora_weights", "heads_long", "joint")
ARMS = ("heads", "lora") + CONTROLS
SKIP = ("probe_count_acc", "probe_retrieval_r1", "probe_retrieval_r5", "probe_ood_mean")  # in-domain, or the mean


def ood_probes(results: dict) -> list[str]:
  """The out-of-domain probe names of a run (its probe sets' accuracies and r1)."""
  ev = (results.get("lora") or {}).get("eval_after") or {}
  names = sorted(k for k in ev if k.startswith("probe_") and k not in SKIP and not k.endswith("_r5"))
  if not names:
    raise ReportError("results.json has no out-of-domain probe for stage 'lora' (config.visft.probe_sets is empty?)")
  return names


def seed_rows(workdir: str) -> tuple[list[dict], list[dict], list[str]]:
  """(probe-mean rows, stage 2 - stage 1 rows per probe, the probe names)."""
  means, gains, names = [], [], None
  for seed, _, results in seed_results(workdir):
    names = names or ood_probes(results)
    row = dict(seed=seed, **{arm: after(results, arm, "probe_ood_mean") for arm in ARMS})
    row["lora_vs_best"] = row["lora"] - max(row[c] for c in CONTROLS)
    means.append(row)
    gains.append(dict(seed=seed, **{p: after(results, "lora", p) - after(results, "heads", p) for p in names}))
  return means, gains, names


def in_domain(workdir: str) -> list[dict]:
  rows = []
  for seed, _, results in seed_results(workdir):
    rows.append(dict(seed=seed, **{f"{arm}": after(results, arm, "det_map50") for arm in ARMS}))
  return rows


def report(means: list[dict], gains: list[dict], names: list[str], det: list[dict]) -> str:
  n = len(means)
  lines = table(f"out-of-domain probe mean (probe_ood_mean; higher is better; {n} seeds)", means,
                ARMS + ("lora_vs_best",), width=15)
  lines += [""] + table("stage 2 - stage 1 (lora - heads) on each out-of-domain probe", gains, names, width=26)
  lines += [""] + table("in-domain box mAP@0.5 (det_map50)", det, ARMS, width=15)
  checks = [("every probe: lora >= heads on every out-of-domain probe, on every seed",
             all(r[p] >= 0 for r in gains for p in names)),
            ("controls: lora's probe mean >= the best control's + 0.03 on every seed",
             all(r["lora_vs_best"] >= 0.03 for r in means))]
  lines += [""] + verdicts(checks)
  best = [max(CONTROLS, key=lambda c: r[c]) for r in means]
  lines.append(f"{'measured':<14} best control per seed: {', '.join(best)}; lora - best control = "
               f"{mean_sd([r['lora_vs_best'] for r in means])}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="the tools/seeds.py workdir (with seed_K/ folders)")
  args = p.parse_args(argv)
  means, gains, names = seed_rows(args.workdir)
  publish(args.workdir, "visft_report.txt", report(means, gains, names, in_domain(args.workdir)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
