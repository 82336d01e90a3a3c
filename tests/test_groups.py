"""Directed fine-tuning (mmjax/train/groups.py): schedules, per-group steps, the joint switch."""
import jax
import numpy as np
import pytest

from helpers import tiny_config
from mmjax import sharding
from mmjax.config import core, schema
from mmjax.data.tokenizer import load_tokenizer
from mmjax.train import groups
from mmjax.train import run as run_lib

TOK = load_tokenizer("builtin_words")
GROUPS = {
    "image": dict(trainable=("lora/vision/.*",), data=dict(task="image_caption")),
    "video": dict(trainable=("params/projector/temporal_embedding",), data=dict(task="video_caption")),
    "text": dict(trainable=("lora/llm/.*",), data=dict(task="video_caption", drop_media=True)),
}


def test_parse_schedule_and_group_at():
  names = ("image", "video", "text")
  assert groups.parse_schedule("", names) == [("image", 1), ("video", 1), ("text", 1)]
  blocks = groups.parse_schedule("image:2, text", names)
  assert blocks == [("image", 2), ("text", 1)]
  assert [groups.group_at(blocks, s) for s in range(7)] == ["image", "image", "text"] * 2 + ["image"]
  assert groups.steps_per_group(groups.parse_schedule("image:3,video:3,text:3", names), 9) == \
      {"image": 3, "video": 3, "text": 3}
  with pytest.raises(groups.GroupError, match="names group 'audio'.*defined groups: image, video, text"):
    groups.parse_schedule("image,audio", names)
  with pytest.raises(groups.GroupError, match="positive step count"):
    groups.parse_schedule("image:0", names)


def _vlm_config(**kw):
  c = tiny_config(steps=6, **kw)
  c.model.update(name="vlm", vocab_size=-1)
  c.vision.update(image_size=48, patch_size=16, d_model=20, n_layers=1, n_heads=2, head_dim=10, mlp_dim=28)
  c.vlm.update(max_frames=3)
  c.data.max_events = 3
  c.data.update(source="shapes", task="video_caption", tokenizer="builtin_words", image_size=48, max_objects=2,
                video_frames=3, num_train_examples=64, num_eval_examples=8)
  c.lora.targets = r".*(q_proj|v_proj|fc1)"
  c.seq_len = 64
  c.optimizer.warmup_steps = 0  # step 0 moves the weights
  c.mesh.update(data=1)
  for name, g in GROUPS.items():
    c.groups[name] = g
  c.group_schedule = "image,video,text"
  return c


def _flat(tree):
  """'/'-joined paths -> numpy leaves, for dicts and optimizer-state tuples alike."""
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): np.asarray(v)
          for path, v in leaves}


def _changed(before, after):
  a, b = _flat(before), _flat(after)
  return {p for p in a if not np.array_equal(a[p], b[p])}


def _owner(path):
  for name, g in GROUPS.items():
    if groups.state_lib.is_trainable(path, g["trainable"]):
      return name
  return None


@pytest.mark.parametrize("joint", [False, True])
def test_each_step_changes_only_its_groups_leaves(joint):
  config = _vlm_config(joint=joint)
  schema.validate(config, 1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = run_lib.build(config, mesh, TOK)
  assert set(run.group_steps) == {"image", "video", "text"}
  text = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
  assert {g: o.batch_fields for g, (o, _) in run.group_steps.items()} == {
      "image": text + ("images",), "video": text + ("frames",), "text": text}
  from mmjax.data import pipeline
  with jax.set_mesh(mesh):
    state = run.init_state(jax.random.key(0))
    paths = set(_flat(state.trainable))
    assert {_owner(p) for p in paths} == {"image", "video", "text"}  # the union of the groups' leaves
    for step, name in enumerate(["image", "video", "text", "image"]):
      obj, step_fn = run.group_steps[name]
      it = pipeline.make_train_iterator(groups.data_config(config, name), global_batch=8, seq_len=64, seed=step,
                                        tokenizer=TOK, visual_tokens=run.visual_tokens)
      before_t, before_o = jax.device_get(state.trainable), jax.device_get(state.opt_state)
      state, m = step_fn(state, run.global_batch(next(it), obj), jax.random.key(1))
      assert np.isfinite(float(m["loss"]))
      changed = _changed(before_t, state.trainable)
      owners = {_owner(p) for p in changed}
      if joint:
        assert len(owners) > 1, (name, owners)  # every group's leaves can move
      else:
        assert owners == {name}, (name, owners)
        moments = _changed(before_o, state.opt_state)
        moved = {_owner(p[p.index("lora/") if "lora/" in p else p.index("params/"):]) for p in moments
                 if "/mu/" in p or "/nu/" in p}
        assert moved == {name}, (name, moved)
    if joint:  # after a full cycle in joint mode, all three groups have moved
      start = _flat(run.init_state(jax.random.key(0)).trainable)
      moved = {_owner(p) for p, v in _flat(state.trainable).items() if not np.array_equal(v, start[p])}
      assert moved == {"image", "video", "text"}


def test_bad_groups_are_one_line_errors():
  c = _vlm_config()
  c.group_schedule = "image,audio"
  with pytest.raises(core.ConfigError, match="group_schedule='image,audio' names group 'audio'"):
    schema.validate(c, 1)
  c = _vlm_config()
  c.groups.text.data = dict(tsk="x")
  with pytest.raises(core.ConfigError, match=r"config.groups.text.data.tsk is not a data key"):
    schema.validate(c, 1)
  c = _vlm_config()
  c.groups.text.trainable = ("lora/nothing/.*",)
  run_mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  with pytest.raises(core.ConfigError, match=r"config.groups.text.trainable entry 'lora/nothing/\.\*' matches no"):
    run_lib.build(c, run_mesh, TOK)
  c = tiny_config(joint=True)
  with pytest.raises(core.ConfigError, match="need config.groups"):
    schema.validate(c, 1)


def test_multi_iterator_follows_the_schedule_and_resumes_exactly():
  from mmjax.data import pipeline
  config = _vlm_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = run_lib.build(config, mesh, TOK)

  def make():
    its = {g: pipeline.make_train_iterator(groups.data_config(config, g), global_batch=4, seq_len=64, seed=0,
                                           tokenizer=TOK, visual_tokens=run.visual_tokens) for g in GROUPS}
    return groups.MultiIterator(its, groups.parse_schedule("image:2,text", ("image", "video", "text")))

  a = make()
  first = [next(a) for _ in range(4)]
  assert [g for g, _ in first] == ["image", "image", "text", "image"]
  assert "images" in first[0][1] and "images" not in first[2][1] and "frames" not in first[2][1]
  state = a.get_state()
  rest = [next(a) for _ in range(3)]
  b = make()
  b.set_state(state)
  b.start_prefetch()
  for (ga, xa), (gb, xb) in zip(rest, [next(b) for _ in range(3)]):
    assert ga == gb and all(np.array_equal(xa[k], xb[k]) for k in xa)


def test_text_only_and_subset_sources(tmp_path):
  from mmjax.data import catalog
  from mmjax.select import retrieve
  config = _vlm_config()
  data = groups.data_config(config, "text")
  rec = catalog.open_source(data, "train")[0]
  assert "frames" not in rec and rec["prompt"] == "describe the video." and rec["caption"]
  path = tmp_path / "sel.json"
  retrieve.write_selection(path, [5, 2, 9])
  data.indices_path = str(path)
  sub = catalog.open_source(data, "train")
  full = catalog.open_source(groups.data_config(config, "video"), "train")
  assert len(sub) == 3 and sub[1]["caption"] == full[2]["caption"]
  retrieve.write_selection(path, [5, 64])
  with pytest.raises(ValueError, match="holds index 64, outside the train source"):
    catalog.open_source(data, "train")
  data.indices_path = str(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="does not exist"):
    catalog.open_source(data, "train")
  bad = groups.data_config(config, "video")
  bad.update(task="pool", pool_mix=(("vqa", 1.0), ("video_caption", 1.0)))
  with pytest.raises(ValueError, match="data.pool_mix=.*images or videos, not both"):
    catalog.validate_data_config(bad)
