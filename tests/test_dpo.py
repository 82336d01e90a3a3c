"""DPO objective, rolling reference, pairs data and multi-round recipes."""
import gc
import json
import math
import os

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from mmjax import sharding
from mmjax.config import core, schema
from mmjax.data import pairs as pairs_lib
from mmjax.data.tokenizer import load_tokenizer
from mmjax.recipes import pairs as recipe_pairs, stages
from mmjax.train import loop
from mmjax.train import run as run_lib

from helpers import tiny_config

TOK = load_tokenizer("builtin")


def _pairs_file(path, n=12, **extra):
  recs = [dict({"prompt": f"reverse ab{i} =", "chosen": f"{i}ba", "rejected": f"ab{i}x",
                "ground_truth": f"{i}ba"}, **extra) for i in range(n)]
  pairs_lib.write_pairs(str(path), recs)
  return str(path)


def _dpo_config(path, **overrides):
  c = tiny_config(objective="dpo", batch_size=4, **overrides)
  c.model.vocab_size = -1
  c.data.update(source="jsonl", train_path=path)
  return c


def _setup(c):
  schema.validate(c, 1)
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  run = run_lib.build(c, mesh, TOK)
  it = pairs_lib.make_train_iterator(c.data.train_path, c, tokenizer=TOK, gt=c.dpo.gt_weight > 0,
                                     need_ref=c.dpo.reference == "precomputed")
  return mesh, run, it


def test_round_boundary_merge_and_reset(tmp_path):
  """adapter_base reference == the merged-and-reset model; after the boundary the policy's
  outputs are unchanged and the next step's sigmoid loss is log 2."""
  c = _dpo_config(_pairs_file(tmp_path / "p.jsonl"), **{"optimizer.lr": 3e-2, "optimizer.warmup_steps": 0})
  c.dpo.gt_weight = 0.5
  mesh, run, it = _setup(c)
  obj = run.objective
  logps, ref_logps = jax.jit(obj.sequence_logps), jax.jit(obj.reference_logps)
  batches = [run.global_batch(next(it)) for _ in range(4)]
  with jax.set_mesh(mesh):
    state = run.init_state(jax.random.key(0))
    for b in batches[:3]:
      state, m = run.train_step(state, b, jax.random.key(1))
    b = batches[3]
    policy = jax.device_get(logps(state.variables, b))
    ref = jax.device_get(ref_logps(state.variables, b))
    assert np.abs(policy[0] - ref[0]).max() > 1e-3  # the adapter moved the policy off its reference
    # A round boundary: merge the adapter into the base, start a fresh one.
    merged = run.merged_params(state)
    nxt = run.init_from_params(jax.random.key(7), merged)
    new_lora = traverse_util.flatten_dict(nxt.trainable["lora"], sep="/")
    assert all(np.all(np.asarray(v) == 0) for k, v in new_lora.items() if k.endswith("/b"))
    new_ref = jax.device_get(ref_logps(nxt.variables, b))
    new_policy = jax.device_get(logps(nxt.variables, b))
    merged_reset = jax.device_get(logps({"params": merged}, b))
    for x, y in ((new_ref, merged_reset), (new_policy, merged_reset), (new_policy, policy)):
      np.testing.assert_allclose(x[0], y[0], rtol=1e-5, atol=1e-4)
      np.testing.assert_allclose(x[1], y[1], rtol=1e-5, atol=1e-4)
    _, m = run.train_step(nxt, b, jax.random.key(1))
  assert abs(float(m["dpo_loss"]) - math.log(2)) < 1e-5
  assert abs(float(m["kl"])) < 1e-4 and abs(float(m["reward_margin"])) < 1e-5
  assert float(m["loss"]) > float(m["dpo_loss"])  # plus the ground-truth term


@pytest.mark.slow
def test_dpo_step_matches_dpo_loss_and_precomputed_reference(tmp_path):
  """The step's loss equals losses.dpo_loss on separately computed log-probs, and a
  precomputed reference (stored with the pairs) gives the same step as adapter_base."""
  from mmjax import losses
  path = _pairs_file(tmp_path / "p.jsonl")
  c = _dpo_config(path, **{"optimizer.lr": 3e-2, "optimizer.warmup_steps": 0})
  mesh, run, it = _setup(c)
  b = run.global_batch(next(it))
  with jax.set_mesh(mesh):
    state = run.init_state(jax.random.key(0))
    state, _ = run.train_step(state, b, jax.random.key(1))  # adapter moves: policy != reference
    pc, pr = jax.jit(run.objective.sequence_logps)(state.variables, b)
    rc, rr = jax.jit(run.objective.reference_logps)(state.variables, b)
    want, _, _ = losses.dpo_loss(pc, pr, rc, rr, beta=c.dpo.beta)
    sums = run.eval_step(state, b)
    assert float(sums["loss"]) / float(sums["normaliser"]) == pytest.approx(float(np.mean(want)), rel=1e-5)
    # precomputed: the same reference values read from the pairs file
    recs = recipe_pairs.precompute_reference(run, {"params": state.variables["params"]}, pairs_lib.read_pairs(path),
                                    TOK, batch=4)
  pre_path = str(tmp_path / "pre.jsonl")
  pairs_lib.write_pairs(pre_path, recs)
  c2 = _dpo_config(pre_path)
  c2.dpo.reference = "precomputed"
  _, run2, it2 = _setup(c2)
  b2 = run2.global_batch(next(it2))
  np.testing.assert_allclose(np.asarray(b2["ref_chosen_logps"])[:, 0], rc, rtol=1e-5)
  with jax.set_mesh(mesh):
    sums2 = run2.eval_step(state, b2)
  assert float(sums2["loss"]) == pytest.approx(float(sums["loss"]), rel=1e-5)


def test_lora_dpo_keeps_one_copy_of_the_base_weights(tmp_path):
  c = _dpo_config(_pairs_file(tmp_path / "p.jsonl"))
  c.model.update(d_model=192, n_layers=3, mlp_dim=512, n_heads=4, n_kv_heads=2, head_dim=48)
  mesh, run, it = _setup(c)
  base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(run.abstract_params))
  b = run.global_batch(next(it))
  gc.collect()
  before = sum(a.nbytes for a in jax.live_arrays())
  with jax.set_mesh(mesh):
    state = run.init_state(jax.random.key(0))
    for _ in range(2):
      state, m = run.train_step(state, b, jax.random.key(1))
    jax.block_until_ready(m)
  gc.collect()
  live = sum(a.nbytes for a in jax.live_arrays()) - before
  extra = live - base_bytes  # adapter + its Adam moments + metrics
  adapter = sum(x.nbytes for x in jax.tree.leaves(state.trainable))
  assert base_bytes <= live < 1.5 * base_bytes, (live, base_bytes)
  assert extra <= 3 * adapter + 4096, (extra, adapter)


def test_bad_pairs_are_one_line_errors(tmp_path):
  c = _dpo_config("unused")
  p = tmp_path / "empty.jsonl"
  p.write_text(json.dumps({"prompt": "copy ab =", "chosen": "ab", "rejected": "ba"}) + "\n"
               + json.dumps({"prompt": "copy cd =", "chosen": "cd", "rejected": "  "}) + "\n")
  with pytest.raises(pairs_lib.PairsError, match=rf"^{p}:2: the rejected response is empty$"):
    pairs_lib.make_train_iterator(str(p), c, tokenizer=TOK)
  p = tmp_path / "long.jsonl"
  p.write_text(json.dumps({"prompt": "copy " + "x" * 40 + " =", "chosen": "ab", "rejected": "ba"}) + "\n")
  with pytest.raises(pairs_lib.PairsError, match=rf"^{p}:1: the prompt has \d+ tokens .* seq_len=16"):
    pairs_lib.make_train_iterator(str(p), c, tokenizer=TOK)
  p = tmp_path / "nogt.jsonl"
  p.write_text(json.dumps({"prompt": "copy ab =", "chosen": "ab", "rejected": "ba"}) + "\n")
  with pytest.raises(pairs_lib.PairsError, match="needs a 'ground_truth' response"):
    pairs_lib.make_train_iterator(str(p), c, tokenizer=TOK, gt=True)
  for e in [pairs_lib.PairsError("x")]:
    assert "\n" not in str(e)
  c.dpo.reference = "adapter_base"
  c.lora.targets = ""
  c.trainable = ("params/.*",)
  with pytest.raises(core.ConfigError, match="reference='adapter_base' needs an adapter"):
    schema.validate(c, 1)


def _online_recipe(dpo_steps=6, scorer="edit_distance"):
  c = tiny_config(steps=2, seq_len=24)
  c.model.vocab_size = -1
  c.mesh.update(data=1, fsdp=-1)  # the 8 test devices
  c.data.update(task="copy", num_eval_examples=8)
  c.sample_eval.update(num_examples=8, max_new_tokens=8, show=0)
  c.dpo.update(online=True, num_prompts=8, num_candidates=3, temperature=1.0, max_new_tokens=8, scorer=scorer,
               gt_weight=0.5)
  c.stage_order = ("sft", "dpo_1")
  c.stages = ml_collections.ConfigDict({
      "sft": {"trainable": ("params/.*",), "lora": {"targets": ""}},
      "dpo_1": {"objective": "dpo", "steps": dpo_steps, "batch_size": 8, "checkpoint_every": 2,
                "optimizer": {"lr": 1e-2, "warmup_steps": 0}},
  })
  return c


def _dpo_losses(workdir):
  rows = {}
  for line in open(os.path.join(workdir, "stages", "dpo_1", "metrics.jsonl")):
    r = json.loads(line)
    if r["split"] == "train":
      rows[r["step"]] = r["loss"]
  return rows


@pytest.mark.slow
def test_online_round_resumes_mid_round_exactly(tmp_path, monkeypatch, capsys):
  c = _online_recipe()
  schema.validate(c, 1)
  ref = stages.train_and_evaluate(c, str(tmp_path / "ref"))
  assert ref["dpo_1"]["eval_after"]  # generation metrics after the round
  pairs = pairs_lib.read_pairs(str(tmp_path / "ref" / "stages" / "dpo_1" / "pairs.jsonl"))
  assert pairs and all(p["scores"]["chosen"] < p["scores"]["rejected"] for p in pairs)
  assert all({"id", "index", "prompt", "chosen", "rejected", "ground_truth"} <= set(p) for p in pairs)
  out = capsys.readouterr().out
  assert "first_dpo_loss" in out
  first = json.load(open(tmp_path / "ref" / "results.json"))["dpo_1"]["first_dpo_loss"]
  assert abs(first - math.log(2)) < 1e-5

  calls = {"n": 0}

  def stop_after_three(self):
    calls["n"] += 1
    return calls["n"] == 5  # once per step: sft's 2, then dpo_1's third

  monkeypatch.setattr(loop._StopFlag, "requested", stop_after_three)
  cut = stages.train_and_evaluate(c, str(tmp_path / "cut"))
  assert cut["dpo_1"]["preempted"]
  monkeypatch.undo()
  written = open(tmp_path / "cut" / "stages" / "dpo_1" / "pairs.jsonl").read()
  again = stages.train_and_evaluate(c, str(tmp_path / "cut"))
  assert again["dpo_1"]["start_step"] == 3
  assert open(tmp_path / "cut" / "stages" / "dpo_1" / "pairs.jsonl").read() == written  # reused, not resampled
  assert _dpo_losses(tmp_path / "cut") == _dpo_losses(tmp_path / "ref")  # bitwise, every step


def test_all_tie_round_stops_before_training(tmp_path):
  c = _online_recipe(scorer="exact_match")  # an untrained model never answers exactly: all ties
  c.stages.sft.steps = 1
  with pytest.raises(recipe_pairs.AllTiesError, match=r"stage 'dpo_1': all 8 prompts gave 3 candidates with equal "
                                             r"exact_match scores.*raise config.dpo.temperature"):
    stages.train_and_evaluate(c, str(tmp_path))
  assert not os.path.exists(tmp_path / "stages" / "dpo_1" / "checkpoints" / "1")
  assert not os.path.exists(tmp_path / "stages" / "dpo_1" / "pairs.jsonl")


def _copy_config(path, **dpo):
  c = _dpo_config(path, **{"lora.targets": "", "trainable": ("params/.*",), "optimizer.lr": 3e-2,
                           "optimizer.warmup_steps": 0})
  c.dpo.update(reference="copy", **dpo)
  return c


@pytest.mark.parametrize("mode", ["fixed", "every_2", "ema"])
def test_full_parameter_reference_copy(tmp_path, mode):
  """reference='copy': a second params tree in TrainState.aux, equal to the policy at the start
  (first sigmoid loss log 2), then kept, refreshed every K steps, or moved as an EMA."""
  dpo_keys = {"fixed": {}, "every_2": {"ref_update_every": 2}, "ema": {"ref_ema": 0.5}}[mode]
  c = _copy_config(_pairs_file(tmp_path / "p.jsonl"), **dpo_keys)
  mesh, run, it = _setup(c)
  batches = [run.global_batch(next(it)) for _ in range(3)]
  with jax.set_mesh(mesh):
    state = run.init_state(jax.random.key(0))
    start = jax.device_get(state.variables["params"])
    assert set(state.aux) == {"ref"} and not state.frozen
    losses, policies, refs = [], [], []
    for b in batches:
      state, m = run.train_step(state, b, jax.random.key(1))
      losses.append(float(m["dpo_loss"]))
      policies.append(jax.device_get(state.variables["params"]))
      refs.append(jax.device_get(state.aux["ref"]))
  assert abs(losses[0] - math.log(2)) < 1e-6
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  if mode == "fixed":
    for r in refs:
      same(r, start)
  elif mode == "every_2":
    same(refs[0], start)
    same(refs[1], policies[1])  # refreshed after step 2
    same(refs[2], policies[1])
  else:
    want = start
    for p, r in zip(policies, refs):
      want = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, want, p)
      jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), r, want)
  assert not any(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(policies[-1]), jax.tree.leaves(start)))


def test_reference_copy_resumes_exactly(tmp_path, monkeypatch):
  """The reference copy is checkpointed with the state: stopped after step 2 and resumed, a
  run refreshing its reference every 3 steps gives the same losses bit for bit."""
  c = _copy_config(_pairs_file(tmp_path / "p.jsonl"), ref_update_every=3)
  c.steps, c.checkpoint_every = 5, 100
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])

  def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}

  loop.train_stage(c, str(tmp_path / "ref"), mesh, TOK)
  calls = {"n": 0}

  def stop_after_two(self):
    calls["n"] += 1
    return calls["n"] == 2

  monkeypatch.setattr(loop._StopFlag, "requested", stop_after_two)
  cut = loop.train_stage(c, str(tmp_path / "cut"), mesh, TOK)
  assert cut["preempted"]
  monkeypatch.undo()
  again = loop.train_stage(c, str(tmp_path / "cut"), mesh, TOK)
  assert again["start_step"] == 2
  assert losses(tmp_path / "cut") == losses(tmp_path / "ref")


def test_reference_copy_config_errors(tmp_path):
  path = _pairs_file(tmp_path / "p.jsonl")
  cases = [
      (dict(reference="copy"), {"lora.targets": r".*q_proj"}, "reference='copy' keeps a second copy"),
      (dict(reference="copy", ref_ema=1.0), {}, r"ref_ema=1.0 must be in \[0, 1\)"),
      (dict(reference="copy", ref_ema=0.5, ref_update_every=2), {}, "set one of them to 0"),
      (dict(reference="precomputed", ref_update_every=2), {}, "use reference='copy'"),
  ]
  for dpo_keys, over, match in cases:
    c = _copy_config(path)
    c.dpo.update(**dpo_keys)
    for k, v in over.items():
      c.lora.targets = v
    with pytest.raises(core.ConfigError, match=match) as e:
      schema.validate(c, 1)
    assert "\n" not in str(e.value)


def test_chunked_logits_give_the_same_dpo_steps(tmp_path):
  """model.logits_chunk (logits a few positions at a time) leaves DPO with a ground-truth term
  unchanged: the same losses and metrics over steps, within fp32 rounding."""
  path = _pairs_file(tmp_path / "p.jsonl")
  out = []
  for chunk in (0, 5):
    c = _dpo_config(path, **{"optimizer.lr": 3e-2, "optimizer.warmup_steps": 0, "dpo.gt_weight": 0.5,
                             "model.logits_chunk": chunk})
    mesh, run, it = _setup(c)
    with jax.set_mesh(mesh):
      state = run.init_state(jax.random.key(0))
      ms = []
      for _ in range(3):
        state, m = run.train_step(state, run.global_batch(next(it)), jax.random.key(1))
        ms.append(jax.device_get(m))
    out.append(ms)
  for full, chunked in zip(*out):
    assert full.keys() == chunked.keys()
    for k in full:  # reward_accuracy counts chosen > rejected: a step function that rounding flips at a
      if k != "reward_accuracy":  # near-tie (step 1 starts at policy = reference); the rewards themselves:
        np.testing.assert_allclose(chunked[k], full[k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert {"reward_margin", "chosen_reward"} <= set(full)
