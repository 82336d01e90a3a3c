"""Decoder and LoRA tree: shapes, exactness of a fresh adapter, merge, targets, masks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mmjax import lora
from mmjax.models import layers
from mmjax.models.llama import Llama, LlamaConfig

CFG = LlamaConfig(vocab_size=61, d_model=22, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=6, mlp_dim=26,
                  lora_alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 61, size=(3, 9)), jnp.int32)


def _params(cfg=CFG):
  return nn.meta.unbox(Llama(cfg).init(jax.random.key(0), TOKENS)["params"])


def _nonzero_adapter(params, targets=r".*", rank=3, seed=1):
  ad = lora.init(jax.random.key(seed), params, targets, rank)
  return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + 1), x.shape), ad)


def test_param_tree_shapes():
  shapes = jax.tree.map(lambda x: x.shape, _params())
  assert shapes["embed"]["embedding"] == (61, 22)
  assert shapes["lm_head"]["kernel"] == (22, 61)
  layer = shapes["layers_1"]
  assert layer["attn"] == {"q_proj": {"kernel": (22, 36)}, "k_proj": {"kernel": (22, 12)},
                           "v_proj": {"kernel": (22, 12)}, "o_proj": {"kernel": (36, 22)}}
  assert layer["mlp"] == {"gate_proj": {"kernel": (22, 26)}, "up_proj": {"kernel": (22, 26)},
                          "down_proj": {"kernel": (26, 22)}}
  assert set(shapes) == {"embed", "layers_0", "layers_1", "final_norm", "lm_head"}


def test_lora_tree_targets_only_matching_modules():
  ad = lora.init(jax.random.key(1), _params(), r".*attn/(q_proj|v_proj)", 4)
  flat = traverse_util.flatten_dict(ad, sep="/")
  assert sorted(flat) == sorted(f"layers_{i}/attn/{m}/{x}" for i in range(2) for m in ("q_proj", "v_proj")
                                for x in "ab")
  assert flat["layers_0/attn/q_proj/a"].shape == (22, 4)
  assert flat["layers_0/attn/v_proj/b"].shape == (4, 12)
  assert not np.any(flat["layers_0/attn/q_proj/b"])
  assert lora.count(ad) == 2 * (4 * (22 + 36) + 4 * (22 + 12))


def test_lora_no_match_raises():
  with pytest.raises(ValueError, match="matches no module"):
    lora.init(jax.random.key(1), _params(), r".*nothing", 4)


def test_fresh_adapter_is_exactly_base_and_no_lora_collection_is_base():
  params = _params()
  model = Llama(CFG)
  base = model.apply({"params": params}, TOKENS)
  fresh = model.apply({"params": params, "lora": lora.init(jax.random.key(2), params, ".*", 4)}, TOKENS)
  np.testing.assert_array_equal(base, fresh)


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_equals_base_plus_adapter(rslora):
  cfg = dataclasses.replace(CFG, lora_rslora=rslora)
  params = _params(cfg)
  ad = _nonzero_adapter(params)
  model = Llama(cfg)
  with_adapter = model.apply({"params": params, "lora": ad}, TOKENS)
  merged = lora.merge(params, ad, cfg.lora_alpha, rslora)
  out = model.apply({"params": merged}, TOKENS)
  assert np.abs(np.asarray(with_adapter - model.apply({"params": params}, TOKENS))).max() > 1e-3
  np.testing.assert_allclose(out, with_adapter, atol=1e-5, rtol=1e-5)


def test_reset_gives_fresh_adapter_with_new_a():
  params = _params()
  ad = _nonzero_adapter(params)
  new = lora.reset(jax.random.key(9), ad)
  for path, x in traverse_util.flatten_dict(new, sep="/").items():
    old = traverse_util.flatten_dict(ad, sep="/")[path]
    assert x.shape == old.shape
    if path.endswith("/b"):
      assert not np.any(x)
    else:
      assert not np.allclose(x, old)


def test_lora_scale():
  assert layers.lora_scale(32.0, 16, False) == 2.0
  assert layers.lora_scale(32.0, 16, True) == 8.0


def test_segments_block_attention_across_packed_examples():
  params = _params()
  model = Llama(CFG)
  a, b = TOKENS[:1, :4], TOKENS[1:2, :5]
  packed = jnp.concatenate([a, b], axis=1)
  seg = jnp.asarray([[1] * 4 + [2] * 5])
  pos = jnp.asarray([list(range(4)) + list(range(5))])
  out = model.apply({"params": params}, packed, pos, seg)
  np.testing.assert_allclose(out[:, :4], model.apply({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(out[:, 4:], model.apply({"params": params}, b), atol=1e-5)


def test_causal():
  params = _params()
  model = Llama(CFG)
  full = model.apply({"params": params}, TOKENS)
  changed = TOKENS.at[:, -1].set(5)
  out = model.apply({"params": params}, changed)
  np.testing.assert_allclose(out[:, :-1], full[:, :-1], atol=1e-6)


def test_bf16_compute_and_tied_embeddings_and_remat():
  cfg = dataclasses.replace(CFG, dtype="bfloat16", tie_embeddings=True, remat="full", qkv_bias=True)
  params = _params(cfg)
  assert "lm_head" not in params and "bias" in params["layers_0"]["attn"]["q_proj"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = Llama(cfg).apply({"params": params}, TOKENS)
  assert logits.dtype == jnp.float32
  ref = Llama(dataclasses.replace(cfg, dtype="float32")).apply({"params": params}, TOKENS)
  assert np.abs(np.asarray(logits - ref)).max() < 0.1
  g = jax.grad(lambda p: Llama(cfg).apply({"params": p}, TOKENS).sum())(params)
  assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in jax.tree.leaves(g))


def test_llama3_rope_scaling_matches_reference():
  scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)
  inv = np.asarray(layers.rope_frequencies(16, 500000.0, scaling))
  base = 1.0 / (500000.0 ** (np.arange(0, 16, 2) / 16))
  ref = []
  for f in base:  # the reference formula, element by element
    wavelen = 2 * np.pi / f
    if wavelen < 64 / 4.0:
      ref.append(f)
    elif wavelen > 64 / 1.0:
      ref.append(f / 8.0)
    else:
      s = (64 / wavelen - 1.0) / (4.0 - 1.0)
      ref.append((1 - s) * f / 8.0 + s * f)
  np.testing.assert_allclose(inv, ref, rtol=1e-6)


def test_lora_dropout_only_in_training():
  cfg = dataclasses.replace(CFG, lora_dropout=0.5)
  params = _params(cfg)
  ad = _nonzero_adapter(params)
  model = Llama(cfg)
  v = {"params": params, "lora": ad}
  det = model.apply(v, TOKENS)
  np.testing.assert_array_equal(det, model.apply(v, TOKENS, deterministic=True))
  drop = model.apply(v, TOKENS, deterministic=False, rngs={"dropout": jax.random.key(0)})
  assert np.abs(np.asarray(drop - det)).max() > 1e-4
