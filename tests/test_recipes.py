"""Recipes shortened through their config args run end to end through mmjax.main."""
import json
import os

import pytest

from helpers import run_main


@pytest.mark.slow
def test_shapes_vlm_recipe_end_to_end(tmp_path):
  r = run_main(["--config", "configs/shapes_vlm.py:scale=0.02,eval=4", "--config.sample_eval.max_new_tokens=24",
                "--config.stages.finetune.sample_eval.max_new_tokens=24", "--workdir", str(tmp_path)])
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  assert set(results) == {"pretrain", "finetune"}
  after = results["finetune"]["eval_after"]
  for key in ("loss", "accuracy", "gen_exact_match", "missing", "hallucination", "repetition"):
    assert key in after, key
  assert os.path.getsize(tmp_path / "loss_curves.png") > 1000
  assert "truth:" in r.stdout and "model:" in r.stdout
  rows = [json.loads(l) for l in open(tmp_path / "stages" / "finetune" / "answers.jsonl")]  # every scored answer
  assert len(rows) == 4 and {"kind", "prompt", "truth", "answer"} <= set(rows[0])
  exact = sum(r["answer"].strip() == r["truth"].strip() for r in rows) / len(rows)
  assert exact == pytest.approx(after["gen_exact_match"])
  # a restart finds both stages done and trains nothing
  again = run_main(["--config", "configs/shapes_vlm.py:scale=0.02,eval=4", "--config.sample_eval.max_new_tokens=24",
                    "--config.stages.finetune.sample_eval.max_new_tokens=24", "--workdir", str(tmp_path)])
  assert again.returncode == 0 and "step 1/" not in again.stdout


@pytest.mark.slow
def test_shapes_errordriven_recipe_two_seeds_end_to_end(tmp_path):
  """The shortened recipe, two seeds through tools/seeds.py: tables per seed and mean ± sd
  (each seed's run seed; a rerun skips finished seeds), exact budgets, the gap profile from first wrong steps, and a selection that the standalone
  CLI recomputes identically from the finished student."""
  from helpers import ROOT, subprocess_env
  import subprocess
  import sys
  from mmjax.select import retrieve
  spec = "configs/shapes_errordriven.py:scale=0.02,budgets=24,pool=96,val=8,eval=4,epochs=1"
  cmd = [sys.executable, "tools/seeds.py", "--config", spec, "--seeds", "2", "--workdir", str(tmp_path)]
  r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((tmp_path / "seeds.json").read_text())
  assert summary["seeds"] == [0, 1] and "±" in (tmp_path / "seeds.txt").read_text()
  assert summary["rows"]["errors_24"]["gen_answer_match"]["n"] == 2
  again = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0 and "seed 0:" not in again.stdout  # finished seeds are not run again
  chosen = []
  for k in (0, 1):
    wd = tmp_path / f"seed_{k}"
    assert json.loads((wd / "config.json").read_text())["seed"] == k
    results = json.load(open(wd / "results.json"))
    assert set(results) == {"student", "errors_24", "random_24", "full", "_headroom"}
    h = results["_headroom"]
    assert h["metric"] == "gen_answer_match" and h["floor"] == "student" and h["ceiling"] == "full"
    want = (results["full"]["eval_after"]["gen_answer_match"]
            - results["student"]["eval_after"]["gen_answer_match"])
    assert abs(h["value"] - want) < 1e-9 and h["valid"] == (want >= 0.15)
    assert "headroom gen_answer_match: full" in (wd / "results.txt").read_text()
    for name, n in (("errors_24", 24), ("random_24", 24), ("full", 96)):
      idx, meta = retrieve.read_selection(wd / "stages" / name / "selection.json")
      assert len(idx) == n == len(set(idx.tolist())) and meta["pool"] == 96
    idx, meta = retrieve.read_selection(wd / "stages" / "errors_24" / "selection.json")
    assert meta["errors"] > 0 and abs(sum(meta["profile"].values()) - 1) < 1e-6
    assert sum(meta["first_wrong_steps"].values()) == meta["errors"] and 0 <= meta["on_missing_skill"] <= 1
    chosen.append(idx.tolist())
  assert chosen[0] != chosen[1]  # another seed: another student, pool and selection
  # the claims report reads the runs (and each seed's pool through its config.json)
  report = subprocess.run([sys.executable, "tools/errordriven_report.py", "--workdir", str(tmp_path)], cwd=ROOT,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  assert "asks_missing_skill" in report.stdout and "budget 24 (2 seeds)" in report.stdout
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import errordriven_report
  rows = errordriven_report.seed_rows(str(tmp_path), "gen_answer_match", None)
  assert all(0 <= r["asks_missing_skill"] <= 1 for r in rows)  # read from each seed's own pool
  # selection is deterministic: the standalone CLI computes the same one from the finished student
  out = tmp_path / "again.json"
  cli = subprocess.run([sys.executable, "tools/select_data.py", "--config", spec + ",seed=0", "--workdir",
                        str(tmp_path / "seed_0"), "--stage", "errors_24", "--out", str(out)],
                       cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert cli.returncode == 0, cli.stderr[-3000:]
  assert retrieve.read_selection(out)[0].tolist() == chosen[0]


@pytest.mark.slow
def test_shapes_errordriven_with_the_model_teacher(tmp_path):
  """teacher=model: a longer-trained `teacher` stage answers each failed validation question
  itself; the student's first step that leaves the teacher's answer names the skills (this
  short a teacher may explain none: mix=0.5 then retrieves by image features alone)."""
  from mmjax.select import retrieve
  r = run_main(["--config", "configs/shapes_errordriven.py:scale=0.02,budgets=24,pool=96,val=16,eval=4,epochs=1,"
                "teacher=model,mix=0.5", "--workdir", str(tmp_path)])
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.load(open(tmp_path / "results.json"))
  assert {"student", "teacher", "errors_24", "random_24", "full"} <= set(results)
  _, meta = retrieve.read_selection(tmp_path / "stages" / "errors_24" / "selection.json")
  assert meta["teacher"] == "model" and meta["errors"] > 0
  assert sum(meta["first_wrong_steps"].values()) == meta["errors"]
  assert set(meta["first_wrong_steps"]) <= {"locate", "read", "answer"}
