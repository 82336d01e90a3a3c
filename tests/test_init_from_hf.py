"""A run started from a local Hugging Face directory (`init_from_hf`) trains LoRA on top of
exactly the imported weights, with the HF tokenizer and a chat-format JSONL file."""
import json

import numpy as np
import pytest

from mmjax.recipes import stages

from helpers import tiny_config

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  d = tmp_path_factory.mktemp("hf_model")
  t = Tokenizer(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=120, show_progress=False, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  t.train_from_iterator(["the cat sat on the mat", "reverse the words please"] * 4, trainer)
  t.save(str(d / "tokenizer.json"))
  json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, open(d / "tokenizer_config.json", "w"))
  vocab = t.get_vocab_size()
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=24, intermediate_size=38, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(cfg).eval()
  model.save_pretrained(d)
  return d, model


def test_run_starts_from_hf_weights_and_tokenizer(hf_model_dir, tmp_path):
  d, hf = hf_model_dir
  data = tmp_path / "train.jsonl"
  rows = [{"messages": [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on the mat"}]},
          {"prompt": "reverse the words", "response": "words the reverse"}] * 8
  data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
  c = tiny_config(steps=2, init_from_hf=str(d))
  c.mesh.update(data=1, fsdp=-1)
  c.data.update(source="jsonl", train_path=str(data), eval_path=str(data), tokenizer=str(d))
  c.lora.targets = r".*(q_proj|v_proj)"
  results = stages.train_and_evaluate(c, str(tmp_path / "run"))
  run, state = results["main"]["run"], results["main"]["state"]
  assert run.model_cfg.d_model == 24 and run.model_cfg.vocab_size == hf.config.vocab_size  # sizes from config.json
  frozen = state.frozen["params"]
  np.testing.assert_array_equal(np.asarray(frozen["embed"]["embedding"]),
                                hf.model.embed_tokens.weight.detach().numpy())
  np.testing.assert_array_equal(np.asarray(frozen["layers_1"]["attn"]["k_proj"]["kernel"]),
                                hf.model.layers[1].self_attn.k_proj.weight.detach().numpy().T)
  # the base (no adapter) of the trained state still gives transformers' logits
  ids = [1, 5, 9, 14, 20]
  logits = run.model.apply({"params": state.frozen["params"]}, np.asarray([ids], np.int32))
  with torch.no_grad():
    ref = hf(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4)
  assert np.isfinite(results["main"]["eval_after"]["loss"])


def test_bad_hf_dir_is_a_config_error(tmp_path):
  from mmjax.config import core
  from mmjax.families import registry
  c = tiny_config(init_from_hf=str(tmp_path))
  with pytest.raises(core.ConfigError, match="config.init_from_hf=.*no config.json"):
    registry.get(c.model.name).FAMILY.build(c, None)


def test_trained_run_exports_to_transformers(hf_model_dir, tmp_path):
  import subprocess
  import sys
  from helpers import ROOT
  d, _ = hf_model_dir
  data = tmp_path / "train.jsonl"
  data.write_text("\n".join(json.dumps({"prompt": "the cat", "response": "sat on the mat"}) for _ in range(8)) + "\n")
  c = tiny_config(steps=3, init_from_hf=str(d))
  c.mesh.update(data=1, fsdp=-1)
  c.optimizer.lr = 0.05  # large, so the adapter moves the logits visibly
  c.data.update(source="jsonl", train_path=str(data), tokenizer=str(d))
  results = stages.train_and_evaluate(c, str(tmp_path / "run"))
  run, state = results["main"]["run"], results["main"]["state"]
  out = tmp_path / "hf_out"
  r = subprocess.run([sys.executable, "tools/convert_hf.py", "export", "--ckpt", str(tmp_path / "run" / "model"),
                      "--out", str(out), "--merge"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids = [1, 7, 3, 11]
  ours = np.asarray(run.model.apply(state.variables, np.asarray([ids], np.int32)))
  base = np.asarray(run.model.apply({"params": state.variables["params"]}, np.asarray([ids], np.int32)))
  assert np.abs(ours - base).max() > 1e-3  # the adapter was trained and matters
  with torch.no_grad():
    ref = model.eval()(torch.tensor([ids])).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4)
