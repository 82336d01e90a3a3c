"""configs/shapes_directed.py as an experiment: new concepts only in the target data, arms that
see only their own data (distinct records counted on the real train iterators), each group's
leaves on their own path, and the two-tower model that starts from the one-tower pretrain."""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from helpers import ROOT, subprocess_env
from mmjax import sharding
from mmjax.config import core, schema
from mmjax.data import catalog
from mmjax.data.tokenizer import load_tokenizer
from mmjax.objectives.base import DataContext
from mmjax.train import groups
from mmjax.train import run as run_lib

SPEC = importlib.util.spec_from_file_location("shapes_directed", os.path.join(ROOT, "configs", "shapes_directed.py"))
DIRECTED = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(DIRECTED)
NEW = set(DIRECTED.NEW_SHAPES + DIRECTED.NEW_COLOURS)


def _config(arg="scale=0.02,videos=50,image_share=0.1,text=30,eval=8"):
  return DIRECTED.get_config(arg)


def _words(record) -> set:
  text = record.get("caption") or record.get("response") or ""
  return set(text.replace(",", " ").replace(".", " ").split())


def test_new_concepts_only_in_the_target_data():
  config = _config()
  pretrain = core.stage_config(config, "pretrain")
  for name in groups.names(pretrain):  # pretraining (images and videos) never shows a new concept
    recs = catalog.records(groups.data_config(pretrain, name), "train", 300)
    assert recs and not any(_words(r) & NEW for r in recs), name
  target = catalog.records(config.data, "eval", 8) + catalog.records(config.data, "train", 50)
  share = np.mean([bool(_words(r) & NEW) for r in target])
  assert share > 0.5, share  # most target videos hold a new shape or colour
  directed = core.stage_config(config, "directed")
  for name in ("image", "text"):  # the small image set and the text carry them too
    recs = catalog.records(groups.data_config(directed, name), "train", 30)
    assert any(_words(r) & NEW for r in recs), name
  assert all("frames" not in r and "image" not in r for r in catalog.records(groups.data_config(directed, "text"),
                                                                              "train", 5))


def test_set_sizes_follow_the_papers_shares():
  assert DIRECTED.set_sizes(2000, 0.24, 0.025) == {"full": 2000, "small": 480, "images": 50}
  config = DIRECTED.get_config("")
  size = lambda stage, group: groups.data_config(core.stage_config(config, stage), group).num_train_examples
  assert (size("full", "video"), size("small", "video")) == (2000, 480)
  assert (size("directed", "image"), size("directed", "video")) == (50, 480)
  assert size("joint", "image") == 50 and size("joint", "video") == 480  # joint: exactly the directed data
  assert {config.stages[a].steps for a in ("full", "small", "directed", "joint")} == {300}  # equal steps
  with pytest.raises(core.ConfigError, match="video_share"):
    DIRECTED.get_config("video_share=1.5")


def _row_keys(batch) -> list[str]:
  """One digest per batch row: its tokens and pixels (a record seen twice gives the same)."""
  out = []
  for i in range(batch["tokens"].shape[0]):
    h = hashlib.sha1(np.asarray(batch["tokens"][i]).tobytes())
    for k in ("images", "frames"):
      if k in batch:
        h.update(np.asarray(batch[k][i]).tobytes())
    out.append(h.hexdigest())
  return out


def _seen(config, stage: str, steps: int) -> dict:
  """{group: set of distinct rows} the stage's own train iterators give over `steps` steps."""
  cfg = core.stage_config(config, stage)
  tok = load_tokenizer(cfg.data.tokenizer)
  mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
  run = run_lib.build(cfg, mesh, tok)
  ctx = DataContext(cfg, tok, run.visual_tokens, 0, 1, {})
  blocks = groups.parse_schedule(cfg.group_schedule, tuple(run.group_steps))
  its = {g: obj.train_iterator(ctx, groups.data_config(cfg, g)) for g, (obj, _) in run.group_steps.items()}
  seen = {g: set() for g in its}
  for s in range(steps):
    g = groups.group_at(blocks, s)
    seen[g].update(_row_keys(next(its[g])))
  return seen


def test_each_arm_sees_only_its_own_data():
  """Counted on the train iterators the loop uses: the small arm's 12 videos are the first 12 of
  the full arm's 50, and directed's groups see 5 images, 12 videos and 30 texts."""
  config = _config()
  full, small = _seen(config, "full", 40)["video"], _seen(config, "small", 40)["video"]
  assert len(full) == 50 and len(small) == 12 and small < full
  seen = _seen(config, "directed", 60)
  assert {g: len(v) for g, v in seen.items()} == {"image": 5, "video": 12, "text": 30}
  assert seen["video"] == small  # the directed video group reads exactly the small video set


def test_group_leaves_are_disjoint_and_on_their_own_path():
  config = _config()
  cfg = core.stage_config(config, "directed")
  tok = load_tokenizer(cfg.data.tokenizer)
  run = run_lib.build(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]), tok)
  paths = list(traverse_util.flatten_dict(run.abstract_state.trainable, sep="/"))
  owners = {p: [g for g in groups.names(cfg) if groups.state_lib.is_trainable(p, cfg.groups[g].trainable)]
            for p in paths}
  assert all(len(o) == 1 for o in owners.values())  # every trained leaf belongs to exactly one group
  by_group = {g: {p for p, o in owners.items() if o == [g]} for g in groups.names(cfg)}
  assert all(p.startswith(("lora/vision/", "lora/projector/")) for p in by_group["image"])
  assert all(p.startswith(("lora/video_tower/", "params/projector/temporal", "lora/llm/")) for p in by_group["video"])
  assert all("/mlp/" in p and p.startswith("lora/llm/") for p in by_group["text"])
  assert all(by_group.values())


def test_the_video_tower_starts_as_a_copy_of_the_image_tower():
  config = _config()
  tok = load_tokenizer(config.data.tokenizer)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  one = run_lib.build(core.stage_config(config, "pretrain"), mesh, tok)
  two = run_lib.build(core.stage_config(config, "full"), mesh, tok)
  with jax.set_mesh(mesh):
    params = one.random_params(jax.random.key(0))
    assert "video_tower" not in params
    start = two.family.start_from(core.stage_config(config, "full"), two, params)
  assert jax.tree.all(jax.tree.map(np.array_equal, start["video_tower"], params["vision"]))
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), t)
  assert shapes(start) == shapes(two.abstract_params)
  assert two.family.start_from(config, two, start) is start  # a model that has its video tower keeps it


def test_bad_concept_names_are_one_line_errors():
  config = _config()
  config.data.colours = ("mauve",)
  with pytest.raises(core.ConfigError, match=r"data.colours=\('mauve',\) is not valid; expected \(\) or distinct"):
    schema.validate(config, 1)


@pytest.mark.slow
def test_shapes_directed_recipe_two_seeds_end_to_end(tmp_path):
  """The shortened recipe, two seeds through tools/seeds.py: every arm's table per seed, the
  step-0 evaluation computed once and reused by the other arms, mean ± sd, the claims report;
  then a restart after a kill inside the last arm resumes only that arm."""
  spec = "configs/shapes_directed.py:scale=0.02,eval=4,videos=50,image_share=0.1,text=20"
  cmd = [sys.executable, "tools/seeds.py", "--config", spec, "--seeds", "2", "--workdir", str(tmp_path), "--",
         "--config.sample_eval.max_new_tokens=12"]
  r = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  for k in (0, 1):
    wd = tmp_path / f"seed_{k}"
    results = json.loads((wd / "results.json").read_text())
    assert set(results) == {"pretrain", "full", "small", "directed", "joint", "_headroom"}
    assert results["_headroom"]["lower_is_better"] and results["_headroom"]["metric"] == "error"
    starts = [results[a]["eval_before"] for a in ("full", "small", "directed", "joint")]
    assert all(s == starts[0] for s in starts)  # one start, evaluated once
    assert results["pretrain"]["eval_before"] is None  # eval_at_start=False: no random-model evaluation
    for arm in ("full", "small", "directed", "joint"):
      after = results[arm]["eval_after"]
      assert after["error"] == pytest.approx(after["missing"] + after["hallucination"])
      assert "micro_error" in after and "timing" in after
  for arm in ("small", "directed", "joint"):  # the seeds' runs print to this process's stdout
    assert f"[{arm}] eval at step 0 (the same start as an earlier stage's, reused)" in r.stdout
  assert "[full] eval at step 0: " in r.stdout
  report = subprocess.run([sys.executable, "tools/directed_report.py", "--workdir", str(tmp_path)], cwd=ROOT,
                          env=subprocess_env(1), capture_output=True, text=True, timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  assert "(lower is better; 2 seeds)" in report.stdout and "near full" in report.stdout
  assert "directed - joint" in report.stdout and (tmp_path / "directed_report.txt").exists()
  # a kill inside the last arm: its result and final params are gone; the rerun resumes only it
  import shutil
  joint = tmp_path / "seed_0" / "stages" / "joint"
  os.remove(joint / "done.json")
  shutil.rmtree(joint / "final")
  os.remove(tmp_path / "seed_0" / "results.json")
  again = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "[joint] resumed from" in again.stdout and "[small]" not in again.stdout


def test_sequential_mode_trains_the_groups_one_after_another():
  config = _config("mode=sequential,steps=90")
  assert config.stage_order == ("pretrain", "full", "small", "directed_image", "directed_text", "directed", "joint")
  chain = [core.stage_config(config, s) for s in ("directed_image", "directed_text", "directed")]
  assert [tuple(c.groups) for c in chain] == [("image",), ("text",), ("video",)]
  assert chain[0].init_from_stage == "pretrain" and not chain[1].init_from_stage  # then each from the previous
  assert sum(c.steps for c in chain) == core.stage_config(config, "full").steps  # equal steps
  with pytest.raises(core.ConfigError, match="mode='x' is not valid"):
    _config("mode=x")


def test_shared_arg_gives_the_directed_video_group_the_whole_video_path():
  cfg = core.stage_config(_config("scale=0.02,shared=True"), "directed")
  assert tuple(cfg.groups.video.trainable) == DIRECTED.VIDEO_ONLY
  assert tuple(core.stage_config(_config(), "directed").groups.video.trainable) == DIRECTED.VIDEO_PATH


def test_small_lacks_leaves_one_new_concept_out_of_the_small_video_set():
  """small_lacks=cyan: the small arm's and the directed / joint video group's videos never show
  cyan; the image set, the text and the full video set still do; the sizes stay the same."""
  config = _config("scale=0.02,videos=200,image_share=0.25,text=60,eval=8,small_lacks=cyan")
  has = lambda recs: sum("cyan" in _words(r) for r in recs)
  records = lambda stage, group: catalog.records(groups.data_config(core.stage_config(config, stage), group), "train",
                                                 groups.data_config(core.stage_config(config, stage),
                                                                    group).num_train_examples)
  for stage in ("small", "directed", "joint"):
    recs = records(stage, "video")
    assert len(recs) == 48 and has(recs) == 0 and any(_words(r) & {"purple", "diamond"} for r in recs), stage
  for stage, group in (("directed", "image"), ("joint", "image"), ("directed", "text"), ("full", "video")):
    assert has(records(stage, group)) > 0, (stage, group)
  assert has(catalog.records(config.data, "eval", 40)) > 0  # the test videos keep it
  with pytest.raises(core.ConfigError, match=r"small_lacks='red' is not valid; choose one of the new concepts"):
    _config("small_lacks=red")
