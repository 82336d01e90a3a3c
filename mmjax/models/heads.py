"""Task heads on ViT patch tokens (ViSFT): DETR-style detection, per-query instance masks and
an autoregressive caption decoder, plus `VisionTaskModel`, which wraps a ViT and the heads.

Variables: `params` and, optionally, `lora`. `VisionTaskModel` has two top-level parts so
trainable and LoRA regexes pick each on its own (ViSFT stage 1 trains `params/heads/.*` on a
frozen tower; stage 2 adds `lora` on `vision/.*` and trains `lora/vision/.*` only):

  vision/...                                   a `mmjax.models.vit.ViT`
  heads/detection/input_norm, input_proj       patch tokens -> decoder width
  heads/detection/query_embed [Q, D]           learned queries (initial state and query position)
  heads/detection/layers_{i}/{norm1, self_attn/{q,k,v,out}_proj, norm2,
                              cross_attn/{q,k,v,out}_proj, norm3, fc1, fc2}
  heads/detection/final_norm, class_head, box_fc1, box_fc2, box_fc3
  heads/segmentation/pixel_norm, pixel_proj, pixel_out, mask_fc1, mask_fc2
  heads/caption/input_norm, input_proj, embed/embedding [V, D], pos_embed [L, D],
                layers_{i}/{... as detection ...}, final_norm, lm_head

Axis letters as in `mmjax.models.layers`, plus Q (queries), C (classes), P (patches, a
gh x gw grid, row-major, class token removed), M (mask embedding width), h x w (mask size).

Decoder layers are pre-norm (x + attn(norm(x))), which trains more easily from scratch than
DETR's post-norm. As in DETR the query embedding is added to queries and keys of the
self-attention and to the queries of the cross-attention, and fixed 2-D sin-cos positions of
the patch grid are added to the cross-attention keys (ViT features carry position only
implicitly after many layers, and boxes need it).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmjax.models import layers
from mmjax.models.llama import DTYPES
from mmjax.models.vit import LayerNorm, ViT, ViTConfig, sincos_2d


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Fields shared by the transformer decoders of the heads (detection, caption)."""
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  norm_eps: float = 1e-5
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention: str = "xla"  # see layers.dot_product_attention; 'xla' by default: the heads are small and
  #                        cudnn has not been checked on their cross-attention shapes (odd Q vs P)
  lora_alpha: float = 16.0
  lora_rslora: bool = False
  lora_dropout: float = 0.0

  def __post_init__(self):
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ValueError(f"heads.{key}={getattr(self, key)!r} is not one of {tuple(DTYPES)}")
    if self.d_model % 4:  # the 2-D sin-cos memory positions need it
      raise ValueError(f"heads.d_model={self.d_model} must be divisible by 4")

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def dense(self, features, axes, name, use_bias=True):
    return layers.LoraDense(
        features, axes, use_bias=use_bias, dtype=self.compute_dtype, param_dtype=self.weight_dtype,
        lora_alpha=self.lora_alpha, lora_rslora=self.lora_rslora, lora_dropout=self.lora_dropout,
        name=name)

  def norm(self, name):
    return LayerNorm(self.norm_eps, self.compute_dtype, self.weight_dtype, name=name)

  @classmethod
  def from_dict(cls, d):
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class DetectionConfig(DecoderConfig):
  """DETR-style head: `num_queries` learned queries, class logits over `num_classes` + 1
  (the last is no-object) and sigmoid cxcywh boxes in [0, 1] of the image size."""
  num_classes: int = 3
  num_queries: int = 8

  def __post_init__(self):
    super().__post_init__()
    if self.num_classes < 1 or self.num_queries < 1:
      raise ValueError(f"detection: num_classes={self.num_classes} and num_queries={self.num_queries} "
                       "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SegmentationConfig:
  """Per-query masks: mask embeddings (an MLP on the detection decoder's query states) dotted
  with per-pixel features. Per-pixel features are the patch tokens, projected to `mask_dim`,
  bilinearly upsampled by `upsample` and passed through a 1x1 layer, so masks are
  [gh * upsample, gw * upsample]: `upsample = patch_size` gives the image size."""
  mask_dim: int = 32  # M
  upsample: int = 4
  norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"
  lora_alpha: float = 16.0
  lora_rslora: bool = False
  lora_dropout: float = 0.0

  def __post_init__(self):
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in DTYPES:
        raise ValueError(f"segmentation.{key}={getattr(self, key)!r} is not one of {tuple(DTYPES)}")
    if self.upsample < 1:
      raise ValueError(f"segmentation.upsample={self.upsample} must be >= 1")

  compute_dtype = DecoderConfig.compute_dtype
  weight_dtype = DecoderConfig.weight_dtype
  dense = DecoderConfig.dense
  norm = DecoderConfig.norm

  @classmethod
  def from_dict(cls, d) -> "SegmentationConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in fields})


@dataclasses.dataclass(frozen=True)
class CaptionConfig(DecoderConfig):
  """Causal text decoder cross-attending to the patch tokens. `max_len` rows of the learned
  position table bound the teacher-forced and decoded length."""
  vocab_size: int = 64
  max_len: int = 128


@dataclasses.dataclass(frozen=True)
class VisionTaskConfig:
  """A ViT and the heads that are not None (segmentation needs detection: its masks are
  predicted from the detection queries, so both share one Hungarian matching)."""
  vision: ViTConfig = dataclasses.field(default_factory=ViTConfig)
  detection: DetectionConfig | None = dataclasses.field(default_factory=DetectionConfig)
  segmentation: SegmentationConfig | None = dataclasses.field(default_factory=SegmentationConfig)
  caption: CaptionConfig | None = dataclasses.field(default_factory=CaptionConfig)

  def __post_init__(self):
    if self.segmentation is not None and self.detection is None:
      raise ValueError("visft heads: segmentation needs the detection head (masks come from its queries)")

  @classmethod
  def from_dict(cls, d) -> "VisionTaskConfig":
    d = dict(d)
    kinds = dict(vision=ViTConfig, detection=DetectionConfig, segmentation=SegmentationConfig,
                 caption=CaptionConfig)
    out = {}
    for key, kind in kinds.items():
      if key in d:
        v = d[key]
        out[key] = v if v is None or isinstance(v, kind) else kind.from_dict(v)
    return cls(**out)


# ---------------------------------------------------------------------------------------------
# Decoder blocks.

class HeadAttention(nn.Module):
  """Multi-head attention with separate query, key and value inputs (positions are added to
  q and k only, as in DETR). q_in: [B, T, D]; k_in, v_in: [B, S, Dk]; mask: [B, 1, T, S]."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, q_in, k_in, v_in, mask=None, deterministic=True):
    c = self.cfg
    b, t, _ = q_in.shape
    s = k_in.shape[1]
    nh = c.n_heads * c.head_dim
    q = c.dense(nh, ("embed", "heads"), "q_proj")(q_in, deterministic).reshape(b, t, c.n_heads, c.head_dim)
    k = c.dense(nh, ("embed", "heads"), "k_proj")(k_in, deterministic).reshape(b, s, c.n_heads, c.head_dim)
    v = c.dense(nh, ("embed", "heads"), "v_proj")(v_in, deterministic).reshape(b, s, c.n_heads, c.head_dim)
    if mask is None:
      mask = jnp.ones((b, 1, t, s), bool)
    out = layers.dot_product_attention(q, k, v, mask, c.attention).reshape(b, t, nh)
    return c.dense(c.d_model, ("heads", "embed"), "out_proj")(out, deterministic)


class DecoderLayer(nn.Module):
  """Pre-norm decoder layer: self-attention (causal mask given or none), cross-attention to
  the memory, GELU MLP. x: [B, T, D]; memory: [B, S, D]; query_pos: [T, D] or None;
  memory_pos: [S, D]."""
  cfg: DecoderConfig

  @nn.compact
  def __call__(self, x, memory, query_pos, memory_pos, self_mask=None, deterministic=True):
    c = self.cfg
    qp = 0.0 if query_pos is None else query_pos.astype(x.dtype)[None]
    h = c.norm("norm1")(x)
    x = x + HeadAttention(c, name="self_attn")(h + qp, h + qp, h, self_mask, deterministic)
    h = c.norm("norm2")(x)
    k = memory + memory_pos.astype(memory.dtype)[None]
    x = x + HeadAttention(c, name="cross_attn")(h + qp, k, memory, None, deterministic)
    h = c.norm("norm3")(x)
    h = c.dense(c.mlp_dim, ("embed", "mlp"), "fc1")(h, deterministic)
    h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=False), layers.ACT_BTF)
    x = x + c.dense(c.d_model, ("mlp", "embed"), "fc2")(h, deterministic)
    return nn.with_logical_constraint(x, layers.ACT_BTD)


class DetectionHead(nn.Module):
  """DETR-style detector on patch tokens.

  `__call__(tokens [B, P, Dv], grid (gh, gw)) -> dict`:
    logits  [B, Q, C + 1] float32; the last class is no-object
    boxes   [B, Q, 4] float32, (cx, cy, w, h) normalised to [0, 1] by the image size (sigmoid)
    queries [B, Q, D] final (normed) query states, for the segmentation head
  """
  cfg: DetectionConfig

  @nn.compact
  def __call__(self, tokens, grid, deterministic=True):
    c = self.cfg
    memory, memory_pos = _project(self, c, tokens, grid, deterministic)
    query = self.param("query_embed", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("queries", "embed")),
                       (c.num_queries, c.d_model), c.weight_dtype).astype(c.compute_dtype)
    x = jnp.broadcast_to(query[None], (tokens.shape[0], c.num_queries, c.d_model))
    for i in range(c.n_layers):
      x = DecoderLayer(c, name=f"layers_{i}")(x, memory, query, memory_pos, None, deterministic)
    x = c.norm("final_norm")(x)
    logits = c.dense(c.num_classes + 1, ("embed", "classes"), "class_head")(x, deterministic)
    h = jax.nn.relu(c.dense(c.d_model, ("embed", "mlp"), "box_fc1")(x, deterministic))
    h = jax.nn.relu(c.dense(c.d_model, ("mlp", "embed"), "box_fc2")(h, deterministic))
    boxes = jax.nn.sigmoid(c.dense(4, ("embed", None), "box_fc3")(h, deterministic).astype(jnp.float32))
    return dict(logits=logits.astype(jnp.float32), boxes=boxes, queries=x)


def _project(module, c, tokens, grid, deterministic):
  """Memory projection with params directly under `module` (input_norm, input_proj)."""
  gh, gw = grid
  if tokens.shape[1] != gh * gw:
    raise ValueError(f"heads: {tokens.shape[1]} patch tokens do not fill a {gh}x{gw} grid "
                     "(drop the class token first)")
  m = c.norm("input_norm")(tokens.astype(c.compute_dtype))
  m = c.dense(c.d_model, ("embed", None), "input_proj")(m, deterministic)
  return nn.with_logical_constraint(m, layers.ACT_BTD), sincos_2d(gh, gw, c.d_model)


class SegmentationHead(nn.Module):
  """Instance masks from query states and patch tokens.

  `__call__(queries [B, Q, D], tokens [B, P, Dv], grid (gh, gw)) -> mask logits
  [B, Q, gh * upsample, gw * upsample] float32` (sigmoid > 0.5 is the mask).
  """
  cfg: SegmentationConfig

  @nn.compact
  def __call__(self, queries, tokens, grid, deterministic=True):
    c = self.cfg
    gh, gw = grid
    b = tokens.shape[0]
    pix = c.norm("pixel_norm")(tokens.astype(c.compute_dtype))
    pix = c.dense(c.mask_dim, ("embed", "mask"), "pixel_proj")(pix, deterministic).reshape(b, gh, gw, c.mask_dim)
    if c.upsample > 1:
      pix = jax.image.resize(pix, (b, gh * c.upsample, gw * c.upsample, c.mask_dim), "bilinear")
    pix = c.dense(c.mask_dim, ("mask", None), "pixel_out")(jax.nn.gelu(pix, approximate=False), deterministic)
    e = jax.nn.relu(c.dense(queries.shape[-1], ("embed", "mlp"), "mask_fc1")(queries.astype(c.compute_dtype),
                                                                            deterministic))
    e = c.dense(c.mask_dim, ("mlp", "mask"), "mask_fc2")(e, deterministic)
    return jnp.einsum("bqm,bhwm->bqhw", e, pix, preferred_element_type=jnp.float32)


class CaptionHead(nn.Module):
  """Autoregressive caption decoder. `__call__(tokens [B, P, Dv], grid, text [B, T] int32)
  -> logits [B, T, V] float32`: causal self-attention over `text` (teacher forcing: logits at
  t predict text[t + 1]), cross-attention to the patch tokens. T <= max_len."""
  cfg: CaptionConfig

  @nn.compact
  def __call__(self, tokens, grid, text, deterministic=True):
    c = self.cfg
    b, t = text.shape
    if t > c.max_len:
      raise ValueError(f"caption: {t} text tokens exceed caption.max_len={c.max_len}")
    memory, memory_pos = _project(self, c, tokens, grid, deterministic)
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
                     embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                     name="embed")
    pos = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("pos", "embed")),
                     (c.max_len, c.d_model), c.weight_dtype)
    x = embed(text) + pos[:t].astype(c.compute_dtype)[None]
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool))[None, None], (b, 1, t, t))
    for i in range(c.n_layers):
      x = DecoderLayer(c, name=f"layers_{i}")(x, memory, None, memory_pos, causal, deterministic)
    x = c.norm("final_norm")(x)
    logits = c.dense(c.vocab_size, ("embed", "vocab"), "lm_head")(x, deterministic)
    return nn.with_logical_constraint(logits.astype(jnp.float32), layers.ACT_BTV)


class Heads(nn.Module):
  """The heads of a `VisionTaskConfig` under one parent (`heads/...`)."""
  cfg: VisionTaskConfig

  def setup(self):
    c = self.cfg
    if c.detection is not None:
      self.detection = DetectionHead(c.detection)
    if c.segmentation is not None:
      self.segmentation = SegmentationHead(c.segmentation)
    if c.caption is not None:
      self.caption = CaptionHead(c.caption)

  def __call__(self, tokens, grid, text=None, deterministic=True):
    c = self.cfg
    out = {}
    if c.detection is not None:
      out["detection"] = self.detection(tokens, grid, deterministic)
    if c.segmentation is not None:
      out["masks"] = self.segmentation(out["detection"]["queries"], tokens, grid, deterministic)
    if c.caption is not None and text is not None:
      out["caption"] = self.caption(tokens, grid, text, deterministic)
    return out

  def caption_logits(self, tokens, grid, text, deterministic=True):
    return self.caption(tokens, grid, text, deterministic)


class VisionTaskModel(nn.Module):
  """ViT + task heads. `__call__(images [B, H, W, C], text [B, T] | None) -> dict`:

    detection  {logits [B, Q, C+1], boxes [B, Q, 4] cxcywh in [0, 1], queries [B, Q, D]}
    masks      [B, Q, h, w] mask logits (segmentation head)
    caption    [B, T, V] teacher-forced logits (only when `text` is given; at init a dummy
               one-token text is used so `model.init(rng, images)` creates every parameter)

  Heads see the patch tokens only (the class token, if any, is dropped).
  """
  cfg: VisionTaskConfig

  def setup(self):
    self.vision = ViT(self.cfg.vision)
    self.heads = Heads(self.cfg)

  def grid(self, image_hw) -> tuple[int, int]:
    p = self.cfg.vision.patch_size
    return image_hw[0] // p, image_hw[1] // p

  def encode(self, images, deterministic=True):
    """[B, H, W, C] -> patch tokens [B, P, Dv]."""
    tokens = self.vision(images, deterministic)["tokens"]
    return tokens[:, 1:] if self.cfg.vision.class_token else tokens

  def mean_features(self, images):
    """[N, H, W, C] -> the mean of the patch tokens: float32 [N, Dv] (out-of-domain probes)."""
    return jnp.mean(self.encode(images).astype(jnp.float32), axis=1)

  def __call__(self, images, text=None, deterministic=True):
    tokens = self.encode(images, deterministic)
    if text is None and self.cfg.caption is not None and self.is_initializing():
      text = jnp.zeros((images.shape[0], 1), jnp.int32)
    return self.heads(tokens, self.grid(images.shape[1:3]), text, deterministic)

  def caption_logits(self, tokens, image_hw, text, deterministic=True):
    """Caption logits [B, T, V] from already encoded patch tokens (for decoding)."""
    return self.heads.caption_logits(tokens, self.grid(image_hw), text, deterministic)


def greedy_caption(model: VisionTaskModel, variables: dict, images: jax.Array, *, bos_id: int,
                   eos_id: int, pad_id: int = 0, max_len: int | None = None) -> jax.Array:
  """Greedy captions [B, max_len] int32 (without the leading bos; `eos_id` then `pad_id` after
  the end). The tower runs once; each step re-runs the small decoder on the whole buffer (no
  KV cache: captions are short and the decoder tiny). Jit-friendly (`fori_loop`, static
  shapes); `max_len` defaults to `caption.max_len`."""
  c = model.cfg.caption
  max_len = max_len or c.max_len
  if max_len > c.max_len:
    raise ValueError(f"greedy_caption: max_len={max_len} exceeds caption.max_len={c.max_len}")
  tokens = model.apply(variables, images, method=VisionTaskModel.encode)
  hw = images.shape[1:3]
  b = images.shape[0]
  buf = jnp.full((b, max_len + 1), pad_id, jnp.int32).at[:, 0].set(bos_id)

  def body(t, carry):
    buf, done = carry
    logits = model.apply(variables, tokens, hw, buf[:, :max_len], method=VisionTaskModel.caption_logits)
    nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), axis=-1).astype(jnp.int32)
    nxt = jnp.where(done, pad_id, nxt)
    buf = jax.lax.dynamic_update_index_in_dim(buf, nxt, t + 1, axis=1)
    return buf, done | (nxt == eos_id)

  buf, _ = jax.lax.fori_loop(0, max_len, body, (buf, jnp.zeros((b,), bool)))
  return buf[:, 1:]

