"""Train step, trainable split, gradient accumulation and sharding equivalence."""
import jax
import numpy as np
import pytest
from flax import traverse_util

from mmjax import sharding
from mmjax.train import run as run_lib
from mmjax.config import core, schema
from mmjax.train.state import learning_rate_schedule, split

from helpers import synthetic_batches, tiny_config


def _losses(config, devices, n_steps=3, batches=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  run = run_lib.build(config, mesh, config.model.vocab_size)
  state = run.init_state(jax.random.key(config.seed))
  batches = batches or synthetic_batches(n_steps, config.batch_size, config.seq_len, config.model.vocab_size)
  out = []
  for b in batches:
    state, m = run.train_step(state, run.global_batch(b), jax.random.key(1))
    out.append(jax.device_get(m))
  return run, state, out


def test_step_schedule_multiplies_the_lr_every_step_every_steps():
  config = tiny_config()
  config.optimizer.update(lr=4e-4, warmup_steps=0, schedule="step", step_every=3, step_rate=0.5)
  lr = learning_rate_schedule(config.optimizer, 9)
  assert [float(lr(k)) for k in range(9)] == pytest.approx([4e-4] * 3 + [2e-4] * 3 + [1e-4] * 3)
  config.optimizer.update(warmup_steps=2)
  assert float(lr(0)) == pytest.approx(4e-4) and float(learning_rate_schedule(config.optimizer, 9)(0)) == 0.0
  config.optimizer.update(step_every=0)
  with pytest.raises(core.ConfigError, match=r"schedule='step' needs optimizer.step_every > 0 .* got step_every=0"):
    schema.validate(config, 1)


def test_split_by_regex():
  v = {"params": {"a": {"kernel": 1, "scale": 2}}, "lora": {"a": {"a": 3, "b": 4}}}
  train, frozen = split(v, ["lora/.*", r"params/.*/scale"])
  assert traverse_util.flatten_dict(train, sep="/") == {"params/a/scale": 2, "lora/a/a": 3, "lora/a/b": 4}
  assert traverse_util.flatten_dict(frozen, sep="/") == {"params/a/kernel": 1}


def test_only_trainable_leaves_change_and_frozen_has_no_optimizer_state():
  config = tiny_config()
  run, state, ms = _losses(config, jax.devices()[:1])
  init = run.init_state(jax.random.key(config.seed))
  assert "params" not in state.trainable and "lora" in state.trainable
  for path, x in traverse_util.flatten_dict(state.frozen, sep="/").items():
    np.testing.assert_array_equal(x, traverse_util.flatten_dict(init.frozen, sep="/")[path])
  b_new = traverse_util.flatten_dict(state.trainable, sep="/")
  assert any(np.abs(np.asarray(v)).max() > 0 for k, v in b_new.items() if k.endswith("/b"))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_train = sum(x.size for x in jax.tree.leaves(state.trainable))
  assert n_opt <= 2 * n_train + 16  # Adam mu and nu over trainable leaves only, plus counters
  assert ms[0]["loss"] > 0 and np.isfinite(ms[-1]["grad_norm"])


def test_grad_accumulation_normalises_over_the_whole_batch():
  batches = synthetic_batches(2, 8, 16, 67, seed=3)
  _, s1, m1 = _losses(tiny_config(), jax.devices()[:1], batches=batches)
  _, s4, m4 = _losses(tiny_config(grad_accum=4), jax.devices()[:1], batches=batches)
  for a, b in zip(m1, m4):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
  for x, y in zip(jax.tree.leaves(s1.trainable), jax.tree.leaves(s4.trainable)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mesh", [dict(data=2, fsdp=2, tensor=2), dict(data=1, fsdp=4, tensor=2)])
def test_sharded_steps_match_one_device_and_do_not_recompile(mesh):
  assert jax.device_count() == 8
  config = tiny_config(steps=5)
  batches = synthetic_batches(4, 8, 16, 67, seed=5)
  _, _, ref = _losses(config, jax.devices()[:1], batches=batches)
  sharded = tiny_config(steps=5)
  sharded.mesh.update(**mesh)
  run, state, out = _losses(sharded, jax.devices(), batches=batches)
  for a, b in zip(ref, out):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
  assert run.train_step._cache_size() == 1
  kernel = state.frozen["params"]["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_sharded_vlm_step_matches_one_device():
  """A VLM (ViT + projector + LLaMA) LoRA step on shapes images, 8 devices (2x2x2) vs 1."""
  from mmjax.data import pipeline
  from mmjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer("builtin")
  config = tiny_config(steps=3)
  config.model.update(name="vlm", vocab_size=-1)
  config.vision.update(image_size=48, patch_size=16, d_model=20, n_layers=1, n_heads=2, head_dim=10, mlp_dim=28)
  config.data.update(source="shapes", task="image_caption", image_size=48, max_objects=2, num_train_examples=64)
  config.lora.targets = r".*(q_proj|v_proj|out_proj|fc1|linear_1)"
  config.seq_len = 64
  losses = {}
  for name, mesh, devices in (("one", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                              ("eight", dict(data=2, fsdp=2, tensor=2), jax.devices())):
    config.mesh.update(**mesh)
    run = run_lib.build(config, sharding.make_mesh(config.mesh, devices), tok)
    it = pipeline.make_train_iterator(config.data, global_batch=8, seq_len=64, seed=0, tokenizer=tok,
                                      visual_tokens=run.visual_tokens)
    state = run.init_state(jax.random.key(0))
    out = []
    for _ in range(3):
      state, m = run.train_step(state, run.global_batch(next(it)), jax.random.key(1))
      out.append(float(m["loss"]))
    losses[name] = out
    assert run.train_step._cache_size() == 1
  assert "images" in run.objective.batch_fields
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-5)


def test_vlm_trains_on_jsonl_records_with_image_files(tmp_path):
  """A VLM step on a JSONL file whose records name PNG files (decoded and resized by PIL)."""
  import json
  from PIL import Image
  from mmjax.data import pipeline
  from mmjax.data.tokenizer import load_tokenizer
  rng = np.random.default_rng(0)
  lines = []
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"prompt": "what is it?", "response": f"thing {i}", "image": f"{i}.png"}))
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  tok = load_tokenizer("builtin")
  config = tiny_config(steps=2)
  config.model.update(name="vlm", vocab_size=-1)
  config.vision.update(image_size=32, patch_size=16, d_model=20, n_layers=1, n_heads=2, head_dim=10, mlp_dim=28)
  config.data.update(source="jsonl", train_path=str(tmp_path / "train.jsonl"), image_size=32)
  config.optimizer.warmup_steps = 0
  config.lora.targets = r".*(q_proj|v_proj|fc1|linear_1)"
  config.seq_len = 32
  config.mesh.update(data=1)
  run = run_lib.build(config, sharding.make_mesh(config.mesh, jax.devices()[:1]), tok)
  assert run.objective.batch_fields[-1] == "images"
  it = pipeline.make_train_iterator(config.data, global_batch=8, seq_len=32, seed=0, tokenizer=tok,
                                    visual_tokens=run.visual_tokens)
  state = run.init_state(jax.random.key(0))
  batch = next(it)
  assert batch["images"].shape == (8, 32, 32, 3)
  losses = []
  for _ in range(2):
    state, m = run.train_step(state, run.global_batch(batch), jax.random.key(1))
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[1] < losses[0]


def test_bf16_base_keeps_fp32_adapter_moments_and_accumulation():
  """param_dtype=bfloat16 (the 8-GPU configs): the adapter, AdamW's moments and the accumulated
  gradients stay float32, and the losses track an all-float32 run from the same weights."""
  import jax.numpy as jnp
  batch = synthetic_batches(1, 8, 16, 67)[0]

  def train(config, base=None):
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    run = run_lib.build(config, mesh, config.model.vocab_size)
    rng = jax.random.key(config.seed)
    state = run.init_state(rng) if base is None else run.init_from_params(rng, base)
    losses = []
    for _ in range(6):  # one batch over and over: the loss must fall
      state, m = run.train_step(state, run.global_batch(batch), jax.random.key(1))
      losses.append(float(m["loss"]))
    return run, state, np.array(losses)

  ref_run, ref_state, ref = train(tiny_config(grad_accum=2))
  base = ref_run.init_state(jax.random.key(0)).frozen["params"]
  mixed = tiny_config(grad_accum=2, model={"dtype": "bfloat16", "param_dtype": "bfloat16"})
  run, state, losses = train(mixed, jax.tree.map(lambda x: x.astype(jnp.bfloat16), base))
  assert {x.dtype for x in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.float32)}
  assert {x.dtype for s in _adam(state) for x in jax.tree.leaves((s.mu, s.nu))} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(losses, ref, rtol=2e-2)
  assert losses[-1] < losses[0] - 0.1 and ref[-1] < ref[0] - 0.1


def _adam(state):
  import optax
  found = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert found
  return found


def _eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for sub in e.params.values():
      sub = getattr(sub, "jaxpr", sub)
      if hasattr(sub, "eqns"):
        yield from _eqns(sub)


def test_bf16_adapter_when_asked_still_accumulates_in_fp32():
  import jax.numpy as jnp
  c = tiny_config(grad_accum=2, lora={"dtype": "bfloat16"}, optimizer={"moment_dtype": ""},
                  model={"dtype": "bfloat16", "param_dtype": "bfloat16"})
  run, state, _ = _losses(c, jax.devices()[:1], n_steps=1)
  assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for s in _adam(state) for x in jax.tree.leaves((s.mu, s.nu))} == {jnp.dtype(jnp.bfloat16)}
  batch = run.global_batch(synthetic_batches(1, 8, 16, 67)[0])
  scan = [e for e in _eqns(jax.make_jaxpr(run.train_step)(state, batch, jax.random.key(1)).jaxpr)
          if e.primitive.name == "scan"]
  assert scan  # grad_accum=2: the micro-batches run under lax.scan ...
  carried = scan[0].outvars[:len(jax.tree.leaves(state.trainable))]
  assert {v.aval.dtype for v in carried} == {jnp.dtype(jnp.float32)}  # ... their gradient sums in float32


@pytest.mark.parametrize("model", ["llama", "vlm"])
def test_chunked_logits_give_the_same_sft_steps(model):
  """model.logits_chunk computes the loss's logits a few positions at a time: the same losses,
  accuracies and updates as the whole-sequence logits, within fp32 rounding."""
  from mmjax.data import pipeline
  from mmjax.data.tokenizer import load_tokenizer
  tok = load_tokenizer("builtin")
  out = []
  for chunk in (0, 5):
    c = tiny_config(model={"logits_chunk": chunk})
    if model == "vlm":
      c.model.update(name="vlm", vocab_size=-1)
      c.vision.update(image_size=48, patch_size=16, d_model=20, n_layers=1, n_heads=2, head_dim=10, mlp_dim=28)
      c.data.update(source="shapes", task="image_caption", image_size=48, max_objects=2, num_train_examples=64)
      c.seq_len = 24
      c.lora.targets = r".*(q_proj|v_proj|linear_1|lm_head)"  # an adapter on the head the chunks apply
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    run = run_lib.build(c, mesh, tok if model == "vlm" else c.model.vocab_size)
    if model == "vlm":
      it = pipeline.make_train_iterator(c.data, global_batch=8, seq_len=24, seed=0, tokenizer=tok,
                                        visual_tokens=run.visual_tokens)
      batches = [next(it) for _ in range(3)]
    else:
      batches = synthetic_batches(3, c.batch_size, c.seq_len, c.model.vocab_size)
    state = run.init_state(jax.random.key(c.seed))
    ms = []
    for b in batches:
      state, m = run.train_step(state, run.global_batch(b), jax.random.key(1))
      ms.append(jax.device_get(m))
    out.append((ms, state))
  (full, s_full), (chunked, s_chunked) = out
  for a, b in zip(full, chunked):
    for k in ("loss", "accuracy", "grad_norm"):
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)
  for a, b in zip(jax.tree.leaves(s_full.trainable), jax.tree.leaves(s_chunked.trainable)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
