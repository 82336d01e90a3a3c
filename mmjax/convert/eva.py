"""timm EVA / EVA-02 vision towers (EVA-CLIP's image encoders) -> mmjax (`mmjax.models.vit.ViT`).

A directory holds timm's `config.json` (`"architecture"`: a timm model name, and optionally
`"model_args"` overriding its arguments) and `model.safetensors` (timm's state dict; an
open_clip checkpoint's `visual.trunk.` / `visual.` prefix is accepted). Known architectures:
the `eva02_{tiny,small,base,large}_patch14_{224,448}` family, EVA-02-CLIP
(`eva02_{base_patch16,large_patch14}_clip_{224,336}`) and EVA-CLIP g
(`eva_giant_patch14_{224,336,clip_224}`); any other `eva*` name needs its `model_args`.
Torch is never imported.

Layouts (timm's `Eva` with class token, learned absolute positions, pre-norm blocks, no
register tokens): EVA-02 adds a 2-D rotary embedding ('cat' type, positions scaled to
`ref_feat_shape`), SwiGLU MLPs (fused `fc1` = [gate; value] without `scale_mlp`, or
`fc1_g` / `fc1_x` with a sub-LN before `fc2`), an optional sub-LN before the attention
output projection (`scale_attn_inner`), q and v biases (no k bias), layer scale when
`init_values` is set. Pooling: 'token' (EVA-CLIP: every token normed by `norm`) or 'avg'
(the mean patch token normed by `fc_norm`).

Names: cls_token [1, 1, D] -> class_embedding; pos_embed [1, N + 1, D] -> position_embedding;
patch_embed.proj -> patch_embedding; blocks.{i}.norm1 / norm2 -> layers_{i}/layer_norm1 / 2;
attn.qkv [3D, D] (+ q_bias, v_bias) or attn.{q,k,v}_proj -> self_attn/{q,k,v}_proj; attn.norm
-> self_attn/norm; attn.proj -> self_attn/out_proj; gamma_1 / gamma_2 -> layer_scale1 / 2;
mlp.fc1 (fused halves) or mlp.fc1_g / fc1_x -> mlp/gate_proj / fc1; mlp.norm; mlp.fc2;
norm or fc_norm -> post_layernorm. The classifier `head` and rope buffers are not read.
"""
from __future__ import annotations

import dataclasses

from mmjax import sharding
from mmjax.convert import safetensors_io as stio
from mmjax.convert import vision as convert_vision
from mmjax.convert.common import Tensor, check_file, read_json, read_params, unsupported
from mmjax.models.vit import ViTConfig

_EVA02 = dict(mlp_ratio=4 * 2 / 3, swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
_EVA02_LARGE = dict(_EVA02, qkv_fused=False, scale_mlp=True)
_EVA02_CLIP = dict(_EVA02_LARGE, scale_attn_inner=True, global_pool="token")
_EVA_G = dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408)
VARIANTS = {  # timm's registry arguments
    "eva02_tiny_patch14_224": dict(_EVA02, img_size=224, patch_size=14, embed_dim=192, depth=12, num_heads=3),
    "eva02_small_patch14_224": dict(_EVA02, img_size=224, patch_size=14, embed_dim=384, depth=12, num_heads=6),
    "eva02_base_patch14_224": dict(_EVA02_LARGE, img_size=224, patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "eva02_large_patch14_224": dict(_EVA02_LARGE, img_size=224, patch_size=14, embed_dim=1024, depth=24,
                                    num_heads=16),
    "eva02_base_patch14_448": dict(_EVA02_LARGE, img_size=448, patch_size=14, embed_dim=768, depth=12, num_heads=12),
    "eva02_large_patch14_448": dict(_EVA02_LARGE, img_size=448, patch_size=14, embed_dim=1024, depth=24,
                                    num_heads=16),
    "eva02_base_patch16_clip_224": dict(_EVA02_CLIP, img_size=224, patch_size=16, embed_dim=768, depth=12,
                                        num_heads=12),
    "eva02_large_patch14_clip_224": dict(_EVA02_CLIP, img_size=224, patch_size=14, embed_dim=1024, depth=24,
                                         num_heads=16),
    "eva02_large_patch14_clip_336": dict(_EVA02_CLIP, img_size=336, patch_size=14, embed_dim=1024, depth=24,
                                         num_heads=16),
    "eva_giant_patch14_224": dict(_EVA_G, img_size=224),
    "eva_giant_patch14_336": dict(_EVA_G, img_size=336),
    "eva_giant_patch14_clip_224": dict(_EVA_G, img_size=224, global_pool="token"),
}
_DEFAULTS = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12, num_heads=12, qkv_bias=True,
                 qkv_fused=True, mlp_ratio=4.0, swiglu_mlp=False, scale_mlp=False, scale_attn_inner=False,
                 class_token=True, num_reg_tokens=0, use_abs_pos_emb=True, use_rot_pos_emb=False,
                 ref_feat_shape=None, init_values=None, global_pool="avg", use_fc_norm=None, use_post_norm=False,
                 use_pre_transformer_norm=False, qk_norm=False, gated_attn=False, rope_type="cat",
                 rope_rotate_half=False, rope_grid_offset=0.0, rope_temperature=10000.0, attn_type="eva",
                 num_kv_heads=None, no_embed_class=False, attn_head_dim=None, dynamic_img_size=False)
# Arguments mmjax reproduces only at these values (anything else is a one-line error).
_FIXED = dict(class_token=True, num_reg_tokens=0, use_abs_pos_emb=True, use_post_norm=False,
              use_pre_transformer_norm=False, qk_norm=False, gated_attn=False, rope_type="cat", rope_rotate_half=False,
              rope_grid_offset=0.0, attn_type="eva", num_kv_heads=None, no_embed_class=False, attn_head_dim=None)


def is_eva(hf: dict) -> bool:
  """Whether a config.json dict is a timm EVA model."""
  return isinstance(hf.get("architecture"), str) and hf["architecture"].startswith("eva")


def _args(hf: dict) -> dict:
  arch = hf.get("architecture")
  if arch not in VARIANTS and not hf.get("model_args"):
    unsupported("architecture", arch, ", ".join(VARIANTS) + " (or any eva* name with its model_args)")
  a = {**_DEFAULTS, **VARIANTS.get(arch, {}), **(hf.get("model_args") or {})}
  for key, want in _FIXED.items():
    if a.get(key) != want:
      unsupported(f"model_args.{key}", a.get(key), repr(want))
  if a["global_pool"] not in ("token", "avg"):
    unsupported("model_args.global_pool", a["global_pool"], "'token', 'avg'")
  return a


def vit_config_from_eva(hf: dict) -> ViTConfig:
  """`ViTConfig` of a timm EVA config.json (see the module docstring)."""
  a = _args(hf)
  img = a["img_size"][0] if isinstance(a["img_size"], (list, tuple)) else a["img_size"]
  d, heads = int(a["embed_dim"]), int(a["num_heads"])
  if d % heads:
    unsupported("model_args.num_heads", heads, f"a divisor of embed_dim={d}")
  fc_norm = a["use_fc_norm"] if a["use_fc_norm"] is not None else a["global_pool"] == "avg"
  if fc_norm != (a["global_pool"] == "avg"):
    unsupported("model_args.use_fc_norm", a["use_fc_norm"], "the default for the pool (norm tokens for 'token', "
                "the pooled mean for 'avg')")
  ref = a["ref_feat_shape"]
  ref = ref[0] if isinstance(ref, (list, tuple)) else ref
  if isinstance(a["ref_feat_shape"], (list, tuple)) and a["ref_feat_shape"][0] != a["ref_feat_shape"][1]:
    unsupported("model_args.ref_feat_shape", a["ref_feat_shape"], "a square grid")
  return ViTConfig(
      image_size=int(img), patch_size=int(a["patch_size"]), num_channels=int(a["in_chans"]), d_model=d,
      n_layers=int(a["depth"]), n_heads=heads, head_dim=d // heads, mlp_dim=int(d * a["mlp_ratio"]), norm_eps=1e-6,
      patch_bias=True, class_token=True, pos_embed="learned", pre_norm=False,
      post_norm="tokens" if a["global_pool"] == "token" else "pooled",
      pool="cls" if a["global_pool"] == "token" else "mean", act="silu" if a["swiglu_mlp"] else "gelu",
      mlp="swiglu" if a["swiglu_mlp"] else "standard",
      layer_scale=float(a["init_values"]) if a["init_values"] is not None else None,
      attn_bias=bool(a["qkv_bias"]), k_bias=False, mlp_bias=True, attn_norm=bool(a["scale_attn_inner"]),
      mlp_norm=bool(a["scale_mlp"]), rope=bool(a["use_rot_pos_emb"]), rope_grid=int(ref or 0),
      rope_theta=float(a["rope_temperature"]))


def _name(path: str, a: dict, cfg: ViTConfig) -> tuple[str, str, dict]:
  """mmjax param path -> (timm tensor name, kind, extra Tensor fields)."""
  d, h = cfg.d_model, cfg.mlp_dim
  top = {"class_embedding": ("cls_token", "reshape"), "position_embedding": ("pos_embed", "reshape"),
         "patch_embedding/kernel": ("patch_embed.proj.weight", "conv"),
         "patch_embedding/bias": ("patch_embed.proj.bias", "copy")}
  if path in top:
    return (*top[path], {})
  if path.startswith("post_layernorm/"):
    norm = "norm" if cfg.post_norm == "tokens" else "fc_norm"
    return f"{norm}.{'weight' if path.endswith('scale') else 'bias'}", "copy", {}
  i, rest = path.split("/", 1)
  block = f"blocks.{i.removeprefix('layers_')}."
  if rest in ("layer_scale1", "layer_scale2"):
    return block + f"gamma_{rest[-1]}", "copy", {}
  module, leaf = rest.rsplit("/", 1)
  leaf_name = "bias" if leaf == "bias" else "weight"
  kind = "T" if leaf == "kernel" else "copy"
  if module in ("layer_norm1", "layer_norm2"):
    return block + f"norm{module[-1]}.{leaf_name}", kind, {}
  if module.startswith("self_attn/"):
    sub = module[len("self_attn/"):]
    if sub in ("q_proj", "k_proj", "v_proj") and a["qkv_fused"]:
      if leaf == "bias":
        return block + f"attn.{sub[0]}_bias", "copy", {}
      return block + "attn.qkv.weight", "part", dict(part="qkv".index(sub[0]), parts=3, d=d)
    return block + "attn." + ("proj" if sub == "out_proj" else sub) + f".{leaf_name}", kind, {}
  sub = module[len("mlp/"):]
  if cfg.mlp == "swiglu" and not cfg.mlp_norm and sub in ("gate_proj", "fc1"):  # GluMlp: fc1 = [gate; value]
    extra = dict(part=0 if sub == "gate_proj" else 1, parts=2, d=h)
    return block + f"mlp.fc1.{leaf_name}", "part", extra
  if cfg.mlp == "swiglu" and sub in ("gate_proj", "fc1"):  # SwiGLU: fc1_g (gate), fc1_x (value)
    return block + f"mlp.{'fc1_g' if sub == 'gate_proj' else 'fc1_x'}.{leaf_name}", kind, {}
  return block + f"mlp.{sub}.{leaf_name}", kind, {}


def tensor_plan(cfg: ViTConfig, a: dict, prefix: str = "") -> list[Tensor]:
  plan = []
  for p, s in sorted(convert_vision.param_specs(cfg)[0].items()):
    name, kind, extra = _name(p, a, cfg)
    shape = tuple(s.shape)
    if kind == "T":
      hf_shape = shape[::-1]
    elif kind == "conv":
      hf_shape = (cfg.d_model, cfg.num_channels, cfg.patch_size, cfg.patch_size)
    elif kind == "reshape":
      hf_shape = (1,) + shape if p == "position_embedding" else (1, 1) + shape
    elif kind == "part":
      hf_shape = (extra["parts"] * extra["d"],) + (shape[:1] if len(shape) == 2 else ())
    else:
      hf_shape = shape
    plan.append(Tensor(p, prefix + name, kind, shape, hf_shape, patch=cfg.patch_size, channels=cfg.num_channels,
                       **extra))
  return plan


def import_eva(path: str, *, mesh=None, rules=sharding.DEFAULT_RULES, dtype: str = "float32"
               ) -> tuple[ViTConfig, dict]:
  """(cfg, params) of a timm EVA directory for `ViT(cfg)`, each tensor placed in its sharding
  as it is read; missing, unexpected and mis-shaped tensors are one-line ValueErrors."""
  hf = read_json(path, "config.json")
  a = _args(hf)
  cfg = dataclasses.replace(vit_config_from_eva(hf), dtype=dtype, param_dtype=dtype)
  with stio.open_dir(path) as reader:
    prefix = next((p for p in ("visual.trunk.", "visual.") if p + "pos_embed" in reader.tensors), "")
    plan = tensor_plan(cfg, a, prefix)
    check_file(path, reader, plan, f"timm {hf['architecture']} with this config.json",
               owned=lambda n: n.startswith(prefix),
               ignored=lambda n: n.startswith((prefix + "head.", prefix + "rope.")) or n.endswith("k_bias"))
    params = read_params(reader, plan, convert_vision.param_specs(cfg)[1], mesh, rules, stio.np_dtype(dtype))
  return cfg, params
