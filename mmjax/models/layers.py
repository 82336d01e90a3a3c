"""Building blocks shared by the decoder and the vision tower.

Axis letters used in shape comments (as in gemma):
  B batch, T query length, S key length, D model width, N query heads,
  K key/value heads, H head dim, F MLP width, V vocab, R LoRA rank.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`);
`mmjax.sharding` maps them to mesh axes with the rules in the run config.
Activations are constrained at block boundaries with `nn.with_logical_constraint`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

# Logical names for activations; parameters use 'embed', 'heads', 'kv_heads', 'mlp', 'vocab'.
ACT_BTD = ("act_batch", "act_length", "act_embed")
ACT_BTF = ("act_batch", "act_length", "act_mlp")
ACT_BTV = ("act_batch", "act_length", "act_vocab")


def lora_scale(alpha: float, rank: int, rslora: bool) -> float:
  """LoRA output scale: alpha / rank, or alpha / sqrt(rank) for rsLoRA."""
  return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_matmul(x: jax.Array, kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """`x @ kernel + (x @ a) @ b * scale` with a hand-written backward. x: [..., in] -> [..., out].

  Autodiff of the plain expression makes XLA:CPU materialise the output gradient transposed
  ([out, tokens]) for the `b` gradient, fused with whatever produced it: that copy cost more
  than all the matmuls of a LoRA step. The backward here contracts over tokens with the
  small operand transposed instead (`(x @ a)^T @ dy`, `(dy @ b^T)^T @ x`). In float32 the
  forward multiplies by the merged weight `kernel + scale * a @ b` (one matmul instead of
  three; rounding differs at the 1e-7 level); in lower precision it keeps the adapter
  separate so small adapter updates are not rounded away. A kernel gradient is returned
  only where one is used (XLA drops it when the kernel is frozen).
  """
  return _lora_matmul(x, kernel, a, b, float(scale), x.dtype == jnp.float32)


def _lora_fwd_value(x, kernel, a, b, scale, merged):
  if merged:
    w = kernel + (a @ b) * jnp.asarray(scale, kernel.dtype)
    return jnp.dot(x, w), w
  return jnp.dot(x, kernel) + jnp.dot(jnp.dot(x, a), b) * scale, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lora_matmul(x, kernel, a, b, scale, merged):
  return _lora_fwd_value(x, kernel, a, b, scale, merged)[0]


def _lora_matmul_fwd(x, kernel, a, b, scale, merged):
  y, w = _lora_fwd_value(x, kernel, a, b, scale, merged)
  return y, (x, kernel, a, b, w)


def _lora_matmul_bwd(scale, merged, res, dy):
  x, kernel, a, b, w = res
  x2 = x.reshape(-1, x.shape[-1])  # [M, in]
  dy2 = dy.reshape(-1, dy.shape[-1])  # [M, out]
  g = jnp.dot(dy2, b.T) * jnp.asarray(scale, dy.dtype)  # [M, R]
  if merged:
    dx = jnp.dot(dy2, w.T)
  else:
    dx = jnp.dot(dy2, kernel.T) + jnp.dot(g, a.T)
  xa = jnp.dot(x2, a)  # [M, R], recomputed: cheaper than keeping it
  da = jnp.dot(g.T, x2).T  # [in, R]
  db = jnp.dot(xa.T, dy2) * jnp.asarray(scale, dy.dtype)  # [R, out]
  dkernel = jnp.dot(x2.T, dy2)  # dead code unless the kernel trains
  return (dx.reshape(x.shape).astype(x.dtype), dkernel.astype(kernel.dtype), da.astype(a.dtype),
          db.astype(b.dtype))


_lora_matmul.defvjp(_lora_matmul_fwd, _lora_matmul_bwd)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  """`silu(gate) * up` with a hand-written backward that recomputes sigmoid(gate) from
  `gate` (kept anyway). Autodiff of `nn.silu(gate) * up` keeps the sigmoid, a [tokens, mlp]
  array per layer, and XLA:CPU then splits the forward into three passes; here the forward
  is one pass, a bench_small train step needs 88 MB less temporary memory and ran about 4%
  faster (alternating A/B)."""
  return _swiglu(gate, up)


@jax.custom_vjp
def _swiglu(gate, up):
  g = gate.astype(jnp.float32)
  return (g * jax.nn.sigmoid(g) * up.astype(jnp.float32)).astype(up.dtype)


def _swiglu_fwd(gate, up):
  return _swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, d_out):
  gate, up = res
  g, u, d = gate.astype(jnp.float32), up.astype(jnp.float32), d_out.astype(jnp.float32)
  # sigmoid as 0.5 + 0.5 tanh(g/2): a different expression from the forward's, so XLA cannot
  # merge the two (CSE would keep the forward's sigmoid alive until the backward, as autodiff does)
  sig = 0.5 + 0.5 * jnp.tanh(0.5 * g)
  silu = g * sig
  d_gate = d * u * (sig + silu * (1.0 - sig))  # d silu/dg = sig * (1 + g * (1 - sig))
  return d_gate.astype(gate.dtype), (d * silu).astype(up.dtype)


_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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
    if self.has_variable("lora", "a"):
      a = self.get_variable("lora", "a")  # [in, R]
      b = self.get_variable("lora", "b")  # [R, out]
      xa = x
      if self.lora_dropout > 0.0 and not deterministic:
        xa = nn.Dropout(self.lora_dropout)(x, deterministic=False)
      scale = lora_scale(self.lora_alpha, a.shape[-1], self.lora_rslora)
      if xa is x:  # no dropout: one fused op with a hand-written backward (see lora_matmul)
        y = lora_matmul(x, kernel.astype(self.dtype), a.astype(self.dtype), b.astype(self.dtype), scale)
      else:
        y = jnp.dot(x, kernel.astype(self.dtype))
        y = y + jnp.dot(jnp.dot(xa, a.astype(self.dtype)), b.astype(self.dtype)) * scale
    else:
      y = jnp.dot(x, kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
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


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> np.ndarray:
  """Inverse frequencies [H/2] (float32, numpy: known at trace time); `scaling` applies
  llama3-style frequency scaling.

  `scaling` keys (as in Hugging Face `rope_scaling` of type 'llama3'): factor,
  low_freq_factor, high_freq_factor, original_max_position_embeddings.
  """
  inv = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
  if not scaling:
    return inv
  factor = scaling["factor"]
  low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
  old_len = scaling["original_max_position_embeddings"]
  low_wavelen, high_wavelen = old_len / low, old_len / high
  wavelen = 2 * math.pi / inv
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * inv / factor + smooth * inv
  out = np.where(wavelen > low_wavelen, inv / factor, inv)
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, out).astype(np.float32)


def rope_table(inv_freq: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(sin, cos) [length, H/2] of the rotary angles of positions 0..length-1, as float32
  constants. Angles are rounded to float32 first (position * inv_freq, as Hugging Face
  computes them), then sin/cos are taken in float64. Cached: every layer of a model gets
  the same two arrays, so a jitted model holds one copy of the table, not two per layer."""
  inv = np.asarray(inv_freq, np.float32)
  return _rope_table(inv.tobytes(), length)


@functools.lru_cache(maxsize=64)
def _rope_table(inv_bytes: bytes, length: int) -> tuple[np.ndarray, np.ndarray]:
  inv = np.frombuffer(inv_bytes, np.float32)
  angles = (np.arange(length, dtype=np.float32)[:, None] * inv[None]).astype(np.float64)
  sin, cos = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
  sin.flags.writeable = cos.flags.writeable = False
  return sin, cos


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, max_position: int) -> jax.Array:
  """Rotary embedding, half-split layout (as in Hugging Face LLaMA). x: [B, T, N, H];
  positions: [B, T] in [0, max_position) (the row or KV-cache length; a position outside
  gives NaN, never a silently wrong angle).

  sin/cos come from a constant table gathered by position: XLA fuses an inline
  `sin(positions * inv_freq)` into the rotation and so evaluates it once per element of
  x (N*2 times per angle). On XLA:CPU the table version is 9x faster at bench_small's
  shape, 3-5% of the whole train step.
  """
  sin_t, cos_t = rope_table(inv_freq, max_position)
  take = lambda table: jnp.take(table, positions, axis=0, mode="fill",
                                fill_value=jnp.nan)[:, :, None, :]  # [B, T, 1, H/2]
  sin, cos = take(sin_t), take(cos_t)
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


def resolve_attention(implementation: str, dtype) -> str:
  """'auto' -> 'cudnn' on a GPU backend with bf16/fp16 compute, else 'xla'."""
  if implementation == "auto":
    gpu = jax.default_backend() == "gpu"
    return "cudnn" if gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"
  return implementation


def attention_inputs(segment_ids: jax.Array, implementation: str, dtype, packed_rows: bool) -> jax.Array:
  """What every causal self-attention layer of a decoder takes, built once per forward pass:
  the fused ('cudnn') path on rows of one right-padded example each gets their lengths [B]
  (int32; cuDNN then skips the blocks above the diagonal and the padding, and no [B, T, T]
  mask exists), every other case the boolean mask [B, 1, T, T] of `attention_mask`."""
  if resolve_attention(implementation, dtype) == "cudnn" and not packed_rows:
    return jnp.sum(segment_ids != 0, axis=-1).astype(jnp.int32)
  return attention_mask(segment_ids, segment_ids, causal=True)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                          implementation: str = "xla", causal: bool = False) -> jax.Array:
  """Grouped-query attention. q: [B, T, N, H]; k, v: [B, S, K, H] -> [B, T, N, H]. `mask`: a
  boolean [B, 1, T, S], None (every key), or the lengths [B] of right-padded one-example rows
  (`attention_inputs`; causal, T == S).

  `implementation`: 'xla' (einsums; runs everywhere), 'cudnn' (`jax.nn.dot_product_attention`:
  cuDNN's fused flash attention on an NVIDIA GPU, needs bf16/fp16 compute; on other backends
  the same call runs its XLA implementation, which is how the CPU tests check this path), or
  'auto' (cudnn on a GPU backend with bf16/fp16 compute, xla otherwise). The cudnn path gets
  `is_causal` and sequence lengths where it can (no mask at all), else the mask with
  `is_causal` (packed rows: the slower path, a T x S bias per layer).

  `causal=True` promises that `mask` is False wherever the key index exceeds the query index
  (T == S, as for `attention_mask(..., causal=True)` without cache positions). The 'xla'
  path then skips the key blocks above the diagonal (`causal_block_attention`) and applies
  `mask` inside the blocks it computes: the same result on every query row that sees at
  least one key. Rows that see no key at all (padding) get an unspecified finite value,
  as they do without it.
  """
  lengths = None
  if mask is not None and mask.ndim == 1:
    lengths, causal = mask, True
  if resolve_attention(implementation, q.dtype) == "cudnn":
    fused = "cudnn" if jax.default_backend() == "gpu" else "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=None if lengths is not None else mask, is_causal=causal,
                                        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        implementation=fused)
  if lengths is not None:
    seg = (jnp.arange(q.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
    mask = attention_mask(seg, seg, causal=True)
  if mask is None:
    mask = jnp.ones((q.shape[0], 1, q.shape[1], k.shape[1]), bool)
  if causal and q.shape[1] == k.shape[1] and q.shape[1] > _CAUSAL_BLOCK_MIN:
    return causal_block_attention(q, k, v, mask)
  b, t, n, h = q.shape
  kh = k.shape[2]
  q = q.reshape(b, t, kh, n // kh, h)
  logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(h))
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


_CAUSAL_BLOCK_MIN = 64  # below this length one dense block is as fast


def causal_block_size(t: int) -> int:
  """Query block length of `causal_block_attention`: 64 up to T=1024, then T/16 (at most 16
  blocks, so the unrolled graph stays small)."""
  return max(64, -(-t // 16))


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                           block: int | None = None) -> jax.Array:
  """Attention for a mask that is zero above the diagonal, computing only the blocks on or
  below it. q: [B, T, N, H]; k, v: [B, T, K, H]; mask: [B, 1, T, T] -> [B, T, N, H].

  Query block i (rows i*block ... ) attends to the key prefix that ends with its own last
  row, so about half of the logits of the dense version are never formed (the fraction
  computed is (n+1)/2n for n blocks). `mask` (segments, padding) is applied inside every
  computed block, so packed sequences are exact. The blocks run heads-major ([B, K, G, T, H],
  one batched matmul per block and kv head) with a hand-written backward that reuses the
  saved probabilities: dS = P * (dP - rowsum(dO * O)), one pass over each block's logits
  (autodiff of the masked softmax makes several). On XLA:CPU at bench_small's shape that is
  1.4x faster forward and 1.1x forward+backward than autodiff of the same blocks, about 4%
  of the whole train step.
  """
  b, t, n, h = q.shape
  kh = k.shape[2]
  block = block or causal_block_size(t)
  # 1/sqrt(h) on q rather than on the logits: T*H instead of T*S multiplies (exact for
  # power-of-two h).
  q = (q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)).reshape(b, t, kh, n // kh, h)
  out = _causal_blocks(q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                       mask, block)  # [B, K, G, T, H]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def _block_bounds(t: int, block: int) -> list[tuple[int, int]]:
  return [(s, min(s + block, t)) for s in range(0, t, block)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_blocks(q, k, v, mask, block):
  """q: [B, K, G, T, H] (scaled); k, v: [B, K, T, H]; mask [B, 1, T, T] -> [B, K, G, T, H]."""
  return _causal_blocks_fwd(q, k, v, mask, block)[0]


def _causal_blocks_fwd(q, k, v, mask, block):
  neg = jnp.finfo(jnp.float32).min
  outs, probs = [], []
  for s, e in _block_bounds(q.shape[3], block):
    logits = jnp.einsum("bkgqh,bksh->bkgqs", q[:, :, :, s:e], k[:, :, :e], preferred_element_type=jnp.float32)
    logits = jnp.where(mask[:, :, None, s:e, :e], logits, neg)
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    p = (p / jnp.sum(p, axis=-1, keepdims=True)).astype(v.dtype)
    probs.append(p)
    outs.append(jnp.einsum("bkgqs,bksh->bkgqh", p, v[:, :, :e]))
  out = jnp.concatenate(outs, axis=3)
  return out, (q, k, v, out, probs)


def _causal_blocks_bwd(block, res, d_out):
  q, k, v, out, probs = res
  t = q.shape[3]
  # rowsum(dO * O) = rowsum(P * dP): the softmax backward's correction, one [.., T] vector
  d_sum = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for (s, e), p in zip(_block_bounds(t, block), probs):
    do = d_out[:, :, :, s:e]
    dp = jnp.einsum("bkgqh,bksh->bkgqs", do, v[:, :, :e], preferred_element_type=jnp.float32)
    ds = (p.astype(jnp.float32) * (dp - d_sum[:, :, :, s:e])).astype(q.dtype)
    dq.append(jnp.einsum("bkgqs,bksh->bkgqh", ds, k[:, :, :e]))
    dk = dk.at[:, :, :e].add(jnp.einsum("bkgqs,bkgqh->bksh", ds, q[:, :, :, s:e],
                                        preferred_element_type=jnp.float32))
    dv = dv.at[:, :, :e].add(jnp.einsum("bkgqs,bkgqh->bksh", p, do, preferred_element_type=jnp.float32))
  return (jnp.concatenate(dq, axis=3).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None)


_causal_blocks.defvjp(_causal_blocks_fwd, _causal_blocks_bwd)
