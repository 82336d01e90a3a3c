"""ViT tower and VLM: shapes and dtypes, position-table interpolation, parity with HF CLIP and
SigLIP vision models, LoRA on the tower, splicing at placeholders, video with temporal pooling."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from mmjax import lora
from mmjax.models import layers
from mmjax.models import vit as vit_lib
from mmjax.models import vlm as vlm_lib
from mmjax.models.llama import Llama, LlamaConfig
from mmjax.models.vit import CLIP_LAYOUT, SIGLIP_LAYOUT, ViT, ViTConfig
from mmjax.models.vlm import VLM, VLMConfig

# Odd, distinct dims: D=21 (3 heads x 7), MLP 23, 15px images of 5px patches -> a 3x3 grid.
SIZES = dict(image_size=15, patch_size=5, d_model=21, n_layers=2, n_heads=3, head_dim=7, mlp_dim=23,
             attention="xla")
CLIP = ViTConfig(**CLIP_LAYOUT, **SIZES)
SIGLIP = ViTConfig(**SIGLIP_LAYOUT, **SIZES)
LLM = LlamaConfig(vocab_size=61, d_model=22, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=6, mlp_dim=26,
                  attention="xla", lora_alpha=8.0)
IMG = 60  # placeholder token id
VCFG = VLMConfig(vision=CLIP, llm=LLM, projector="mlp2", projector_hidden=17, image_token_id=IMG, max_frames=4,
                 temporal_pool=2)


def _images(n, h=15, w=15, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, h, w, 3)), jnp.float32)


def _vit_params(cfg, images):
  return _random_params(jax.eval_shape(ViT(cfg).init, jax.random.key(0), images)["params"])


def _random_params(abstract, seed=0):
  """Random values for an abstract param tree, drawn in numpy (compiling a real init costs seconds
  on CPU): N(0, 0.2), and 1 + N(0, 0.1) for norm scales."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(nn.meta.unbox(abstract))
  out = {k: (1.0 if k[-1] == "scale" else 0.0) + (0.1 if k[-1] == "scale" else 0.2) * rng.normal(size=v.shape)
         for k, v in flat.items()}
  return traverse_util.unflatten_dict({k: jnp.asarray(v, flat[k].dtype) for k, v in out.items()})


def _perturb(tree, scale, seed):
  """tree + scale * N(0, 1), drawn in numpy (no per-shape compiles)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: x + scale * rng.normal(size=x.shape).astype(np.float32), tree)


def _fresh_adapter(params, targets, rank):
  """`lora.init`'s tree (paths, shapes) with `a` drawn in numpy and `b` = 0: compiling the real
  init's ~100 random draws takes seconds on CPU, and `b` = 0 is what makes an adapter fresh."""
  abstract = jax.eval_shape(lambda p: lora.init(jax.random.key(1), p, targets, rank), params)
  rng = np.random.default_rng(3)
  flat = traverse_util.flatten_dict(abstract)
  return traverse_util.unflatten_dict(
      {k: jnp.asarray(rng.uniform(-0.3, 0.3, v.shape) if k[-1] == "a" else np.zeros(v.shape), v.dtype)
       for k, v in flat.items()})


# ---------------------------------------------------------------------------------------------
# ViT

def _shapes(tree):
  return jax.tree.map(lambda x: x.shape, nn.meta.unbox(tree))


def test_vit_param_tree_and_shapes():
  imgs = jax.ShapeDtypeStruct((2, 15, 15, 3), jnp.float32)
  shapes = _shapes(jax.eval_shape(ViT(CLIP).init, jax.random.key(0), imgs)["params"])
  assert set(shapes) == {"patch_embedding", "class_embedding", "position_embedding", "pre_layernorm",
                         "layers_0", "layers_1", "post_layernorm"}
  assert shapes["patch_embedding"] == {"kernel": (75, 21)}
  assert shapes["position_embedding"] == (10, 21)
  assert shapes["layers_1"]["self_attn"]["q_proj"] == {"kernel": (21, 21), "bias": (21,)}
  assert shapes["layers_1"]["mlp"] == {"fc1": {"kernel": (21, 23), "bias": (23,)},
                                       "fc2": {"kernel": (23, 21), "bias": (21,)}}
  sig = _shapes(jax.eval_shape(ViT(SIGLIP).init, jax.random.key(0), imgs)["params"])
  assert sig["patch_embedding"] == {"kernel": (75, 21), "bias": (21,)}
  assert sig["position_embedding"] == (9, 21)
  assert set(sig["head"]) == {"probe", "attention", "layernorm", "mlp"}
  assert "class_embedding" not in sig and "pre_layernorm" not in sig

  for cfg, n in ((CLIP, 10), (SIGLIP, 9)):
    out = jax.eval_shape(lambda x, cfg=cfg: ViT(cfg).init_with_output(jax.random.key(0), x)[0], imgs)
    assert out["tokens"].shape == (2, n, 21) and out["pooled"].shape == (2, 21)


def test_vit_variants_bf16_and_remat():
  """SwiGLU + layer scale + sincos positions + mean pooling, on a 4x2 grid; bf16 compute over
  fp32 params; the remat-wrapped blocks trace under grad."""
  cfg = ViTConfig(**{**SIZES, "d_model": 28, "head_dim": 9}, class_token=False, pos_embed="sincos",
                  pool="mean", post_norm="tokens", mlp="swiglu", act="silu", layer_scale=0.1, dtype="bfloat16")
  imgs = _images(2, 20, 10)
  params = _vit_params(cfg, imgs)
  assert params["layers_0"]["layer_scale1"].dtype == jnp.float32
  assert set(params["layers_0"]["mlp"]) == {"fc1", "gate_proj", "fc2"}
  out = jax.jit(ViT(cfg).apply)({"params": params}, imgs)
  assert out["tokens"].shape == (2, 8, 28) and out["tokens"].dtype == jnp.bfloat16
  assert np.isfinite(np.asarray(out["pooled"], np.float32)).all()
  model = ViT(dataclasses.replace(cfg, remat="full"))
  grads = jax.eval_shape(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, imgs)["pooled"] ** 2)), params)
  assert _shapes(grads) == _shapes(params)


def test_position_interpolation():
  import torch
  # Same grid: the table is returned as is; the resampling matrix of n -> n is the identity.
  table = jax.random.normal(jax.random.key(3), (9, 21))
  assert vit_lib.interpolate_table(table, (3, 3)) is table
  np.testing.assert_array_equal(vit_lib._interp_matrix(3, 3, "bicubic"), np.eye(3))
  # Another grid: equals torch's F.interpolate (what HF `interpolate_pos_encoding` uses).
  for method in ("bicubic", "bilinear"):
    ref = torch.nn.functional.interpolate(torch.tensor(np.asarray(table)).reshape(1, 3, 3, 21).permute(0, 3, 1, 2),
                                          size=(5, 4), mode=method, align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(20, 21).numpy()
    np.testing.assert_allclose(vit_lib.interpolate_table(table, (5, 4), method), ref, atol=1e-5, rtol=1e-6)
  # In the model: with a zero patch kernel and no pre-norm, the embeddings entering the blocks
  # are exactly the (interpolated) position table, class row kept.
  cfg = dataclasses.replace(CLIP, pre_norm=False)
  params = _vit_params(cfg, _images(1))
  params["patch_embedding"]["kernel"] = jnp.zeros_like(params["patch_embedding"]["kernel"])
  params["class_embedding"] = jnp.zeros_like(params["class_embedding"])
  pos = params["position_embedding"]
  apply = jax.jit(lambda p, x: ViT(cfg).apply({"params": p}, x, return_hidden=True))
  same = apply(params, _images(1))["hidden"][0][0]
  np.testing.assert_array_equal(same, pos)
  big = apply(params, _images(1, 25, 20))
  assert big["tokens"].shape == (1, 21, 21)
  np.testing.assert_array_equal(big["hidden"][0][0, 0], pos[0])
  np.testing.assert_allclose(big["hidden"][0][0, 1:], vit_lib.interpolate_table(pos[1:], (5, 4)), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Parity with Hugging Face. The mapping below is the layout documented in mmjax/models/vit.py.

def _hf_to_params(sd, cfg):
  sd = {k: v.detach().numpy() for k, v in sd.items()}
  lin = lambda p: {"kernel": sd[p + ".weight"].T, "bias": sd[p + ".bias"]}
  ln = lambda p: {"scale": sd[p + ".weight"], "bias": sd[p + ".bias"]}
  w = sd["embeddings.patch_embedding.weight"]  # [D, C, kh, kw]
  out = {"patch_embedding": {"kernel": w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])},
         "position_embedding": sd["embeddings.position_embedding.weight"],
         "post_layernorm": ln("post_layernorm")}
  if cfg.patch_bias:
    out["patch_embedding"]["bias"] = sd["embeddings.patch_embedding.bias"]
  if cfg.class_token:
    out["class_embedding"] = sd["embeddings.class_embedding"]
  if cfg.pre_norm:
    out["pre_layernorm"] = ln("pre_layrnorm")
  for i in range(cfg.n_layers):
    p = f"encoder.layers.{i}."
    out[f"layers_{i}"] = {
        "layer_norm1": ln(p + "layer_norm1"), "layer_norm2": ln(p + "layer_norm2"),
        "self_attn": {m: lin(p + "self_attn." + m) for m in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "mlp": {m: lin(p + "mlp." + m) for m in ("fc1", "fc2")}}
  if cfg.pool == "map":
    qw, kw, vw = np.split(sd["head.attention.in_proj_weight"], 3)
    qb, kb, vb = np.split(sd["head.attention.in_proj_bias"], 3)
    out["head"] = {
        "probe": sd["head.probe"], "layernorm": ln("head.layernorm"),
        "attention": {"q_proj": {"kernel": qw.T, "bias": qb}, "k_proj": {"kernel": kw.T, "bias": kb},
                      "v_proj": {"kernel": vw.T, "bias": vb}, "out_proj": lin("head.attention.out_proj")},
        "mlp": {m: lin("head.mlp." + m) for m in ("fc1", "fc2")}}
  return jax.tree.map(jnp.asarray, out)


def _randomize(model):
  import torch
  torch.manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.3 + (1.0 if ("norm" in name and name.endswith("weight")) else 0.0))
  return model.eval()


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_hf_parity(family):
  import torch
  import transformers as tf
  kw = dict(hidden_size=21, intermediate_size=23, num_hidden_layers=2, num_attention_heads=3, image_size=15,
            patch_size=5)
  if family == "clip":
    cfg, hf = CLIP, tf.CLIPVisionModel(tf.CLIPVisionConfig(**kw, hidden_act="quick_gelu", layer_norm_eps=1e-5))
  else:
    cfg, hf = SIGLIP, tf.SiglipVisionModel(tf.SiglipVisionConfig(**kw, hidden_act="gelu_pytorch_tanh",
                                                                   layer_norm_eps=1e-6))
  hf = _randomize(hf)
  params = _hf_to_params(hf.state_dict(), cfg)
  assert _shapes(params) == _shapes(jax.eval_shape(ViT(cfg).init, jax.random.key(0), _images(1))["params"])
  apply = jax.jit(ViT(cfg).apply)
  for h, w in [(15, 15), (25, 15)]:  # the second resamples the position table (HF interpolate_pos_encoding)
    imgs = _images(2, h, w, seed=h)
    with torch.no_grad():
      ref = hf(torch.tensor(np.asarray(imgs)).permute(0, 3, 1, 2), interpolate_pos_encoding=(h, w) != (15, 15))
    out = apply({"params": params}, imgs)
    np.testing.assert_allclose(out["tokens"], ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out["pooled"], ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# VLM

N_IMG = vlm_lib.num_visual_tokens(VCFG, "image")  # 9 patches (class token dropped)
T = 19


def _tokens():
  """Row 0 text only; rows 1 and 2 hold one image's placeholders at different offsets."""
  tok = np.random.default_rng(1).integers(1, IMG, size=(3, T))
  tok[1, 2:2 + N_IMG] = IMG
  tok[2, 7:7 + N_IMG] = IMG
  return jnp.asarray(tok, jnp.int32)


@jax.jit
def _vlm_apply(variables, tokens, images):
  return VLM(VCFG).apply(variables, tokens, images=images)


@pytest.fixture(scope="module")
def vlm_params():
  return _random_params(jax.eval_shape(VLM(VCFG).init, jax.random.key(0), _tokens(), images=_images(3))["params"])


def test_vlm_tree_shapes_and_dtypes(vlm_params):
  assert N_IMG == 9 and vlm_lib.num_visual_tokens(VCFG, "video") == 18
  assert set(vlm_params) == {"vision", "projector", "llm"}
  assert _shapes(vlm_params["projector"]) == {
      "temporal_embedding": (4, 21), "linear_1": {"kernel": (21, 17), "bias": (17,)},
      "linear_2": {"kernel": (17, 22), "bias": (22,)}}
  assert _shapes(vlm_params["llm"]) == _shapes(jax.eval_shape(Llama(LLM).init, jax.random.key(0), _tokens())["params"])
  # init from tokens alone builds the same tree (and the same dtypes).
  tokens_only = nn.meta.unbox(jax.eval_shape(VLM(VCFG).init, jax.random.key(0), _tokens())["params"])
  spec = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  assert spec(tokens_only) == spec(vlm_params)
  # bf16 compute over fp32 params: finite float32 logits.
  cfg = dataclasses.replace(VCFG, vision=dataclasses.replace(CLIP, dtype="bfloat16"),
                            llm=dataclasses.replace(LLM, dtype="bfloat16"))
  logits = jax.jit(VLM(cfg).apply)({"params": vlm_params}, _tokens(), images=_images(3))
  assert logits.shape == (3, T, 61) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_splice_puts_visual_embeddings_at_placeholders(vlm_params):
  tokens, imgs = _tokens(), _images(3)
  seg = jnp.ones_like(tokens)
  pos = jnp.broadcast_to(jnp.arange(T), tokens.shape)

  def parts(m):
    x = m.embed(tokens, images=imgs)
    h, _ = m.hidden(x, pos, layers.attention_mask(seg, seg, True))  # what a sampler's prefill does
    return x, m.encode_images(imgs), m.embed_tokens(tokens), m.logits(h)
  x, visual, text, logits = jax.jit(lambda p: VLM(VCFG).apply({"params": p}, method=parts))(vlm_params)
  assert visual.shape == (3, N_IMG, 22)
  np.testing.assert_array_equal(x[0], text[0])
  np.testing.assert_array_equal(x[1, 2:2 + N_IMG], visual[1])
  np.testing.assert_array_equal(x[2, 7:7 + N_IMG], visual[2])
  keep = np.asarray(tokens) != IMG
  np.testing.assert_array_equal(np.asarray(x)[keep], np.asarray(text)[keep])
  np.testing.assert_allclose(logits, _vlm_apply({"params": vlm_params}, tokens, imgs), atol=1e-6)
  # The pure splice against a naive loop, several media per row.
  rng = np.random.default_rng(2)
  tok = rng.integers(0, 3, size=(2, 12))
  vis = rng.normal(size=(2, 12, 5)).astype(np.float32)
  base = rng.normal(size=(2, 12, 5)).astype(np.float32)
  want = base.copy()
  for b in range(2):
    for k, t in enumerate(np.flatnonzero(tok[b] == 0)):
      want[b, t] = vis[b, k]
  np.testing.assert_array_equal(vlm_lib.splice(jnp.asarray(base), jnp.asarray(tok), jnp.asarray(vis), 0), want)


def test_lora_on_tower_changes_only_media_rows(vlm_params):
  tokens, imgs = _tokens(), _images(3)
  assert set(_fresh_adapter(vlm_params, r"vision/.*", 3)) == {"vision"}
  base = _vlm_apply({"params": vlm_params}, tokens, imgs)
  fresh = _fresh_adapter(vlm_params, r"(vision|projector|llm)/.*", 3)
  assert set(fresh) == {"vision", "projector", "llm"}
  assert "patch_embedding" in fresh["vision"] and "q_proj" in fresh["vision"]["layers_0"]["self_attn"]
  np.testing.assert_array_equal(_vlm_apply({"params": vlm_params, "lora": fresh}, tokens, imgs), base)

  # Non-zero adapters on the tower only (the others keep b = 0; same tree, so no recompile).
  tower = dict(fresh, vision=_perturb(fresh["vision"], 0.1, 5))
  out = _vlm_apply({"params": vlm_params, "lora": tower}, tokens, imgs)
  np.testing.assert_array_equal(out[0], base[0])  # the text-only row
  for r, start in ((1, 2), (2, 7)):
    np.testing.assert_array_equal(out[r, :start], base[r, :start])  # causal: before the image
    assert np.abs(np.asarray(out[r, start:] - base[r, start:])).max() > 1e-3


def test_video_temporal_pooling_and_mixed_media(vlm_params):
  frames = jnp.asarray(np.random.default_rng(4).normal(size=(2, 4, 15, 15, 3)), jnp.float32)
  n_vid = vlm_lib.num_visual_tokens(VCFG, "video")
  assert n_vid == (4 // 2) * 9
  assert vlm_lib.num_visual_tokens(VCFG, "video", n_frames=2) == 9
  # A non-zero temporal embedding so the check sees it.
  params = dict(vlm_params, projector=dict(vlm_params["projector"],
                                           temporal_embedding=jax.random.normal(jax.random.key(7), (4, 21))))
  # One image then one video per row: placeholders are filled images first, then videos.
  tok = np.random.default_rng(5).integers(1, IMG, size=(2, 3 + N_IMG + n_vid))
  tok[:, 1:1 + N_IMG + n_vid] = IMG
  tok = jnp.asarray(tok, jnp.int32)
  imgs = _images(2)

  def parts(m):
    # Reference for the video: per-frame features + temporal embedding, averaged in pairs, projected.
    f = m.frame_features(frames.reshape(8, 15, 15, 3)).reshape(2, 4, 9, 21)
    f = f + m.projector.temporal_embedding[None, :, None]
    want = m.projector(f.reshape(2, 2, 2, 9, 21).mean(2).reshape(2, 18, 21))
    return (m.encode_frames(frames), want, m.encode_images(imgs), m.embed(tok, images=imgs, frames=frames),
            m(tok, images=imgs, frames=frames))
  vis, want, img_vis, x, logits = jax.jit(lambda p: VLM(VCFG).apply({"params": p}, method=parts))(params)
  assert vis.shape == (2, n_vid, 22)
  np.testing.assert_allclose(vis, want, atol=1e-5)
  np.testing.assert_array_equal(x[:, 1:1 + N_IMG], img_vis)
  np.testing.assert_array_equal(x[:, 1 + N_IMG:1 + N_IMG + n_vid], vis)
  assert logits.shape == (2, tok.shape[1], 61) and np.isfinite(np.asarray(logits)).all()
  with pytest.raises(ValueError, match="temporal_pool"):
    jax.eval_shape(lambda p: VLM(VCFG).apply({"params": p}, frames[:, :3], method=VLM.encode_frames), params)


def test_config_validation():
  with pytest.raises(ValueError, match="image_token_id"):
    VLMConfig(vision=CLIP, llm=LLM, image_token_id=61)
  with pytest.raises(ValueError, match="temporal_pool"):
    VLMConfig(vision=CLIP, llm=LLM, image_token_id=IMG, max_frames=5, temporal_pool=2)
  with pytest.raises(ValueError, match="class_token"):
    ViTConfig(class_token=False, pool="cls")
  cfg = VLMConfig.from_dict(dict(vision=dataclasses.asdict(SIGLIP), llm=dataclasses.asdict(LLM), image_token_id=IMG,
                                 feature="all", feature_layer=-2))
  assert cfg.vision == SIGLIP and vlm_lib.num_visual_tokens(cfg, "image", image_size=(25, 15)) == 15


def test_builtin_vlm_with_a_separate_video_tower():
  """config.vlm.video_tower=True gives the built-in VLM a second ViT for frames, so LoRA
  targets and trainable regexes can name the image and the video path apart."""
  import importlib.util
  from mmjax import sharding
  from mmjax.config import core
  from mmjax.data.tokenizer import load_tokenizer
  from mmjax.train import run as run_lib
  spec = importlib.util.spec_from_file_location("cfg", "configs/shapes_directed.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = core.stage_config(mod.get_config("scale=0.02"), "full")
  assert config.vlm.video_tower
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = run_lib.build(config, mesh, load_tokenizer(config.data.tokenizer))
  variables = run.abstract_state.variables
  params, lora = variables["params"], variables["lora"]
  assert {"vision", "video_tower", "projector", "llm"} <= set(params)
  assert _shapes(params["video_tower"]) == _shapes(params["vision"])
  assert {"vision", "video_tower"} <= set(lora)  # ALL_PROJECTIONS reach both towers
  # the video-only arm's trainable regexes pick the video path's leaves only (no image-tower adapter)
  trainable = run.abstract_state.trainable
  assert "video_tower" in trainable["lora"] and "vision" not in trainable["lora"]
  assert run.model_cfg.video_tower
