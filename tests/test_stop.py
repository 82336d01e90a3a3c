"""The stop rule of a recipe's rounds (`config.stop`, mmjax/recipes/stop.py): a round whose
held-out validation metric degrades beyond the margin is rejected and ends the rounds."""
import json

import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from mmjax.config import core, schema
from mmjax.data.tokenizer import load_tokenizer
from mmjax.evals import generation
from mmjax.recipes import stages
from mmjax.recipes import stop as stop_lib

from helpers import tiny_config

ROUNDS = ("r1", "r2", "r3")


def _recipe(margin=0.05, val=16):
  """base -> r1 -> r2 -> r3 (the watched rounds, each a fresh adapter on the previous one
  merged) -> after (from r3, as rebirth distils from dpo_R); 8 test records, then validation."""
  c = tiny_config(steps=2)
  c.seq_len = 48  # the prompts and 6 new tokens
  c.data.num_eval_examples = 8 + val + 8
  c.sample_eval.update(num_examples=8, max_new_tokens=6)
  c.eval_at_start = False
  lora = {"trainable": ("lora/.*",)}
  c.stage_order = ("base", *ROUNDS, "after")
  c.stages = ml_collections.ConfigDict({"base": {"trainable": ("params/.*",), "lora": {"targets": ""}},
                                        **{r: dict(lora) for r in ROUNDS}, "after": dict(lora)})
  c.stop.update(stages=ROUNDS, baseline="base", metric="gen_exact_match", margin=margin, val_examples=val)
  return c


def _flat(params):
  return traverse_util.flatten_dict(params, sep="/")


def test_degraded_is_worse_by_more_than_the_margin():
  assert not stop_lib.degraded(0.60, 0.62, 0.02) and stop_lib.degraded(0.59, 0.62, 0.02)
  assert not stop_lib.degraded(0.70, 0.62, 0.02)  # better is never degraded
  assert stop_lib.degraded(0.70, 0.62, 0.05, lower_is_better=True)
  assert not stop_lib.degraded(0.55, 0.62, 0.0, lower_is_better=True)


def test_the_first_degrading_round_is_rejected_and_the_later_ones_skipped():
  rule = stop_lib.Rule(_recipe().stop)
  assert rule.watches("base") and rule.watches("r2") and not rule.watches("after")
  rule.record("base", 0.50, None)
  rule.record("r1", 0.47, "base")  # within the margin: kept
  assert rule.fired is None and rule.kept("r1") is None and not rule.skips("r2")
  rule.record("r2", 0.40, "r1")  # 0.10 below: rejected, rounds end
  assert rule.fired == dict(stage="r2", kept="r1", value=0.40, baseline_value=0.50)
  assert rule.kept("r2") == rule.kept("r3") == "r1" and rule.skips("r3") and not rule.skips("r2")
  assert rule.kept("r1") is None and not rule.skips("after")
  s = rule.summary()
  assert s["kept_rounds"] == 1 and s["rounds"] == 3 and s["values"] == {"base": 0.5, "r1": 0.47, "r2": 0.4}
  assert "r2 scored 0.4000 and was rejected" in stop_lib.line(s) and "is r1's model (1 of 3 kept)" in stop_lib.line(s)
  quiet = stop_lib.Rule(_recipe().stop)
  for name, v in (("base", 0.5), ("r1", 0.5), ("r2", 0.49), ("r3", 0.6)):
    quiet.record(name, v, None)
  assert quiet.fired is None and "no round did (3 of 3 trained and kept)" in stop_lib.line(quiet.summary())


@pytest.mark.parametrize("change, message", [
    (dict(stages=("r1", "nope")), "config.stop.stages names 'nope', which is no stage"),
    (dict(stages=("r2", "r1")), "must name distinct stages in recipe order"),
    (dict(baseline="r2"), "config.stop.baseline='r2' must name a stage before 'r1'"),
    (dict(val_examples=0), "config.stop.val_examples=0 must be > 0"),
    (dict(margin=-0.1), "config.stop.margin=-0.1 must be >= 0"),
    (dict(val_examples=40), "num_eval_examples=32 must hold the test records .* stop.val_examples=40"),
])
def test_bad_stop_rules_are_one_line_errors(change, message):
  c = _recipe()
  schema.validate(c)
  c.stop.update(change)
  with pytest.raises(core.ConfigError, match=message):
    schema.validate(c)


def test_a_round_whose_adapter_is_continued_cannot_be_watched():
  c = _recipe()
  c.stages.r2.continue_adapter = True  # r2 trains on r1's adapter: r1 could not be replaced
  with pytest.raises(core.ConfigError, match="continues the adapter of 'r1'"):
    schema.validate(c)


@pytest.mark.slow
def test_validation_is_scored_on_records_apart_from_the_test_and_saved(tmp_path, monkeypatch):
  """With a margin no round can exceed, every round runs; each watched stage's value is its
  merged model's metric on the validation records (none a test record), in done.json and the
  table's `validation` column."""
  calls, real = [], generation.evaluate_generation

  def spy(run, variables, tokenizer, records, **kw):
    calls.append((records, variables))
    return real(run, variables, tokenizer, records, **kw)

  monkeypatch.setattr(generation, "evaluate_generation", spy)
  c = _recipe(margin=1.0)
  results = stages.train_and_evaluate(c, str(tmp_path))
  cfg = core.stage_config(c, "base")
  val = generation.validation_records(cfg, 16, "config.stop.val_examples")
  test = generation.eval_records(cfg.data, 8)
  key = lambda records: [generation.content_key(r) for r in records]
  assert len(val) == 16 and not set(key(val)) & set(key(test))
  scored = [v for records, v in calls if key(records) == key(val)]  # the rule's calls (the others: the test)
  assert len(scored) == 4  # base and the three rounds
  r1 = results["r1"]
  r1_final = _flat(r1["run"].merged_params(r1["state"]))
  for k, v in _flat(scored[1]["params"]).items():  # r1 is scored with its adapter merged
    np.testing.assert_array_equal(v, r1_final[k])
  metrics, _ = generation.evaluate_generation(r1["run"], {"params": r1["run"].merged_params(r1["state"])},
                                              load_tokenizer(cfg.data.tokenizer), val, max_new_tokens=6, batch=8)
  assert r1["validation"] == pytest.approx(metrics["gen_exact_match"])
  for name in ("base", *ROUNDS):
    done = json.loads((tmp_path / "stages" / name / "done.json").read_text())
    assert done["validation"] == pytest.approx(results[name]["validation"])
  assert results["after"].get("validation") is None
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["_stop"]["fired"] is None and saved["_stop"]["kept_rounds"] == 3
  text = (tmp_path / "results.txt").read_text()
  assert "validation" in text.splitlines()[0] and "no round did (3 of 3 trained and kept)" in text


def test_a_rejected_round_hands_on_the_model_it_started_from_and_a_restart_agrees(tmp_path, monkeypatch):
  """Scripted validation values: r2 degrades, so r3 is not trained and 'after' starts from r1's
  model; r2 keeps its own row. A restart reads the saved values and decides the same."""
  values = {"base": 0.5, "r1": 0.48, "r2": 0.3}
  seen = []

  def scripted(self, cfg, run, params, tokenizer):
    name = [n for n in values if n not in self.values][0]
    seen.append(name)
    return values[name]

  monkeypatch.setattr(stop_lib.Rule, "score", scripted)
  c = _recipe(margin=0.05)
  results = stages.train_and_evaluate(c, str(tmp_path))
  assert seen == ["base", "r1", "r2"]
  assert not (tmp_path / "stages" / "r3").exists()  # not trained
  r1_final = _flat(results["r1"]["run"].merged_params(results["r1"]["state"]))
  after_base = _flat(results["after"]["state"].frozen["params"])
  for k in r1_final:  # 'after' starts from r1's model, not from the rejected r2's
    np.testing.assert_array_equal(r1_final[k], after_base[k])
  r2_final = _flat(results["r2"]["run"].merged_params(results["r2"]["state"]))
  assert any(not np.array_equal(r2_final[k], after_base[k]) for k in r2_final)
  assert results["r3"]["skipped_for"] == "r1" and results["r3"]["eval_after"] == results["r1"]["eval_after"]
  assert results["r2"]["eval_after"] != results["r1"]["eval_after"]  # r2's own (rejected) model
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["_stop"]["fired"] == dict(stage="r2", kept="r1", value=0.3, baseline_value=0.5)
  assert saved["r3"]["skipped_for"] == "r1" and saved["_stop"]["kept_rounds"] == 1
  assert "r2 scored 0.3000 and was rejected" in (tmp_path / "results.txt").read_text()

  def never(*_):
    raise AssertionError("a restart must read the saved validation values")

  monkeypatch.setattr(stop_lib.Rule, "score", never)
  again = stages.train_and_evaluate(c, str(tmp_path))
  assert again["r3"]["skipped_for"] == "r1" and again["after"]["eval_after"] == pytest.approx(
      results["after"]["eval_after"])
  assert json.loads((tmp_path / "results.json").read_text())["_stop"] == saved["_stop"]


def test_a_skipped_last_round_exports_the_kept_policy(tmp_path, monkeypatch):
  """When the rounds end the recipe and the rule skips the last one, the exported model is the
  kept policy (r1's), not missing and not the rejected r2."""
  from mmjax.convert import model_dir
  values = {"base": 0.5, "r1": 0.5, "r2": 0.1}
  monkeypatch.setattr(stop_lib.Rule, "score", lambda self, *a: values[[n for n in values if n not in self.values][0]])
  c = _recipe()
  c.stage_order = ("base", *ROUNDS)
  results = stages.train_and_evaluate(c, str(tmp_path))
  assert results["r3"]["skipped_for"] == "r1"
  _, params, lora, _ = model_dir.load(str(tmp_path / "model"))
  r1_final = _flat(results["r1"]["run"].merged_params(results["r1"]["state"]))
  assert lora is None
  for k, v in _flat(params).items():
    np.testing.assert_allclose(np.asarray(v), np.asarray(r1_final[k]), rtol=0, atol=0)
