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
  # a restart finds both stages done and trains nothing
  again = run_main(["--config", "configs/shapes_vlm.py:scale=0.02,eval=4", "--config.sample_eval.max_new_tokens=24",
                    "--config.stages.finetune.sample_eval.max_new_tokens=24", "--workdir", str(tmp_path)])
  assert again.returncode == 0 and "step 1/" not in again.stdout
