"""Recipes as stage lists: each stage starts from the previous one's merged result, and a
restarted recipe skips finished stages."""
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from mmjax.config import core, schema
from mmjax.config.core import stage_config
from mmjax.recipes import results as results_lib, stages

from helpers import tiny_config


def _recipe(steps=3):
  c = tiny_config(steps=steps)
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.stage_order = ("pretrain", "finetune")
  c.stages = ml_collections.ConfigDict({
      "pretrain": {"trainable": ("params/.*",), "lora": {"targets": ""}, "data": {"task": "copy"}},
      "finetune": {"trainable": ("lora/.*",), "optimizer": {"lr": 3e-3}},
  })
  return c


def test_stage_config_applies_overrides():
  c = _recipe()
  s = stage_config(c, "pretrain")
  assert s.lora.targets == "" and s.data.task == "copy" and s.trainable == ("params/.*",)
  assert stage_config(c, "finetune").optimizer.lr == 3e-3
  schema.validate(c, n_devices=8)


def test_stage_validation_names_the_stage():
  c = _recipe()
  c.stages.finetune.trainable = ("nothing",)
  c.stages.pretrain.optimizer = ml_collections.ConfigDict({"schedule": "bogus"})
  with pytest.raises(core.ConfigError, match="stage 'pretrain': config.optimizer.schedule='bogus'"):
    schema.validate(c, n_devices=8)
  c = _recipe()
  c.stage_order = ("pretrain", "nope")
  with pytest.raises(core.ConfigError, match="names 'nope', which config.stages does not define"):
    schema.validate(c, n_devices=8)


def test_two_stage_recipe_chains_and_resumes(tmp_path):
  c = _recipe()
  results = stages.train_and_evaluate(c, str(tmp_path))
  pre, fine = results["pretrain"], results["finetune"]
  pre_final = traverse_util.flatten_dict(pre["run"].merged_params(pre["state"]), sep="/")
  fine_frozen = traverse_util.flatten_dict(fine["state"].frozen["params"], sep="/")
  assert pre_final.keys() == fine_frozen.keys()
  for k in pre_final:  # the second stage's frozen base is exactly the first stage's result
    np.testing.assert_array_equal(pre_final[k], fine_frozen[k])
  assert "lora" in fine["state"].trainable and "params" in pre["state"].trainable
  assert (tmp_path / "stages" / "pretrain" / "done.json").exists()
  # a restart skips both finished stages and reports the same metrics
  again = stages.train_and_evaluate(c, str(tmp_path))
  assert again["finetune"]["eval_after"] == pytest.approx(fine["eval_after"])


def test_table_shows_a_start_row_only_for_new_starting_points():
  a, b, c = {"missing": 0.0}, {"missing": 1.0}, {"missing": 0.4}
  results = {"pretrain": dict(eval_before=b, eval_after=a),  # first stage: no start row
             "directed": dict(eval_before=a, eval_after=c),  # starts where pretrain ended: no start row
             "joint": dict(eval_before={"missing": 0.9}, eval_after=c)}
  rows = results_lib.table(results).splitlines()
  assert [r.split()[0] + (" " + r.split()[1] if "@start" in r else "") for r in rows[1:]] == \
      ["pretrain", "directed", "joint @start", "joint"]
  results["directed"]["eval_before"] = b  # a new eval task (not in any row above): a start row
  assert "directed @start" in results_lib.table(results)
  results["joint"]["eval_before"] = b  # the same start as directed: shown once
  assert "joint @start" not in results_lib.table(results)
  # a DPO round scores fewer keys than the SFT stage before it; equal on the shared ones: no start row
  rows = results_lib.table({"sft": dict(eval_before=b, eval_after={"missing": 0.3, "loss": 1.0}),
                        "dpo_1": dict(eval_before={"missing": 0.3}, eval_after={"missing": 0.2})})
  assert "@start" not in rows


def test_headroom_check_marks_a_table_without_room_invalid():
  import ml_collections
  check = ml_collections.ConfigDict(dict(metric="acc", floor="student", ceiling="full", min=0.15))
  results = {"student": {"eval_after": {"acc": 0.445}}, "full": {"eval_after": {"acc": 0.453}}}
  h = results_lib.headroom(results, check)
  assert h["value"] == pytest.approx(0.008) and not h["valid"]
  assert "INVALID" in results_lib.headroom_line(h) and "+0.0080" in results_lib.headroom_line(h)
  results["full"]["eval_after"]["acc"] = 0.7
  assert results_lib.headroom(results, check)["valid"]
  assert "valid" in results_lib.headroom_line(results_lib.headroom(results, check))
  assert results_lib.headroom(results, ml_collections.ConfigDict(dict(metric=""))) is None
  # results.json's _headroom entry is not a stage of the table
  assert [label for label, _ in results_lib.table_rows({**results, "_headroom": h})] == ["student", "full"]
  # an error rate: the ceiling must be lower than the floor by `min`
  check.update(metric="error", lower_is_better=True)
  errors = {"student": {"eval_after": {"error": 0.9}}, "full": {"eval_after": {"error": 0.6}}}
  h = results_lib.headroom(errors, check)
  assert h["value"] == pytest.approx(0.3) and h["valid"] and "error (lower is better): full +0.3000" in \
      results_lib.headroom_line(h)
  errors["full"]["eval_after"]["error"] = 0.8
  assert not results_lib.headroom(errors, check)["valid"]


def test_eval_key_ignores_what_only_training_reads():
  """Arms of a recipe that start from one stage and evaluate alike share one step-0 evaluation."""
  c = tiny_config()
  key = stages.eval_key("pretrain", c)
  for dotted, value in (("data.num_train_examples", 7), ("data.indices_path", "/x.json"), ("steps", 9),
                        ("lora.rank", 2), ("optimizer.lr", 0.5), ("trainable", ("params/.*",))):
    assert stages.eval_key("pretrain", core.derive(c, {dotted: value})) == key, dotted
  for dotted, value in (("data.num_eval_examples", 7), ("sample_eval.max_new_tokens", 3), ("seq_len", 32),
                        ("model.n_layers", 3)):
    assert stages.eval_key("pretrain", core.derive(c, {dotted: value})) != key, dotted
  assert stages.eval_key("other", c) != key


def test_headroom_stages_must_exist():
  c = tiny_config(stage_order=("a", "b"))
  c.stages = ml_collections.ConfigDict({"a": {"steps": 1}, "b": {"steps": 1}})
  c.headroom.update(metric="loss", floor="a", ceiling="nope")
  with pytest.raises(core.ConfigError, match="config.headroom.ceiling='nope' names no stage"):
    schema.validate(c, 1)


def _write_config(workdir, c):
  from mmjax.main import write_config
  workdir.mkdir(parents=True, exist_ok=True)
  write_config(str(workdir), c)


def test_reuse_inputs_are_what_each_stage_kind_reads():
  """A stage is reused only with every stage it reads: its start, the stage rebirth distils
  and the model teacher of a selection (each named by its kind's `reads`)."""
  from mmjax.recipes import registry, reuse
  c = tiny_config()
  plain = core.derive(c, init_from_stage="")
  rebirth = core.derive(c, init_from_stage="init", distill_from_stage="dpo_3", distill_examples=4)
  teacher = core.derive(c, {"select.method": "errors", "select.teacher": "model", "select.teacher_stage": "big"},
                        init_from_stage="sft")
  facts = core.derive(teacher, {"select.teacher": "facts"})
  for cfg, prev, want in ((plain, "sft", {"sft"}), (plain, None, set()), (rebirth, "dpo_3", {"dpo_3"}),
                          (teacher, "x", {"sft", "big"}), (facts, "x", {"sft"})):
    assert reuse.inputs(cfg, prev, registry.kinds_for(cfg)) == want
  assert reuse.inputs(rebirth, "x", ()) == set()  # without its kinds, nothing names what it distils


def test_reuse_copies_the_finished_stages_a_run_shares(tmp_path, capsys):
  """config.reuse_from: a stage another workdir finished with the same stage config is copied
  (not trained), a changed one is trained, and so is a later stage reading a trained one."""
  from mmjax.recipes import reuse
  first, second, third = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  c = _recipe()
  _write_config(first, c)
  done = stages.train_and_evaluate(c, str(first))
  other = core.derive(c, {"stages.finetune.optimizer.lr": 1e-3, "dpo.beta": 0.5},  # dpo: unused by both
                      reuse_from=str(first))
  _write_config(second, other)
  got = stages.train_and_evaluate(other, str(second))
  log = capsys.readouterr().out
  assert "[pretrain] reused from" in log and "[finetune] not reused" in log and "'optimizer.lr'" in log
  assert (second / "stages" / "pretrain" / reuse.MARK).exists()
  assert not (second / "stages" / "finetune" / reuse.MARK).exists()
  assert got["pretrain"]["eval_after"] == pytest.approx(done["pretrain"]["eval_after"])
  assert "state" not in got["pretrain"] and "state" in got["finetune"]  # loaded, and trained
  pre = traverse_util.flatten_dict(done["pretrain"]["run"].merged_params(done["pretrain"]["state"]), sep="/")
  base = traverse_util.flatten_dict(got["finetune"]["state"].frozen["params"], sep="/")
  for k in pre:  # the trained stage starts from the copied one
    np.testing.assert_array_equal(pre[k], base[k])
  # from the second run: pretrain (a copy) is copied on; a changed pretrain makes finetune train too
  changed = core.derive(c, reuse_from=str(second))
  changed.stages.pretrain.optimizer = ml_collections.ConfigDict({"lr": 5e-3})
  r = reuse.Reuse(changed, str(third))
  assert not r.bring(changed, "pretrain", None, str(third / "stages" / "pretrain"), ())
  assert not r.bring(changed, "finetune", "pretrain", str(third / "stages" / "finetune"), ())
  log = capsys.readouterr().out
  assert "[pretrain] not reused" in log and "'optimizer.lr'" in log and "reads 'pretrain'" in log
  assert not (third / "stages").exists()
  again = reuse.Reuse(other, str(second))  # a rerun knows its copied stages
  assert again.bring(other, "pretrain", None, str(second / "stages" / "pretrain"), ())
  assert not again.bring(other, "finetune", "pretrain", str(second / "stages" / "finetune"), ())
  with pytest.raises(core.ConfigError, match=r"config.reuse_from=.* is this run's own workdir"):
    reuse.Reuse(other, str(first))
  for bad in (lambda: schema.validate(core.derive(c, reuse_from="/nowhere"), n_devices=8, files=True),
              lambda: reuse.Reuse(core.derive(c, reuse_from="/nowhere"), str(third))):
    with pytest.raises(core.ConfigError, match=r"config.reuse_from='/nowhere' is not the workdir of a run"):
      bad()
