"""tools/seeds.py: a recipe over several seeds, per-seed tables and mean ± sd; `seed` config
args and data.split_seed."""
import json
import math
import os
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import seeds as seeds_tool  # noqa: E402


def test_summary_is_mean_and_sample_sd_per_row_and_metric():
  per_seed = {
      0: {"pre": {"eval_after": {"loss": 2.0}}, "ft": {"eval_before": {"loss": 5.0, "acc": 0.1},
                                                      "eval_after": {"loss": 1.0, "acc": 0.5}}},
      1: {"pre": {"eval_after": {"loss": 4.0}}, "ft": {"eval_before": {"loss": 7.0, "acc": 0.3},
                                                      "eval_after": {"loss": 3.0, "acc": 0.7}}},
  }
  s = seeds_tool.summarise(per_seed)
  assert list(s) == ["pre", "ft @start", "ft"]  # the recipe table's rows
  assert s["ft"]["acc"]["mean"] == pytest.approx(0.6) and s["ft"]["acc"]["sd"] == pytest.approx(math.sqrt(0.02))
  assert s["ft"]["acc"]["se"] == pytest.approx(0.1) and s["ft"]["acc"]["n"] == 2
  assert s["ft @start"]["loss"]["values"] == [5.0, 7.0]
  text = seeds_tool.format_table(s, [0, 1])
  assert "0.6000 ± 0.1414" in text and "ft @start" in text


def test_seeded_config_replaces_the_seed_arg():
  assert seeds_tool.seeded_config("configs/x.py", 2) == "configs/x.py:seed=2"
  assert seeds_tool.seeded_config("configs/x.py:scale=0.1,seed=5", 1) == "configs/x.py:scale=0.1,seed=1"


def test_reuse_from_gives_each_seed_its_own_earlier_run(tmp_path, monkeypatch):
  calls = []

  def fake_run(cmd, cwd):
    calls.append(cmd)
    out = cmd[cmd.index("--workdir") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
      json.dump({"sft": {"eval_after": {"error": 0.5}}}, f)
    return type("Done", (), {"returncode": 0})()

  monkeypatch.setattr(seeds_tool.subprocess, "run", fake_run)
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
  for seed in (0, 1):  # w0 ran seeds 0 and 1; seed 2 has nothing to reuse
    (tmp_path / "w0" / f"seed_{seed}").mkdir(parents=True)
    (tmp_path / "w0" / f"seed_{seed}" / "config.json").write_text("{}")
  assert seeds_tool.main(["--config", "configs/x.py", "--seeds", "3", "--workdir", str(tmp_path / "w1"),
                          "--reuse_from", str(tmp_path / "w0"), "--", "--config.steps=3"]) == 0
  for seed, cmd in enumerate(calls[:2]):
    assert cmd[-2:] == [f"--config.reuse_from={tmp_path / 'w0' / f'seed_{seed}'}", "--config.steps=3"]
  assert not any(a.startswith("--config.reuse_from") for a in calls[2])
  for cmd in calls:  # every seed compiles into one cache
    assert f"--compile_cache={tmp_path / 'w1' / 'compile_cache'}" in cmd
  with pytest.raises(SystemExit):
    seeds_tool.main(["--config", "configs/x.py", "--workdir", str(tmp_path / "w2"), "--reuse_from", "/nowhere"])


def test_split_seed_draws_other_generated_sets():
  from mmjax.data import catalog
  from helpers import tiny_config
  c = tiny_config()
  a = catalog.open_source(c.data, "eval")
  c.data.split_seed = 1
  b = catalog.open_source(c.data, "eval")
  assert [a[i] for i in range(8)] != [b[i] for i in range(8)]
  c.data.split_seed = 0
  assert [catalog.open_source(c.data, "eval")[i] for i in range(8)] == [a[i] for i in range(8)]


def _fake_errordriven_seed(root, seed, student, errors, random_, full, on_missing):
  d = root / f"seed_{seed}"
  results = {name: {"eval_after": {"gen_answer_match": v}} for name, v in
             (("student", student), ("errors_30", 0.0), ("random_30", 0.0), ("errors_300", errors),
              ("random_300", random_), ("full", full))}
  for b in (30, 300):
    (d / "stages" / f"errors_{b}").mkdir(parents=True)
    (d / "stages" / f"errors_{b}" / "selection.json").write_text(
        json.dumps({"indices": [], "meta": {"on_missing_skill": on_missing}}))
  (d / "results.json").write_text(json.dumps(results))


def test_errordriven_report_checks_each_target_per_seed(tmp_path):
  import errordriven_report as report_tool
  _fake_errordriven_seed(tmp_path, 0, 0.40, 0.60, 0.45, 0.62, 0.9)
  _fake_errordriven_seed(tmp_path, 1, 0.42, 0.58, 0.50, 0.60, 0.8)
  rows = report_tool.seed_rows(str(tmp_path), "gen_answer_match", None)
  assert [r["budget"] for r in rows] == [300, 300]  # the largest budget by default
  assert rows[0]["errors_minus_random"] == pytest.approx(0.15) and rows[1]["headroom"] == pytest.approx(0.18)
  text = report_tool.report(rows, "gen_answer_match")
  assert "holds          headroom" in text and "holds          share of full" in text
  assert "does not hold  beats random" in text  # seed 1: 0.08 < 0.10
  assert "holds          on target" in text and "0.5900 ± 0.0141" in text
  assert report_tool.main(["--workdir", str(tmp_path), "--budget", "30"]) == 0
  assert "budget 30" in (tmp_path / "errordriven_report.txt").read_text()
  with pytest.raises(SystemExit, match="--budget=7 is not a budget"):
    report_tool.seed_rows(str(tmp_path), "gen_answer_match", 7)


def _fake_directed_seed(root, seed, **errors):
  d = root / f"seed_{seed}"
  d.mkdir(parents=True)
  (d / "results.json").write_text(json.dumps({arm: {"eval_after": {"error": v}} for arm, v in errors.items()}))


def test_directed_report_checks_each_target_per_seed(tmp_path):
  import directed_report as report_tool
  _fake_directed_seed(tmp_path, 0, pretrain=1.2, full=0.40, small=0.60, directed=0.44, joint=0.50)
  _fake_directed_seed(tmp_path, 1, pretrain=1.1, full=0.42, small=0.50, directed=0.45, joint=0.41)
  rows = report_tool.seed_rows(str(tmp_path), "error")
  assert rows[0]["small_minus_directed"] == pytest.approx(0.16) and rows[1]["headroom"] == pytest.approx(0.68)
  text = report_tool.report(rows, "error")
  assert "holds          headroom" in text and "holds          near full" in text
  assert "does not hold  beats small" in text  # seed 1: 0.05 < 0.10
  assert "directed - joint = -0.0100 ± 0.0707" in text
  assert report_tool.main(["--workdir", str(tmp_path)]) == 0
  assert "2 seeds" in (tmp_path / "directed_report.txt").read_text()
  with pytest.raises(SystemExit, match="no micro_x for stage 'pretrain'"):
    report_tool.seed_rows(str(tmp_path), "micro_x")
  with pytest.raises(SystemExit, match="no seed_K/results.json"):
    report_tool.seed_rows(str(tmp_path / "empty"), "error")


def test_claims_table_cells_never_run_together():
  from mmjax.recipes.claims import table
  rows = [dict(seed=0, heads=0.5719, lora=0.61), dict(seed=1, heads=0.5984, lora=0.66)]
  lines = table("probe mean", rows, ("heads", "lora"), width=8)  # "0.5852 ± 0.0187" is wider than 8
  assert lines[0] == "probe mean" and lines[1].split() == ["seed", "heads", "lora"]
  assert lines[2].split() == ["0", "0.5719", "0.6100"]
  assert lines[-1].split() == ["mean", "0.5852", "±", "0.0187", "0.6350", "±", "0.0354"]
  assert len({len(line) for line in lines[1:]}) == 1  # aligned
