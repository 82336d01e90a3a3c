"""LLaMA-style decoder (Llama 2/3, Mistral, Qwen2 layouts) as a Linen module.

Variables: `params` (base weights) and, optionally, `lora` (adapters, see `mmjax.lora`).
Module paths follow Hugging Face names so converters and LoRA regexes read naturally:
  embed/embedding, layers_{i}/{input_norm, attn/{q,k,v,o}_proj, post_attn_norm,
  mlp/{gate,up,down}_proj}, final_norm, lm_head.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from mmjax.models import layers

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("q_proj", "k_proj", "v_proj"),
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Model config of the decoder (not the run config)."""
  vocab_size: int = 256
  d_model: int = 64
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  head_dim: int = 16
  mlp_dim: int = 128
  rope_theta: float = 10000.0
  rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  remat: str = "none"  # a key of REMAT_POLICIES
  attention: str = "auto"  # 'auto', 'xla' or 'cudnn' (see layers.dot_product_attention)
  packed_rows: bool = True  # rows may hold several examples (segment ids 1, 2, ...); False: one right-padded
  #                           example per row, so fused attention takes sequence lengths instead of a mask
  logits_chunk: int = 0  # the losses compute logits this many positions at a time (0 = all at once), so a
  #                        step never holds the whole [B, T, V] float32 logits (losses.chunked_token_log_probs)
  lora_alpha: float = 16.0
  lora_rslora: bool = False
  lora_dropout: float = 0.0

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  def dense(self, features, axes, name, use_bias=False):
    return layers.LoraDense(
        features, axes, use_bias=use_bias, dtype=self.compute_dtype, param_dtype=self.weight_dtype,
        lora_alpha=self.lora_alpha, lora_rslora=self.lora_rslora, lora_dropout=self.lora_dropout,
        name=name)

  @classmethod
  def from_dict(cls, d) -> "LlamaConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    d = dict(d)
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = dict(d["rope_scaling"])
    return cls(**{k: v for k, v in d.items() if k in fields})


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic=True, cache=None, causal=False):
    """x: [B, T, D]; positions: [B, T]; mask: [B, 1, T, S], or the lengths [B] of right-padded
    one-example rows (`layers.attention_inputs`). `cache` (sampler only) is a dict with 'k',
    'v' [B, S, K, H] and 'index' (write offset), returned updated; a prefill (T > 1, the
    cache empty before it) attends over its own keys only, causally by slot, on the model's
    attention path; a decode step (T = 1) over the cache with XLA. `causal=True` promises that
    `mask` hides every key after its query (by index; lets attention skip those blocks)."""
    c = self.cfg
    b, t, _ = x.shape
    q = c.dense(c.n_heads * c.head_dim, ("embed", "heads"), "q_proj", c.qkv_bias)(x, deterministic)
    k = c.dense(c.n_kv_heads * c.head_dim, ("embed", "kv_heads"), "k_proj", c.qkv_bias)(x, deterministic)
    v = c.dense(c.n_kv_heads * c.head_dim, ("embed", "kv_heads"), "v_proj", c.qkv_bias)(x, deterministic)
    q = q.reshape(b, t, c.n_heads, c.head_dim)
    k = k.reshape(b, t, c.n_kv_heads, c.head_dim)
    v = v.reshape(b, t, c.n_kv_heads, c.head_dim)
    inv_freq = layers.rope_frequencies(c.head_dim, c.rope_theta, c.rope_scaling)
    max_position = t if cache is None else max(t, cache["k"].shape[1])  # positions index the row or cache
    q = layers.apply_rope(q, positions, inv_freq, max_position)
    k = layers.apply_rope(k, positions, inv_freq, max_position)
    q = nn.with_logical_constraint(q, ("act_batch", "act_length", "act_heads", None))
    implementation = c.attention
    if cache is not None:
      k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache["index"], 1)
      v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache["index"], 1)
      cache = dict(cache, k=k_all, v=v_all)
      if t > 1:  # prefill from slot 0: the later slots are empty and masked, so attend over this block only
        k, v, mask, causal = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype), mask[..., :t], True
      else:
        k, v, causal, implementation = k_all, v_all, False, "xla"
    out = layers.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask, implementation, causal=causal)
    out = checkpoint_name(out, "attn_out")
    out = out.reshape(b, t, c.n_heads * c.head_dim)
    out = c.dense(c.d_model, ("heads", "embed"), "o_proj")(out, deterministic)
    return out, cache


class Mlp(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, deterministic=True):
    c = self.cfg
    gate = c.dense(c.mlp_dim, ("embed", "mlp"), "gate_proj")(x, deterministic)
    up = c.dense(c.mlp_dim, ("embed", "mlp"), "up_proj")(x, deterministic)
    h = nn.with_logical_constraint(layers.swiglu(gate, up), layers.ACT_BTF)
    return c.dense(c.d_model, ("mlp", "embed"), "down_proj")(h, deterministic)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, deterministic=True, cache=None, causal=False):
    c = self.cfg
    norm = lambda name: layers.RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype, name=name)
    h, cache = Attention(c, name="attn")(norm("input_norm")(x), positions, mask, deterministic, cache, causal)
    x = x + h
    x = x + Mlp(c, name="mlp")(norm("post_attn_norm")(x), deterministic)
    return nn.with_logical_constraint(x, layers.ACT_BTD), cache


class Llama(nn.Module):
  """Decoder-only LM. `__call__` returns logits [B, T, V] (float32)."""
  cfg: LlamaConfig

  def setup(self):
    c = self.cfg
    self.embed = nn.Embed(
        c.vocab_size, c.d_model, dtype=c.compute_dtype, param_dtype=c.weight_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")))
    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], static_argnums=(4, 6))
    self.layers = [block(c, name=f"layers_{i}") for i in range(c.n_layers)]
    self.final_norm = layers.RMSNorm(c.norm_eps, c.compute_dtype, c.weight_dtype)
    if not c.tie_embeddings:
      self.lm_head = c.dense(c.vocab_size, ("embed", "vocab"), "lm_head")

  def embed_tokens(self, tokens):
    return self.embed(tokens)

  def hidden(self, x, positions, mask, deterministic=True, caches=None, causal=False):
    """Runs the blocks on embeddings x [B, T, D]; returns normed hidden states and caches.
    `causal=True`: `mask` is known to be causal by index (see `Attention`)."""
    x = nn.with_logical_constraint(x.astype(self.cfg.compute_dtype), layers.ACT_BTD)
    new_caches = []
    for i, layer in enumerate(self.layers):
      x, cache = layer(x, positions, mask, deterministic, None if caches is None else caches[i], causal)
      new_caches.append(cache)
    return self.final_norm(x), (None if caches is None else new_caches)

  def logits(self, h):
    if self.cfg.tie_embeddings:
      logits = self.embed.attend(h)
    else:
      logits = self.lm_head(h)
    return nn.with_logical_constraint(logits.astype(jnp.float32), layers.ACT_BTV)

  def __call__(self, tokens, positions=None, segment_ids=None, deterministic=True, return_hidden=False):
    """tokens, positions, segment_ids: [B, T] int32 (segment 0 = padding) -> logits [B, T, V]
    (`return_hidden`: the final normed hidden states [B, T, D] instead; `logits` maps them)."""
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    mask = layers.attention_inputs(segment_ids, self.cfg.attention, self.cfg.compute_dtype, self.cfg.packed_rows)
    h, _ = self.hidden(self.embed_tokens(tokens), positions, mask, deterministic, causal=True)
    return h if return_hidden else self.logits(h)
