"""Vision Transformer encoder (CLIP, SigLIP, EVA-CLIP layouts) as a Linen module.

Variables: `params` and, optionally, `lora` (adapters at the dense layers' paths, see
`mmjax.lora`). Module paths mirror Hugging Face `CLIPVisionModel` / `SiglipVisionModel`
so converters and LoRA regexes read naturally:

  patch_embedding/{kernel [p*p*C, D], bias?}   conv as a dense over flattened patches
  class_embedding [D]                           (class_token=True)
  position_embedding [P(+1), D]                 (pos_embed='learned'; row 0 is the class token's)
  pre_layernorm/{scale, bias}                   (pre_norm=True; HF CLIP `pre_layrnorm`)
  layers_{i}/{layer_norm1, self_attn/{q,k,v}_proj, self_attn/norm?, self_attn/out_proj, layer_scale1?,
             layer_norm2, mlp/{fc1, gate_proj?, norm?, fc2}, layer_scale2?}
  post_layernorm/{scale, bias}                  (post_norm != 'none')
  head/{probe [1, 1, D], attention/{q,k,v,out}_proj, layernorm, mlp/{fc1, fc2}}  (pool='map')

Patch layout: an image [B, H, W, C] is cut into a (H/p) x (W/p) grid of patches, row-major
(as HF flattens the conv output), and each patch is flattened in (kh, kw, C) order. A HF
conv weight `w` [D, C, kh, kw] therefore maps to `kernel = w.transpose(2, 3, 1, 0).reshape(-1, D)`.
HF linear weights [out, in] map to `kernel = w.T`. SigLIP's MAP head packs q/k/v in
`attention.in_proj_weight` [3D, D]: split it in three (q, k, v) and transpose each.

EVA / EVA-02 options (timm's `Eva`): `rope=True` rotates the patch tokens' queries and keys
by a 2-D rotary embedding (interleaved pairs, the first half of each head's pairs by the
patch row, the second by the column; positions scaled to a `rope_grid` x `rope_grid` grid
when set, as timm's `ref_feat_shape`), `k_bias=False` drops the key bias (EVA has q and v
biases), `attn_norm` / `mlp_norm` add the sub-LN LayerNorms inside attention (before
out_proj) and the MLP (before fc2), `layer_scale` the residual scales.

Axis letters as in `mmjax.models.layers`; P is the number of patches.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from mmjax.models import layers
from mmjax.models.llama import DTYPES, REMAT_POLICIES

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # HF gelu_pytorch_tanh (SigLIP)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Model config of the vision tower (not the run config). Defaults are CLIP-like and tiny."""
  image_size: int = 32  # square size the position table was trained for
  patch_size: int = 8
  num_channels: int = 3
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  norm_eps: float = 1e-5  # CLIP 1e-5, SigLIP 1e-6
  patch_bias: bool = False  # CLIP False, SigLIP True
  class_token: bool = True
  pos_embed: str = "learned"  # 'learned', 'sincos' (2-D, fixed) or 'none'
  pos_interpolation: str = "bicubic"  # 'bicubic' or 'bilinear' (as torch, align_corners=False)
  pre_norm: bool = True  # LayerNorm before the blocks (CLIP `pre_layrnorm`)
  post_norm: str = "pooled"  # 'tokens' (SigLIP: all tokens), 'pooled' (CLIP: pooled output only), 'none'
  pool: str = "cls"  # 'cls', 'map' (SigLIP attention-pooling head), 'mean' (over patch tokens), 'none'
  act: str = "quick_gelu"  # a key of ACTIVATIONS
  mlp: str = "standard"  # 'standard' (fc1, act, fc2) or 'swiglu' (fc2(act(gate_proj(x)) * fc1(x)))
  layer_scale: float | None = None  # init value of per-channel residual scales, None = off
  attn_bias: bool = True  # biases on q/k/v/out projections
  mlp_bias: bool = True
  k_bias: bool = True  # with attn_bias: a bias on k_proj too (EVA: q and v biases only)
  attn_norm: bool = False  # LayerNorm on the attention output before out_proj (EVA-02 sub-LN)
  mlp_norm: bool = False  # LayerNorm on the MLP's hidden state before fc2 (EVA-02 sub-LN)
  rope: bool = False  # 2-D rotary embedding of the patch tokens' queries and keys (EVA-02)
  rope_grid: int = 0  # patch grid the rotary positions are scaled to (timm ref_feat_shape); 0 = the actual grid
  rope_theta: float = 10000.0
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # a key of REMAT_POLICIES
  attention: str = "auto"  # see layers.dot_product_attention
  lora_alpha: float = 16.0
  lora_rslora: bool = False
  lora_dropout: float = 0.0

  def __post_init__(self):
    checks = [
        ("pos_embed", self.pos_embed, ("learned", "sincos", "none")),
        ("pos_interpolation", self.pos_interpolation, ("bicubic", "bilinear")),
        ("post_norm", self.post_norm, ("tokens", "pooled", "none")),
        ("pool", self.pool, ("cls", "map", "mean", "none")),
        ("act", self.act, tuple(ACTIVATIONS)),
        ("mlp", self.mlp, ("standard", "swiglu")),
        ("remat", self.remat, tuple(REMAT_POLICIES)),
        ("dtype", self.dtype, tuple(DTYPES)),
        ("param_dtype", self.param_dtype, tuple(DTYPES)),
    ]
    for key, value, valid in checks:
      if value not in valid:
        raise ValueError(f"vit.{key}={value!r} is not one of {valid}")
    if self.pool == "cls" and not self.class_token:
      raise ValueError("vit.pool='cls' needs vit.class_token=True")
    if self.pos_embed == "sincos" and self.d_model % 4:
      raise ValueError(f"vit.pos_embed='sincos' needs d_model divisible by 4, got {self.d_model}")
    if self.rope and self.head_dim % 4:
      raise ValueError(f"vit.rope=True needs head_dim divisible by 4 (two axes of pairs), got {self.head_dim}")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def grid(self) -> int:
    """Side of the patch grid the position table is stored for."""
    return self.image_size // self.patch_size

  def num_patches(self, image_size: int | tuple[int, int] | None = None) -> int:
    h, w = _hw(image_size if image_size is not None else self.image_size)
    return (h // self.patch_size) * (w // self.patch_size)

  def dense(self, features, axes, name, use_bias=False):
    return layers.LoraDense(
        features, axes, use_bias=use_bias, dtype=self.compute_dtype, param_dtype=self.weight_dtype,
        lora_alpha=self.lora_alpha, lora_rslora=self.lora_rslora, lora_dropout=self.lora_dropout,
        name=name)

  def norm(self, name):
    return LayerNorm(self.norm_eps, self.compute_dtype, self.weight_dtype, name=name)

  @classmethod
  def from_dict(cls, d) -> "ViTConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in fields})


# Layout flags of the two families the converters target; combine with sizes, e.g.
# ViTConfig(**CLIP_LAYOUT, image_size=336, patch_size=14, d_model=1024, n_layers=24, n_heads=16,
#           head_dim=64, mlp_dim=4096)                                # CLIP ViT-L/14-336 (LLaVA)
# ViTConfig(**SIGLIP_LAYOUT, image_size=384, patch_size=14, d_model=1152, n_layers=27, n_heads=16,
#           head_dim=72, mlp_dim=4304)                                # SigLIP so400m/14-384
CLIP_LAYOUT = dict(norm_eps=1e-5, patch_bias=False, class_token=True, pos_embed="learned", pre_norm=True,
                   post_norm="pooled", pool="cls", act="quick_gelu")
SIGLIP_LAYOUT = dict(norm_eps=1e-6, patch_bias=True, class_token=False, pos_embed="learned", pre_norm=False,
                     post_norm="tokens", pool="map", act="gelu_tanh")


def _hw(size) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


class LayerNorm(nn.Module):
  """LayerNorm with bias (torch semantics: biased variance), in float32, cast to the compute dtype."""
  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (d,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (d,),
                      self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Position embeddings.

def _interp_matrix(n_out: int, n_in: int, method: str) -> np.ndarray:
  """[n_out, n_in] weights of 1-D resampling exactly as torch `F.interpolate(mode=method,
  align_corners=False)` with a target size (no antialias); bicubic uses a = -0.75."""
  m = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    src = (i + 0.5) * scale - 0.5
    if method == "bilinear":
      src = max(src, 0.0)
      i0 = min(int(math.floor(src)), n_in - 1)
      i1 = min(i0 + 1, n_in - 1)
      t = src - i0
      m[i, i0] += 1.0 - t
      m[i, i1] += t
    else:
      f = int(math.floor(src))
      t = src - f
      a = -0.75
      w = [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
           ((a + 2) * t - (a + 3)) * t * t + 1,
           ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1]
      w.append(1.0 - sum(w))
      for j in range(4):
        m[i, min(max(f - 1 + j, 0), n_in - 1)] += w[j]
  return m


def interpolate_table(table: jax.Array, grid_out: tuple[int, int], method: str = "bicubic") -> jax.Array:
  """Resamples a learned patch position table [g*g, D] (row-major grid) to [gh*gw, D]."""
  g = math.isqrt(table.shape[0])
  gh, gw = grid_out
  if (gh, gw) == (g, g):
    return table
  wh = jnp.asarray(_interp_matrix(gh, g, method), jnp.float32)
  ww = jnp.asarray(_interp_matrix(gw, g, method), jnp.float32)
  t = table.astype(jnp.float32).reshape(g, g, -1)
  out = jnp.einsum("ih,jw,hwd->ijd", wh, ww, t, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(gh * gw, -1).astype(table.dtype)


def sincos_2d(gh: int, gw: int, d: int, temperature: float = 10_000.0) -> jax.Array:
  """Fixed 2-D sin-cos position embeddings [gh*gw, D] (MoCo v3 / big_vision layout)."""
  y, x = np.mgrid[:gh, :gw]
  omega = np.arange(d // 4) / max(d // 4 - 1, 1)
  omega = 1.0 / temperature ** omega
  y = np.einsum("m,d->md", y.reshape(-1), omega)
  x = np.einsum("m,d->md", x.reshape(-1), omega)
  return jnp.asarray(np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1), jnp.float32)


def patchify(images: jax.Array, p: int) -> tuple[jax.Array, tuple[int, int]]:
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C] in (kh, kw, C) order; a remainder is cropped
  (as a 'valid' conv with stride p)."""
  b, h, w, c = images.shape
  gh, gw = h // p, w // p
  x = images[:, : gh * p, : gw * p]
  x = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, p * p * c), (gh, gw)


def rope_2d_table(head_dim: int, gh: int, gw: int, ref: int = 0, theta: float = 10000.0):
  """(sin, cos) float32 [gh * gw, head_dim] of timm's EVA 2-D rotary embedding ('cat' type,
  index grid): head_dim / 4 frequency bands 1 / theta^(k / (head_dim / 4)); row positions
  (scaled by ref / gh when `ref`) fill the first half of the pairs, columns the second; each
  angle is repeated for the two members of its pair (interleaved layout)."""
  return _rope_2d_table(int(head_dim), int(gh), int(gw), int(ref), float(theta))


@functools.lru_cache(maxsize=64)
def _rope_2d_table(head_dim, gh, gw, ref, theta):
  nb = head_dim // 4
  bands = (np.float32(1.0) / np.float32(theta) ** (np.arange(nb, dtype=np.float32) / np.float32(nb))).astype(np.float32)
  th, tw = np.arange(gh, dtype=np.float32), np.arange(gw, dtype=np.float32)
  if ref:
    th, tw = th / np.float32(gh) * np.float32(ref), tw / np.float32(gw) * np.float32(ref)
  grid = np.stack(np.meshgrid(th, tw, indexing="ij"), axis=-1)  # [gh, gw, 2]
  pos = (grid[..., None] * bands).astype(np.float32).reshape(gh * gw, 2 * nb)
  sin, cos = np.repeat(np.sin(pos), 2, axis=-1), np.repeat(np.cos(pos), 2, axis=-1)
  sin.flags.writeable = cos.flags.writeable = False
  return sin, cos


def apply_rope_2d(x: jax.Array, sin, cos) -> jax.Array:
  """x: [B, N, H, D] tokens (patches only) rotated pairwise: x * cos + rot(x) * sin with
  rot([x0, x1, x2, x3, ...]) = [-x1, x0, -x3, x2, ...] (in float32, cast back)."""
  x32 = x.astype(jnp.float32)
  rot = jnp.stack([-x32[..., 1::2], x32[..., ::2]], axis=-1).reshape(x.shape)
  s, c = jnp.asarray(sin)[None, :, None, :], jnp.asarray(cos)[None, :, None, :]
  return (x32 * c + rot * s).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Blocks.

class Attention(nn.Module):
  """Multi-head attention with biases, non-causal; queries from `xq`, keys/values from `xkv`."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, xq, xkv, deterministic=True, grid=None):
    """xq: [B, T, D]; xkv: [B, S, D] -> [B, T, D]. `grid` (gh, gw): the patch grid of the
    tokens (self-attention over prefix + patch tokens), for the 2-D rotary embedding."""
    c = self.cfg
    b, t, _ = xq.shape
    s = xkv.shape[1]
    nh = c.n_heads * c.head_dim
    q = c.dense(nh, ("embed", "heads"), "q_proj", c.attn_bias)(xq, deterministic)
    k = c.dense(nh, ("embed", "heads"), "k_proj", c.attn_bias and c.k_bias)(xkv, deterministic)
    v = c.dense(nh, ("embed", "heads"), "v_proj", c.attn_bias)(xkv, deterministic)
    q = q.reshape(b, t, c.n_heads, c.head_dim)
    k = k.reshape(b, s, c.n_heads, c.head_dim)
    v = v.reshape(b, s, c.n_heads, c.head_dim)
    if c.rope and grid is not None:
      n_prefix = t - grid[0] * grid[1]
      sin, cos = rope_2d_table(c.head_dim, grid[0], grid[1], c.rope_grid, c.rope_theta)
      q = jnp.concatenate([q[:, :n_prefix], apply_rope_2d(q[:, n_prefix:], sin, cos)], axis=1)
      k = jnp.concatenate([k[:, :n_prefix], apply_rope_2d(k[:, n_prefix:], sin, cos)], axis=1)
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
    out = layers.dot_product_attention(q, k, v, None, c.attention)  # every token sees every token: no mask
    out = checkpoint_name(out, "attn_out").reshape(b, t, nh)
    if c.attn_norm:
      out = c.norm("norm")(out)
    return c.dense(c.d_model, ("heads", "embed"), "out_proj", c.attn_bias)(out, deterministic)


class Mlp(nn.Module):
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, deterministic=True):
    c = self.cfg
    act = ACTIVATIONS[c.act]
    h = c.dense(c.mlp_dim, ("embed", "mlp"), "fc1", c.mlp_bias)(x, deterministic)
    if c.mlp == "swiglu":
      h = act(c.dense(c.mlp_dim, ("embed", "mlp"), "gate_proj", c.mlp_bias)(x, deterministic)) * h
    else:
      h = act(h)
    h = nn.with_logical_constraint(h, layers.ACT_BTF)
    if c.mlp_norm:
      h = c.norm("norm")(h)
    return c.dense(c.d_model, ("mlp", "embed"), "fc2", c.mlp_bias)(h, deterministic)


class Block(nn.Module):
  """Pre-LN encoder layer: x + ls1 * attn(ln1(x)); x + ls2 * mlp(ln2(x))."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, deterministic=True, grid=None):
    c = self.cfg
    h = c.norm("layer_norm1")(x)
    h = Attention(c, name="self_attn")(h, h, deterministic, grid)
    x = x + self._scale(h, "layer_scale1")
    h = Mlp(c, name="mlp")(c.norm("layer_norm2")(x), deterministic)
    x = x + self._scale(h, "layer_scale2")
    return nn.with_logical_constraint(x, layers.ACT_BTD)

  def _scale(self, h, name):
    c = self.cfg
    if c.layer_scale is None:
      return h
    g = self.param(name, nn.with_logical_partitioning(nn.initializers.constant(c.layer_scale), ("norm",)),
                   (c.d_model,), c.weight_dtype)
    return h * g.astype(h.dtype)


class MapHead(nn.Module):
  """Multi-head attention pooling (SigLIP `head`): a learned probe attends over the tokens,
  then a residual MLP on its layernormed output. [B, S, D] -> [B, D]."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x, deterministic=True):
    c = self.cfg
    probe = self.param("probe", nn.with_logical_partitioning(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, c.d_model), c.weight_dtype)
    probe = jnp.broadcast_to(probe.astype(c.compute_dtype), (x.shape[0], 1, c.d_model))
    h = Attention(c, name="attention")(probe, x, deterministic)
    h = h + Mlp(c, name="mlp")(c.norm("layernorm")(h), deterministic)
    return h[:, 0]


class ViT(nn.Module):
  """Vision Transformer. `__call__(images [B, H, W, C] float) -> dict`:

    tokens: [B, P(+1), D] final hidden states, class token first when `class_token`;
            post-layernormed iff `post_norm == 'tokens'` (so it equals HF `last_hidden_state`
            for both CLIP, where it is not normed, and SigLIP, where it is).
    pooled: [B, D] by `pool` ('cls': the class token; 'map': the MAP head; 'mean': mean of
            patch tokens); post-layernormed when `post_norm == 'pooled'` (HF `pooler_output`).
            Absent when `pool == 'none'`.
    hidden: (only with return_hidden=True) tuple of n_layers + 1 arrays [B, P(+1), D]: the
            embeddings entering the blocks (after the pre-norm), then each block's output,
            like HF `hidden_states`.

  Images of another size than `image_size` get the learned position table resampled
  (`pos_interpolation`) to their patch grid; the class token's row is kept as is.
  """
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images, deterministic=True, return_hidden=False):
    c = self.cfg
    x, (gh, gw) = patchify(images.astype(c.compute_dtype), c.patch_size)
    x = c.dense(c.d_model, ("patch", "embed"), "patch_embedding", c.patch_bias)(x, deterministic)
    b = x.shape[0]
    if c.class_token:
      cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                       (c.d_model,), c.weight_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, c.d_model)), x], axis=1)
    x = x + self._positions(gh, gw).astype(x.dtype)[None]
    if c.pre_norm:
      x = c.norm("pre_layernorm")(x)
    x = nn.with_logical_constraint(x, layers.ACT_BTD)

    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], static_argnums=(2, 3))
    hidden = [x]
    for i in range(c.n_layers):
      x = block(c, name=f"layers_{i}")(x, deterministic, (gh, gw))
      hidden.append(x)

    post = c.norm("post_layernorm") if c.post_norm != "none" else None
    tokens = post(x) if c.post_norm == "tokens" else x
    out = dict(tokens=tokens)
    if c.pool != "none":
      if c.pool == "cls":
        pooled = tokens[:, 0]
      elif c.pool == "mean":
        pooled = jnp.mean(tokens[:, int(c.class_token):].astype(jnp.float32), axis=1).astype(tokens.dtype)
      else:
        pooled = MapHead(c, name="head")(tokens, deterministic)
      out["pooled"] = post(pooled) if c.post_norm == "pooled" else pooled
    if return_hidden:
      out["hidden"] = tuple(hidden)
    return out

  def _positions(self, gh, gw):
    """Position embeddings [P(+1), D] for a gh x gw patch grid (zeros for the class token
    when the embeddings are fixed or absent)."""
    c = self.cfg
    n_cls = int(c.class_token)
    if c.pos_embed == "learned":
      table = self.param("position_embedding",
                         nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "embed")),
                         (c.grid * c.grid + n_cls, c.d_model), c.weight_dtype)
      patches = interpolate_table(table[n_cls:], (gh, gw), c.pos_interpolation)
      return jnp.concatenate([table[:n_cls], patches], axis=0)
    if c.pos_embed == "sincos":
      pe = sincos_2d(gh, gw, c.d_model)
    else:
      pe = jnp.zeros((gh * gw, c.d_model), jnp.float32)
    return jnp.concatenate([jnp.zeros((n_cls, c.d_model), pe.dtype), pe], axis=0)
