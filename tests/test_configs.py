"""Every config file validates; the 8-GPU Llama-3-8B config is checked abstractly on 8
fake devices (no weights allocated)."""
import glob
import importlib.util
import os

import jax
import numpy as np
import pytest

from mmjax import sharding
from mmjax.config import core, schema
from mmjax.train import run as run_lib

from helpers import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load(path, arg=None):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod, mod.get_config(arg)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_validates_and_documents_its_launch_command(path):
  mod, config = load(path)
  name = os.path.basename(path)
  assert f"--config configs/{name}" in mod.__doc__
  schema.check_schema(config, schema.base_config())


def _bytes_per_device(tree) -> int:
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_fp32_adapter(state):
  """bf16 base weights, but the adapter and its AdamW moments in float32 (lora.dtype,
  optimizer.moment_dtype): under 0.5 GB per device (the factors on axes FSDP does not split
  are replicated)."""
  assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {np.dtype(np.float32)}
  floats = [x for x in jax.tree.leaves(state.opt_state) if np.issubdtype(x.dtype, np.floating)]
  assert floats and {x.dtype for x in floats} == {np.dtype(np.float32)}
  assert _bytes_per_device(state.trainable) + _bytes_per_device(state.opt_state) < 0.5e9


LLAMA3_8B = {  # config.json of Meta-Llama-3.1-8B (no weights are needed for the abstract check)
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "max_position_embeddings": 131072, "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}}


def test_llama3_8b_config_on_8_devices_abstractly(tmp_path):
  import json
  json.dump(LLAMA3_8B, open(tmp_path / "config.json", "w"))
  _, config = load(os.path.join(ROOT, "configs", "llama3_8b_lora.py"), f"hf={tmp_path},data=/data/x.jsonl")
  schema.validate(config, n_devices=8)
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
  run = run_lib.build(config, mesh, config.model.vocab_size)
  frozen = run.abstract_state.frozen["params"]
  n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
  assert 8.0e9 < n_base < 8.1e9  # Llama-3-8B
  state = run.abstract_state
  assert _bytes_per_device(state.frozen) < 2.05e9  # ~16 GB of bf16 weights over 8 GPUs
  _check_fp32_adapter(state)
  q = frozen["layers_0"]["attn"]["q_proj"]["kernel"]
  assert q.dtype == jax.numpy.bfloat16 and q.sharding.spec[0] == "fsdp"
  # batch arithmetic: 32 rows over data*fsdp = 8, 2 micro-batches -> 2 rows per device per micro-batch
  assert config.batch_size % (8 * config.grad_accum) == 0
  assert run.model_cfg.rope_scaling["factor"] == 8.0 and run.model_cfg.n_kv_heads == 8


def test_validate_rejects_bad_mesh_and_batch_for_8_devices():
  _, config = load(os.path.join(ROOT, "configs", "llama3_8b_lora.py"))
  config.mesh.fsdp = 3
  with pytest.raises(core.ConfigError, match="multiplies to 3"):
    schema.validate(config, n_devices=8)
  config.mesh.fsdp = 8
  config.batch_size = 20
  with pytest.raises(core.ConfigError, match="batch_size=20 must be divisible by the data-parallel size 8"):
    schema.validate(config, n_devices=8)


def test_parse_arg():
  a = core.parse_arg("steps=5,task=add,flag", steps=1, task="x", flag=False)
  assert (a.steps, a.task, a.flag) == (5, "add", True)
  with pytest.raises(core.ConfigError, match="unknown"):
    core.parse_arg("nope=1", steps=1)


CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768}
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "rms_norm_eps": 1e-5,
             "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False}
LLAVA_15_7B = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
               "image_seq_length": 576, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
               "vision_feature_select_strategy": "default", "vision_config": CLIP_L_336, "text_config": LLAMA2_7B}
VIDEO_LLAVA_7B = {"architectures": ["VideoLlavaForConditionalGeneration"], "model_type": "video_llava",
                  "image_token_index": 32000, "video_token_index": 32001, "image_seq_length": 256,
                  "video_seq_length": 2056, "projector_hidden_act": "gelu", "vision_feature_layer": -2,
                  "vision_feature_select_strategy": "default",
                  "vision_config": dict(CLIP_L_336, image_size=224), "text_config": LLAMA2_7B}


@pytest.mark.parametrize("name,hf_config,arg,n_params", [
    ("llava_mrdpo.py", LLAVA_15_7B, "data=/data/d.json,eval=/data/e.json", 7.06e9),
    ("videollava_directed.py", VIDEO_LLAVA_7B, "images=/data/i.json,videos=/data/v.json,text=/data/t.jsonl", 7.36e9),
])
def test_vlm_configs_on_8_devices_abstractly(tmp_path, name, hf_config, arg, n_params):
  """The 7B VLM configs: validated for 8 devices, every stage's state built abstractly (no
  weights allocated) with bf16 weights split over fsdp=8 and the batch arithmetic checked."""
  import json
  import types
  from mmjax.config.core import stage_config
  json.dump(hf_config, open(tmp_path / "config.json", "w"))
  _, config = load(os.path.join(ROOT, "configs", name), f"hf={tmp_path},{arg}")
  schema.validate(config, n_devices=8)
  tok = types.SimpleNamespace(vocab_size=32064, image_id=32000, video_id=hf_config.get("video_token_index"))
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  for stage in (config.stage_order or ("",)):
    cfg = stage_config(config, stage) if stage else config
    run = run_lib.build(cfg, mesh, tok)
    frozen = run.abstract_state.frozen["params"]
    n_base = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen))
    assert abs(n_base - n_params) / n_params < 0.01, (stage, n_base)
    per_device = _bytes_per_device(run.abstract_state.frozen)
    assert per_device < 1.9e9, (stage, per_device)  # ~14-15 GB of bf16 weights over 8 devices
    _check_fp32_adapter(run.abstract_state)
    q = frozen["llm"]["layers_0"]["attn"]["q_proj"]["kernel"]
    assert q.dtype == jax.numpy.bfloat16 and q.sharding.spec[0] == "fsdp"
    assert cfg.batch_size % (8 * cfg.grad_accum) == 0
  assert run.visual_tokens["image"] == (32000, 576 if name == "llava_mrdpo.py" else 256)
