"""Hugging Face <-> mmjax conversion for Llama / Mistral / Qwen2 and PEFT LoRA adapters.

Every reference is a tiny randomly initialised transformers model built from a config
object (nothing is downloaded), saved with `save_pretrained` and compared in float32.
"""
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mmjax import lora as lora_lib  # noqa: E402
from mmjax import sharding  # noqa: E402
from mmjax.convert import llama as conv  # noqa: E402
from mmjax.convert import model_dir  # noqa: E402
from mmjax.models.llama import Llama  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing.*:FutureWarning",  # raised inside peft with transformers 5
    "ignore:Setting `save_embedding_layers`:UserWarning")  # peft saving lm_head when it is targeted

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import convert_hf  # noqa: E402

# Odd sizes: hidden 52 != heads * head_dim 40, GQA 4 query heads over 2 kv heads.
DIMS = dict(vocab_size=101, hidden_size=52, head_dim=10, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=76, num_hidden_layers=2, rms_norm_eps=1e-5)
LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
KINDS = {
    "llama": lambda: transformers.LlamaConfig(**DIMS, rope_scaling=dict(LLAMA3_ROPE), rope_theta=500.0),
    "llama_tied": lambda: transformers.LlamaConfig(**DIMS, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**DIMS, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**DIMS, tie_word_embeddings=True),
}
ARCH = {"llama": "LlamaForCausalLM", "llama_tied": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM"}


def _hf_model(kind, seed=0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(KINDS[kind]()).eval()
  with torch.no_grad():  # random norm scales and biases too, so a missed one shows up
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """kind -> (HF model, directory it was saved to)."""
  out = {}
  for kind in KINDS:
    d = str(tmp_path_factory.mktemp(kind))
    model = _hf_model(kind)
    model.save_pretrained(d)
    out[kind] = (model, d)
  return out


def _batch(seed=0, b=3, t=13, vocab=101):
  """Right-padded tokens [B, T] and attention mask (rows of lengths t, t-4, 5)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab, (b, t)).astype(np.int32)
  mask = np.zeros((b, t), np.int32)
  for i, n in enumerate([t, t - 4, 5][:b]):
    mask[i, :n] = 1
  return tokens, mask


def _hf_logits(model, tokens, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.float().numpy()


def _mm_logits(cfg, variables, tokens, mask):
  return np.asarray(Llama(cfg).apply(variables, jnp.asarray(tokens), segment_ids=jnp.asarray(mask)))


def _assert_close_real(a, b, mask, atol=1e-4):
  real = mask.astype(bool)
  np.testing.assert_allclose(a[real], b[real], atol=atol, rtol=0)


@pytest.mark.parametrize("kind", list(KINDS))
def test_import_matches_transformers_and_round_trips(kind, saved, tmp_path):
  model, d = saved[kind]
  cfg, params = conv.import_hf(d)
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  assert cfg.qkv_bias == (kind == "qwen2")
  assert ("lm_head" in params) != cfg.tie_embeddings
  tokens, mask = _batch()
  ref = _hf_logits(model, tokens, mask)
  _assert_close_real(_mm_logits(cfg, {"params": params}, tokens, mask), ref, mask)

  out = str(tmp_path / "export")
  conv.export_hf(out, cfg, params, architecture=ARCH[kind])
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert type(back).__name__ == ARCH[kind]
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
  _assert_close_real(_hf_logits(back.eval(), tokens, mask), ref, mask, atol=1e-5)


def test_config_fields(saved):
  cfg = conv.config_from_hf(saved["llama"][0].config.to_dict())
  assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim) == (52, 4, 2, 10, 76)
  assert cfg.rope_theta == 500.0 and cfg.norm_eps == 1e-5
  assert cfg.rope_scaling == {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
  # The pre-5.x spelling: rope_theta and rope_scaling with 'type'.
  legacy = dict(architectures=["LlamaForCausalLM"], vocab_size=7, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=5, rope_theta=3.0, max_position_embeddings=64,
                rope_scaling=dict(type="llama3", factor=2.0, low_freq_factor=1.0, high_freq_factor=2.0))
  cfg = conv.config_from_hf(legacy)
  assert cfg.rope_theta == 3.0 and cfg.n_kv_heads == 2 and cfg.head_dim == 4
  assert cfg.rope_scaling["original_max_position_embeddings"] == 64


def test_sharded_index_placed_on_mesh(tmp_path):
  model = _hf_model("llama", seed=1)
  d = str(tmp_path / "hf")
  model.save_pretrained(d, max_shard_size="30KB")
  assert os.path.exists(os.path.join(d, "model.safetensors.index.json"))
  assert not os.path.exists(os.path.join(d, "model.safetensors"))
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  cfg, params = conv.import_hf(d, mesh=mesh)
  q = params["layers_0"]["attn"]["q_proj"]["kernel"]  # ('embed', 'heads') -> (fsdp, tensor)
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in q.addressable_shards} == {(26, 20)}
  # vocab 101 is not divisible by tensor=2, so that axis is replicated.
  assert params["lm_head"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  tokens, mask = _batch(seed=1)
  ref = _hf_logits(model, tokens, mask)
  _assert_close_real(_mm_logits(cfg, {"params": params}, tokens, mask), ref, mask)

  out = str(tmp_path / "export")  # sharded export, from sharded arrays
  conv.export_hf(out, cfg, params, max_shard_bytes=30_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 1
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  _assert_close_real(_hf_logits(back.eval(), tokens, mask), ref, mask, atol=1e-5)


def test_bf16_checkpoint(tmp_path):
  model = _hf_model("qwen2", seed=2).to(torch.bfloat16)
  d = str(tmp_path / "hf")
  model.save_pretrained(d)
  cfg32, p32 = conv.import_hf(d)
  cfg16, p16 = conv.import_hf(d, dtype="bfloat16")
  assert cfg16.param_dtype == "bfloat16" and p16["embed"]["embedding"].dtype == jnp.bfloat16
  want = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(p32["layers_1"]["attn"]["k_proj"]["kernel"]), want)
  np.testing.assert_array_equal(np.asarray(p16["layers_1"]["attn"]["k_proj"]["kernel"], np.float32), want)
  out = str(tmp_path / "export")
  conv.export_hf(out, cfg16, p16, architecture="Qwen2ForCausalLM", dtype="bfloat16")
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
  assert back.dtype == torch.bfloat16
  for (name, x), y in zip(model.state_dict().items(), back.state_dict().values()):
    assert torch.equal(x, y), name
  tokens, mask = _batch(seed=2)
  ref = _hf_logits(model.float(), tokens, mask)
  _assert_close_real(_mm_logits(cfg32, {"params": p32}, tokens, mask), ref, mask)


def _random_peft(model, targets, rslora, seed=0):
  torch.manual_seed(seed)
  pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, use_rslora=rslora))
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if "lora_B" in name:
        p.normal_(0.0, 0.1)
  return pm.eval()


@pytest.mark.parametrize("rslora", [False, True])
def test_import_peft_matches_peft(rslora, tmp_path):
  base = _hf_model("llama", seed=3)
  d = str(tmp_path / "hf")
  base.save_pretrained(d)
  pm = _random_peft(base, ["q_proj", "v_proj", "down_proj", "lm_head"], rslora)
  pm.save_pretrained(str(tmp_path / "peft"))
  cfg, params = conv.import_hf(d)
  cfg, ad = conv.import_peft(str(tmp_path / "peft"), cfg, params)
  assert cfg.lora_alpha == 6.0 and cfg.lora_rslora == rslora
  modules = sorted({p.rsplit("/", 1)[0] for p in traverse_util.flatten_dict(ad, sep="/")})
  assert modules == ["layers_0/attn/q_proj", "layers_0/attn/v_proj", "layers_0/mlp/down_proj",
                     "layers_1/attn/q_proj", "layers_1/attn/v_proj", "layers_1/mlp/down_proj", "lm_head"]
  assert ad["layers_1"]["mlp"]["down_proj"]["a"].shape == (76, 4)
  assert ad["lm_head"]["b"].shape == (4, 101)
  tokens, mask = _batch(seed=3)
  ref = _hf_logits(pm, tokens, mask)
  got = _mm_logits(cfg, {"params": params, "lora": ad}, tokens, mask)
  _assert_close_real(got, ref, mask)
  base_only = _mm_logits(cfg, {"params": params}, tokens, mask)
  assert np.abs(base_only - ref)[mask.astype(bool)].max() > 1e-3  # the adapter matters


def _nonzero_adapter(params, seed=5):
  """q_proj and v_proj in every layer at rank 4, down_proj of layer 0 only at rank 3."""
  ad = lora_lib.init(jax.random.key(seed), params, r".*attn/(q_proj|v_proj)", 4)
  extra = lora_lib.init(jax.random.key(seed + 1), params, r"layers_0/mlp/down_proj", 3)
  ad["layers_0"]["mlp"] = extra["layers_0"]["mlp"]
  return jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(seed + 2), x.shape), ad)


def test_export_peft_loads_in_peft(saved, tmp_path):
  model, d = saved["llama_tied"]
  cfg, params = conv.import_hf(d)
  cfg = dataclasses.replace(cfg, lora_alpha=5.0, lora_rslora=True)
  ad = _nonzero_adapter(params)
  out = str(tmp_path / "peft")
  conv.export_peft(out, cfg, ad, base_model_name_or_path=d)
  ac = json.load(open(os.path.join(out, "adapter_config.json")))
  assert sorted(ac["target_modules"]) == ["model.layers.0.mlp.down_proj", "q_proj", "v_proj"]
  assert ac["r"] == 4 and ac["rank_pattern"] == {"model.layers.0.mlp.down_proj": 3}
  base = transformers.AutoModelForCausalLM.from_pretrained(d)
  pm = peft.PeftModel.from_pretrained(base, out).eval()
  tokens, mask = _batch(seed=4)
  want = _mm_logits(cfg, {"params": params, "lora": ad}, tokens, mask)
  _assert_close_real(_hf_logits(pm, tokens, mask), want, mask)
  # And back: importing the exported adapter gives the same tree.
  cfg2, ad2 = conv.import_peft(out, cfg, params)
  assert (cfg2.lora_alpha, cfg2.lora_rslora) == (5.0, True)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), ad, ad2)


def test_export_merged_adapter(saved, tmp_path):
  _, d = saved["qwen2"]
  cfg, params = conv.import_hf(d)
  ad = _nonzero_adapter(params)
  tokens, mask = _batch(seed=5)
  want = _mm_logits(cfg, {"params": params, "lora": ad}, tokens, mask)
  conv.export_hf(str(tmp_path / "merged"), cfg, params, lora=ad, merge=True, architecture="Qwen2ForCausalLM")
  merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
  _assert_close_real(_hf_logits(merged, tokens, mask), want, mask)
  conv.export_hf(str(tmp_path / "split"), cfg, params, lora=ad, merge=False, architecture="Qwen2ForCausalLM")
  base = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "split"))
  pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "split" / "adapter")).eval()
  _assert_close_real(_hf_logits(pm, tokens, mask), want, mask)


def test_cli_import_export(saved, tmp_path):
  model, d = saved["llama"]
  pm = _random_peft(_hf_model("llama"), ["k_proj", "gate_proj"], False)
  pm.save_pretrained(str(tmp_path / "peft"))
  ck, out = str(tmp_path / "ck"), str(tmp_path / "out")
  assert convert_hf.main(["import", "--hf", d, "--out", ck, "--peft", str(tmp_path / "peft")]) == 0
  assert sorted(os.listdir(ck)) == ["hf_files", "lora", "model_config.json", "params"]
  cfg, params, ad, meta = model_dir.load(ck)
  assert meta["hf_architecture"] == "LlamaForCausalLM" and cfg.lora_alpha == 6.0 and ad is not None
  assert convert_hf.main(["export", "--ckpt", ck, "--out", out, "--merge"]) == 0
  assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == \
      model.config.max_position_embeddings
  assert os.path.exists(os.path.join(out, "generation_config.json"))
  back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens, mask = _batch(seed=6)
  _assert_close_real(_hf_logits(back.eval(), tokens, mask), _hf_logits(pm, tokens, mask), mask)
  assert convert_hf.main(["export", "--ckpt", ck, "--out", out, "--architecture", "Qwen2ForCausalLM"]) == 2


# ---------------------------------------------------------------------------------------
# Bad input: one-line errors naming the field or tensor.

BASE_HF = dict(architectures=["LlamaForCausalLM"], vocab_size=7, hidden_size=8, num_hidden_layers=1,
               num_attention_heads=2, intermediate_size=5, max_position_embeddings=64)


@pytest.mark.parametrize("change, match", [
    (dict(architectures=["GPT2LMHeadModel"]),
     r"architectures=\['GPT2LMHeadModel'\] is not supported; supported: Llama"),
    (dict(rope_scaling=dict(rope_type="yarn", factor=4.0)),
     r"rope_scaling.rope_type='yarn' is not supported; supported: default \(none\), llama3"),
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)),
     r"rope_parameters.rope_type='linear'"),
    (dict(architectures=["MistralForCausalLM"], sliding_window=16),
     r"sliding_window=16 is not supported; supported: null or >= max_position_embeddings"),
    (dict(architectures=["Qwen2ForCausalLM"], use_sliding_window=True), r"use_sliding_window=True is not supported"),
    (dict(attention_bias=True), r"attention_bias=True is not supported; supported: false .*o_proj"),
    (dict(mlp_bias=True), r"mlp_bias=True is not supported; supported: false"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported; supported: silu"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5 is not supported"),
])
def test_unsupported_config_raises_one_line(change, match):
  with pytest.raises(ValueError, match=match) as e:
    conv.config_from_hf({**BASE_HF, **change})
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**{k: v for k, v in BASE_HF.items() if k != "architectures"})
  d = str(tmp_path_factory.mktemp("small"))
  transformers.LlamaForCausalLM(cfg).save_pretrained(d)
  return d


def _edited(src, dst, edit_tensors=None, edit_config=None):
  os.makedirs(dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  config = json.load(open(os.path.join(src, "config.json")))
  if edit_tensors:
    edit_tensors(tensors)
  if edit_config:
    edit_config(config)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  json.dump(config, open(os.path.join(dst, "config.json"), "w"))
  return dst


def test_bad_checkpoints_raise_one_line(small_dir, tmp_path):
  cases = [
      (dict(edit_tensors=lambda t: t.pop("model.layers.0.mlp.up_proj.weight")),
       r"missing tensor 'model.layers.0.mlp.up_proj.weight' \(expected shape \(5, 8\)\)"),
      (dict(edit_tensors=lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(8, np.float32)})),
       r"unexpected tensor 'model.layers.0.self_attn.o_proj.bias' with shape \(8,\)"),
      (dict(edit_config=lambda c: c.update(intermediate_size=6)),
       r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(8, 5\) in the checkpoint, "
       r"but config.json implies \(8, 6\)"),
  ]
  for i, (edit, match) in enumerate(cases):
    d = _edited(small_dir, str(tmp_path / str(i)), **edit)
    with pytest.raises(ValueError, match=match) as e:
      conv.import_hf(d)
    assert "\n" not in str(e.value)
  d = _edited(small_dir, str(tmp_path / "none"))
  os.remove(os.path.join(d, "model.safetensors"))
  with pytest.raises(ValueError, match=r"no model.safetensors or model.safetensors.index.json in"):
    conv.import_hf(d)


def test_bad_adapters_raise_one_line(small_dir, tmp_path):
  cfg, params = conv.import_hf(small_dir)
  ad = lora_lib.init(jax.random.key(0), params, r".*q_proj", 2)
  d = str(tmp_path / "a")
  conv.export_peft(d, cfg, ad)
  ac = json.load(open(os.path.join(d, "adapter_config.json")))
  json.dump({**ac, "use_dora": True}, open(os.path.join(d, "adapter_config.json"), "w"))
  with pytest.raises(ValueError, match=r"adapter_config.json use_dora=True is not supported"):
    conv.import_peft(d, cfg, params)
  json.dump(ac, open(os.path.join(d, "adapter_config.json"), "w"))
  small = dataclasses.replace(cfg, d_model=6)
  small_params = traverse_util.unflatten_dict(conv.param_specs(small)[0], sep="/")  # shapes only
  with pytest.raises(ValueError, match=r"lora_A.weight' has shape \(2, 8\) in the adapter, but the model "
                                       r"implies \(2, 6\)"):
    conv.import_peft(d, small, small_params)
  with pytest.raises(ValueError, match=r"needs qkv_bias=True"):
    conv.export_hf(str(tmp_path / "q"), cfg, params, architecture="Qwen2ForCausalLM")
  with pytest.raises(ValueError, match=r"params 'layers_0/mlp/down_proj/kernel' has shape \(5, 8\), but cfg implies "
                                       r"\(7, 8\)"):
    conv.export_hf(str(tmp_path / "s"), dataclasses.replace(cfg, mlp_dim=7), params)
