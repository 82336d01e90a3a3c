"""EVA / EVA-02 towers from timm checkpoints: features equal to timm's forward (outputs stored by
tools/make_eva_reference.py, where timm imports; see its docstring), as a VLM tower and in ViSFT."""
import glob
import json
import os
import shutil

import jax
import numpy as np
import pytest

from mmjax.convert import eva as convert_eva
from mmjax.models.vit import ViT

from helpers import ROOT

DATA = os.path.join(ROOT, "tests", "data", "eva")
VARIANTS = sorted(os.path.basename(d) for d in glob.glob(os.path.join(DATA, "*")))


def test_the_reference_covers_each_eva_layout():
  assert VARIANTS == ["eva02_clip", "eva02_mim", "eva_g_clip"]


@pytest.mark.parametrize("name", VARIANTS)
def test_eva_features_equal_timm(name):
  path = os.path.join(DATA, name)
  ref = np.load(os.path.join(path, "reference.npz"))
  cfg, params = convert_eva.import_eva(path)
  out = ViT(cfg).apply({"params": params}, ref["images"])
  np.testing.assert_allclose(np.asarray(out["tokens"]), ref["tokens"], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(out["pooled"]), ref["pooled"], atol=1e-4, rtol=1e-4)
  layout = {"eva02_clip": dict(rope=True, mlp="swiglu", mlp_norm=True, attn_norm=True, pool="cls"),
            "eva02_mim": dict(rope=True, mlp="swiglu", mlp_norm=False, attn_norm=False, pool="mean"),
            "eva_g_clip": dict(rope=False, mlp="standard", act="gelu", pool="cls")}[name]
  assert all(getattr(cfg, k) == v for k, v in layout.items()), cfg
  assert cfg.k_bias is False and (cfg.layer_scale is not None) == (name == "eva02_clip")


def test_rope_rotates_pairs_by_row_then_column():
  from mmjax.models import vit
  sin, cos = vit.rope_2d_table(8, 2, 3)
  assert sin.shape == (6, 8)
  # token (row 1, col 2): the first two pairs turn by the row, the last two by the column
  np.testing.assert_allclose(sin[5, [0, 1, 4, 5]], np.sin([1.0, 1.0, 2.0, 2.0]), atol=1e-6)
  np.testing.assert_allclose(cos[5, [0, 1, 4, 5]], np.cos([1.0, 1.0, 2.0, 2.0]), atol=1e-6)
  np.testing.assert_allclose(sin[5, 2], np.sin(1.0 / 100.0), atol=1e-7)  # band 1: 1 / 10000^(1/2)
  x = np.arange(8, dtype=np.float32).reshape(1, 1, 1, 8) + 1
  y = np.asarray(vit.apply_rope_2d(x, sin[:1] * 0 + 1, cos[:1] * 0))  # a quarter turn of each pair
  np.testing.assert_allclose(y[0, 0, 0], [-2, 1, -4, 3, -6, 5, -8, 7])


def test_bad_eva_directories_are_one_line_errors(tmp_path):
  bad = tmp_path / "bad"
  shutil.copytree(os.path.join(DATA, "eva02_clip"), bad)
  cfg = json.load(open(bad / "config.json"))
  json.dump(dict(cfg, model_args=dict(cfg["model_args"], num_reg_tokens=4)), open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match=r"config.json model_args.num_reg_tokens=4 is not supported; supported: 0"):
    convert_eva.import_eva(str(bad))
  json.dump(dict(cfg, architecture="eva_unknown", model_args={}), open(bad / "config.json", "w"))
  with pytest.raises(ValueError, match=r"architecture='eva_unknown' is not supported"):
    convert_eva.import_eva(str(bad))


def test_eva_tower_in_a_vlm_and_in_visft(tmp_path):
  """An EVA tower is `init_vision_from_hf` of a VLM and of the ViSFT model: its config.json
  sets the tower, its weights replace the random ones."""
  from mmjax import sharding
  from mmjax.config import schema
  from mmjax.data.tokenizer import load_tokenizer
  from helpers import tiny_config
  from mmjax.train import run as run_lib
  path = os.path.join(DATA, "eva02_clip")
  _, tower = convert_eva.import_eva(path)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  for family in ("vlm", "visft"):
    c = tiny_config(objective="visft" if family == "visft" else "sft", init_vision_from_hf=path,
                    **{"model.name": family, "data.source": "shapes", "data.task": "image_caption",
                       "data.image_size": 28, "data.max_objects": 2, "lora.targets": ""})
    c.trainable = ("params/heads/.*",) if family == "visft" else ("params/projector/.*",)
    c.visft.update(d_model=16, n_layers=1, n_heads=2, head_dim=8, mlp_dim=24, num_queries=4, mask_dim=8)
    schema.validate(c, n_devices=1)
    run = run_lib.build(c, mesh, load_tokenizer("builtin"))
    params = run.family.import_hf(c, run)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params["vision"], tower)
