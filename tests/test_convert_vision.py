"""CLIP / SigLIP vision towers: import from tiny random transformers models (standalone and the
vision tower of the two-tower models), parity with transformers, export round trip, sharded
placement, bad-input errors, CLI."""
import json
import os
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmjax import sharding  # noqa: E402
from mmjax.convert import vision as conv  # noqa: E402
from mmjax.models.vit import ViT  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import convert_hf  # noqa: E402

# Odd-ish sizes: D=36 (3 heads x 12), MLP 40, 30px images of 6px patches -> a 5x5 grid.
VISION = dict(hidden_size=36, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3, image_size=30,
              patch_size=6)
TEXT = dict(hidden_size=16, intermediate_size=20, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
            bos_token_id=0, eos_token_id=1, pad_token_id=1)
KINDS = {
    "clip_vision": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
    "clip": lambda: transformers.CLIPModel(transformers.CLIPConfig(vision_config=VISION, text_config=TEXT)),
    "siglip_vision": lambda: transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION)),
    "siglip": lambda: transformers.SiglipModel(transformers.SiglipConfig(vision_config=VISION, text_config=TEXT)),
}
EXPORT_ARCH = {"clip_vision": "CLIPVisionModel", "clip": "CLIPVisionModel", "siglip_vision": "SiglipVisionModel",
               "siglip": "SiglipVisionModel"}


def _hf_model(kind, seed=0):
  torch.manual_seed(seed)
  model = KINDS[kind]()
  with torch.no_grad():  # random everything (norm scales near 1), so a missed tensor shows up
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3 + (1.0 if ("norm" in name and name.endswith("weight")) else 0.0))
  return model.eval()


def _images(n=2, seed=0):
  return np.random.default_rng(seed).normal(size=(n, 30, 30, 3)).astype(np.float32)


def _hf_out(model, images):
  """(last_hidden_state, pooler_output) of the vision tower on [B, H, W, C] images."""
  tower = model.vision_model if hasattr(model, "text_model") else model
  with torch.no_grad():
    out = tower(pixel_values=torch.tensor(images).permute(0, 3, 1, 2))
  pooled = out.pooler_output
  return out.last_hidden_state.numpy(), None if pooled is None else pooled.numpy()


def _mm_out(cfg, params, images):
  out = jax.jit(ViT(cfg).apply)({"params": params}, images)
  return np.asarray(out["tokens"]), np.asarray(out["pooled"]) if "pooled" in out else None


def _assert_same(got, ref, atol=1e-4):
  np.testing.assert_allclose(got[0], ref[0], atol=atol, rtol=0)
  np.testing.assert_allclose(got[1], ref[1], atol=atol, rtol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  out = {}
  for kind in KINDS:
    model = _hf_model(kind)
    d = str(tmp_path_factory.mktemp(kind))
    model.save_pretrained(d)
    out[kind] = (model, d)
  return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_import_matches_transformers_and_round_trips(kind, saved, tmp_path):
  model, d = saved[kind]
  cfg, params = conv.import_hf_vision(d)
  assert (cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.grid) == (36, 3, 12, 5)
  assert cfg.pool == ("cls" if kind.startswith("clip") else "map")
  images = _images()
  ref = _hf_out(model, images)
  _assert_same(_mm_out(cfg, params, images), ref)

  out = str(tmp_path / "export")
  conv.export_hf_vision(out, cfg, params, architecture=EXPORT_ARCH[kind])
  for loader in (transformers.AutoModel, getattr(transformers, EXPORT_ARCH[kind])):
    back, info = loader.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(back).__name__ == EXPORT_ARCH[kind]
    _assert_same(_hf_out(back.eval(), images), ref, atol=1e-5)
  # and mmjax reads its own export back
  cfg2, params2 = conv.import_hf_vision(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_vision_tower_without_head_and_unprefixed_names(tmp_path):
  """SigLIP with vision_use_head=False (no pooler); the prefixed and the unprefixed (transformers 5)
  standalone layouts both read."""
  torch.manual_seed(0)
  model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION, vision_use_head=False)).eval()
  d = str(tmp_path / "hf")
  model.save_pretrained(d)
  cfg, params = conv.import_hf_vision(d)
  assert cfg.pool == "none" and "head" not in params
  images = _images(1)
  tokens, pooled = _mm_out(cfg, params, images)
  assert pooled is None
  np.testing.assert_allclose(tokens, _hf_out(model, images)[0], atol=1e-4, rtol=0)
  f = os.path.join(d, "model.safetensors")
  sd = load_file(f)
  prefixed = {k if k.startswith(conv.PREFIX) else conv.PREFIX + k: v for k, v in sd.items()}
  save_file(prefixed, f, metadata={"format": "pt"})
  _, params2 = conv.import_hf_vision(d)
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  out = str(tmp_path / "export")
  conv.export_hf_vision(out, cfg, params, architecture="SiglipVisionModel")
  back, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert back.config.vision_use_head is False


def test_placed_on_mesh(saved):
  model, d = saved["siglip"]
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  cfg, params = conv.import_hf_vision(d, mesh=mesh)
  q = params["head"]["attention"]["q_proj"]["kernel"]  # a third of in_proj, read per shard
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in q.addressable_shards} == {(18, 18)}
  images = _images()
  _assert_same(_mm_out(cfg, params, images), _hf_out(model, images))


def test_lora_merged_export(saved, tmp_path):
  from mmjax import lora as lora_lib
  model, d = saved["clip_vision"]
  cfg, params = conv.import_hf_vision(d)
  rng = np.random.default_rng(0)
  adapter = jax.eval_shape(lambda p: lora_lib.init(jax.random.key(0), p, ".*q_proj", 2), params)
  adapter = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.1, adapter)
  out = str(tmp_path / "export")
  conv.export_hf_vision(out, cfg, params, adapter, architecture="CLIPVisionModel")
  back = transformers.AutoModel.from_pretrained(out).eval()
  merged = lora_lib.merge(params, adapter, cfg.lora_alpha, cfg.lora_rslora)
  images = _images()
  _assert_same(_hf_out(back, images), _mm_out(cfg, merged, images))
  with pytest.raises(ValueError, match="merge=False is not supported"):
    conv.export_hf_vision(out, cfg, params, adapter, merge=False)


def _copy(d, tmp_path, edit_config=None, edit_tensors=None):
  out = tmp_path / "bad"
  out.mkdir(parents=True)
  config = json.load(open(os.path.join(d, "config.json")))
  if edit_config:
    edit_config(config)
  json.dump(config, open(out / "config.json", "w"))
  sd = load_file(os.path.join(d, "model.safetensors"))
  if edit_tensors:
    edit_tensors(sd)
  save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
  return str(out)


def _one_line(exc):
  assert "\n" not in str(exc.value)
  return str(exc.value)


def test_bad_inputs(saved, tmp_path):
  _, d = saved["clip"]
  name = "vision_model.encoder.layers.1.mlp.fc1.weight"

  def drop(sd):
    del sd[name]
  with pytest.raises(ValueError, match=f"missing tensor '{name}' \\(expected shape \\(40, 36\\)\\)") as e:
    conv.import_hf_vision(_copy(d, tmp_path / "a", edit_tensors=drop))
  _one_line(e)

  def reshape(sd):
    sd[name] = np.zeros((41, 36), np.float32)
  with pytest.raises(ValueError, match=r"'vision_model.encoder.layers.1.mlp.fc1.weight' has shape \(41, 36\) in the "
                                       r"checkpoint, but config.json implies \(40, 36\)") as e:
    conv.import_hf_vision(_copy(d, tmp_path / "b", edit_tensors=reshape))
  _one_line(e)

  def extra(sd):
    sd["vision_model.encoder.layers.2.mlp.fc1.weight"] = np.zeros((40, 36), np.float32)
  with pytest.raises(ValueError, match=r"unexpected tensor 'vision_model.encoder.layers.2.mlp.fc1.weight'") as e:
    conv.import_hf_vision(_copy(d, tmp_path / "c", edit_tensors=extra))
  _one_line(e)

  def act(config):
    config["vision_config"]["hidden_act"] = "relu"
  with pytest.raises(ValueError, match=r"config.json vision_config.hidden_act='relu' is not supported") as e:
    conv.import_hf_vision(_copy(d, tmp_path / "d", edit_config=act))
  _one_line(e)

  with pytest.raises(ValueError, match=r"architectures=\['BertModel'\] is not supported"):
    conv.vit_config_from_hf({"architectures": ["BertModel"]})
  cfg = conv.vit_config_from_hf(json.load(open(os.path.join(d, "config.json"))))
  with pytest.raises(ValueError, match="needs a siglip layout"):
    conv.hf_vision_config(cfg, "SiglipVisionModel")


def test_cli_round_trip(saved, tmp_path):
  model, d = saved["siglip"]
  mm, out = str(tmp_path / "mm"), str(tmp_path / "hf")
  assert convert_hf.main(["import-vision", "--hf", d, "--out", mm]) == 0
  assert convert_hf.main(["export-vision", "--ckpt", mm, "--out", out]) == 0
  back, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert type(back).__name__ == "SiglipVisionModel"
  images = _images()
  _assert_same(_hf_out(back.eval(), images), _hf_out(model, images), atol=1e-5)
  assert convert_hf.main(["import-vision", "--hf", str(tmp_path), "--out", mm]) == 2  # no config.json
