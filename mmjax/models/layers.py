"""Building blocks shared by the decoder and the vision tower.

Axis letters used in shape comments (as in gemma):
  B batch, T query length, S key length, D model width, N query heads,
  K key/value heads, H head dim, F MLP width, V vocab, R LoRA rank.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
`mmjax.sharding` maps them to mesh axes with the rules in the run config.
Activations are constrained at block boundaries with `nn.with_logical_constraint`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any

# Logical names for activations; parameters use 'embed', 'heads', 'kv_heads', 'mlp', 'vocab'.
ACT_BTD = ("act_batch", "act_length", "act_embed")
ACT_BTF = ("act_batch", "act_length", "act_mlp")
ACT_BTV = ("act_batch", "act_length", "act_vocab")


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
  """LoRA output scale: alpha / rank, or alpha / sqrt(rank) for rsLoRA."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoraDense(nn.Module):
  """A dense layer `y = x W (+ bias)` that also applies a LoRA adapter when one is given.

  The adapter is not created by this module: it is read from the `lora` collection at
  this module's path (`.../<name>/a` [in, R], `.../<name>/b` [R, out]), where
  `mmjax.lora.init` puts it. Without that collection the layer is exactly the base layer.
  """
  features: int
  axes: tuple[str | None, str | None]  # logical names of the kernel's (in, out) axes
  use_bias: bool = False
  dtype: Dtype = jnp.float32  # compute dtype
  param_dtype: Dtype = jnp.float32  # storage dtype
  kernel_init: Any = nn.initializers.lecun_normal()
  lora_alpha: float = 16.0
  lora_rslora: bool = False
  lora_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    d_in = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (d_in, self.features), self.param_dtype)
    x = x.astype(self.dtype)
    y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    if self.has_variable("lora", "a"):
      a = self.get_variable("lora", "a")  # [in, R]
      b = self.get_variable("lora", "b")  # [R, out]
      xa = x
      if self.lora_dropout > 0.0 and not deterministic:
        xa = nn.Dropout(self.lora_dropout)(x, deterministic=False)
      scale = lora_scale(self.lora_alpha, a.shape[-1], self.lora_rslora)
      y = y + jnp.dot(jnp.dot(xa, a.astype(self.dtype)), b.astype(self.dtype)) * scale
    return y


class RMSNorm(nn.Module):
  """Root-mean-square norm, computed in float32 and cast back to the compute dtype."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> jax.Array:
  """Inverse frequencies [H/2]; `scaling` applies llama3-style frequency scaling.

  `scaling` keys (as in Hugging Face `rope_scaling` of type 'llama3'): factor,
  low_freq_factor, high_freq_factor, original_max_position_embeddings.
  """
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv / factor + smooth * inv
  out = jnp.where(wavelen > low_wavelen, inv / factor, inv)
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(is_medium, smoothed, out)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, half-split layout (as in Hugging Face LLaMA). x: [B, T, N, H]; positions: [B, T]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def attention_mask(q_segments: jax.Array, kv_segments: jax.Array, causal: bool,
                   q_positions: jax.Array | None = None,
                   kv_positions: jax.Array | None = None) -> jax.Array:
  """Boolean mask [B, 1, T, S]: same non-zero segment, and key index <= query index when causal.

  Segment id 0 marks padding. Causality is by index in the packed row unless positions
  in the cache are given (used by the sampler).
  """
  mask = (q_segments[:, :, None] == kv_segments[:, None, :]) & (kv_segments[:, None, :] != 0)
  if causal:
    if q_positions is None:
      t, s = q_segments.shape[1], kv_segments.shape[1]
      mask = mask & (jnp.arange(t)[:, None] >= jnp.arange(s)[None, :])[None]
    else:
      mask = mask & (q_positions[:, :, None] >= kv_positions[:, None, :])
  return mask[:, None]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                          implementation: str = "xla") -> jax.Array:
  """Grouped-query attention. q: [B, T, N, H]; k, v: [B, S, K, H]; mask: [B, 1, T, S] -> [B, T, N, H].

  `implementation`: 'xla' (einsums; runs everywhere), 'cudnn' (fused flash attention on
  NVIDIA GPUs through `jax.nn.dot_product_attention`; needs bf16/fp16 compute), or 'auto'
  (cudnn on a GPU backend with bf16/fp16 compute, xla otherwise).
  """
  if implementation == "auto":
    gpu = jax.default_backend() == "gpu"
    implementation = "cudnn" if gpu and q.dtype in (jnp.bfloat16, jnp.float16) else "xla"
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(h))
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)
