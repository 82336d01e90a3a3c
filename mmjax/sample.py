"""Batched generation with a KV cache for the Llama decoder.

    tokens, lengths = generate(model, variables, [[5, 9, 2], [7]], max_new_tokens=32)

Layout. Prompts (ragged lists, or a right-padded [B, P] array with `lengths`) are moved
inside the jitted function to the right edge of a [B, P] block (left padding), so every
row's last prompt token sits at slot P-1 and decode step t writes cache slot P+t-1 for all
rows at once. Each cache slot s of row b holds position `s - (P - length_b)`: real prompt
tokens get positions 0..length_b-1, exactly as without padding, and the pad slots are
masked out of attention (segment 0). The cache is [B, P + max_new_tokens - 1, K, H] per
layer.

Decoding is a prefill of the whole prompt block, then a `jax.lax.while_loop` of one-token
steps with fixed shapes that ends after `max_new_tokens` or when every row has emitted a
stop token (a stopped row emits `pad_id` from then on). One jitted function is kept per
(model config, max_new_tokens, greedy / sampled / sampled with top-k or top-p filtering,
pad_id, mesh, rules); `temperature`, `top_k`, `top_p`, the stop tokens (padded to a multiple
of 8) and the key are traced values, so changing them does not recompile; new batch or
prompt widths do (`prompt_len` fixes the width). `trace_count()` counts traces for tests.

Sharding: with a mesh, the batch (padded up to a multiple of the data-parallel size with
dummy rows) is sharded over the mesh axes of the `act_batch` rule, and so is the cache;
the variables keep whatever sharding they arrive with.

The prefill runs on the model's attention path (cuDNN's fused kernel on a GPU in bf16, over
the prompt block's own keys with `is_causal`); the one-token decode steps attend over the cache
with XLA. No remat and no LoRA dropout; none of this changes results.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from mmjax import sharding
from mmjax.models import layers

_TRACES = collections.Counter()
_JITTED: dict = {}
_STOP_BUCKET = 8  # stop-token lists are padded to a multiple of this (fewer distinct shapes)


def trace_count() -> int:
  """How many times a generation function has been traced (compiled) in this process."""
  return sum(_TRACES.values())


def _lm_cfg(cfg):
  """The decoder's config (a VLM's `llm`, or the config itself)."""
  return getattr(cfg, "llm", cfg)


def _forward(module, tokens, positions, mask, caches, media=None):
  """tokens, positions: [B, T]; mask: [B, 1, T, S] -> logits of the last position [B, V], caches.
  `media` (prefill of a VLM only): {'images': ...} or {'frames': ...} spliced at placeholders."""
  x = module.embed(tokens, **media) if media else module.embed_tokens(tokens)
  h, caches = module.hidden(x, positions, mask, True, caches)
  logits = module.logits(h[:, -1:])[:, 0]
  for placeholder in getattr(module.cfg, "placeholder_ids", ()):  # a VLM never generates a visual placeholder
    logits = logits.at[:, placeholder].set(-jnp.inf)
  return logits, caches


def _choose(logits, key, temperature, top_k, top_p, *, sample: bool, filtered: bool):
  """Next tokens [B] from logits [B, V]: argmax, or a draw from softmax(logits / temperature)
  restricted to the top_k (0 = all) most likely tokens and to the smallest set whose
  probability reaches top_p. top_k and top_p are traced, so changing them does not recompile."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if filtered:  # one sort serves both filters
    v = logits.shape[-1]
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    kth = jax.lax.dynamic_index_in_dim(ranked, jnp.where(top_k > 0, jnp.minimum(top_k, v) - 1, v - 1), 1)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above each
    nucleus = jnp.min(jnp.where(before < top_p, ranked, jnp.inf), axis=-1, keepdims=True)  # keeps the top one
    nucleus = jnp.where(top_p < 1.0, nucleus, -jnp.inf)  # top_p = 1: no rounding can drop the tail
    logits = jnp.where(logits < jnp.maximum(kth, nucleus), -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _generate(variables, tokens, lengths, stop, temperature, top_k, top_p, rng, media, *, model, max_new: int,
              sample: bool, filtered: bool, pad_id: int, mesh, rules):
  """tokens: [B, P] right-padded; lengths: [B] -> (generated [B, max_new], counts [B])."""
  _TRACES[id(model)] += 1
  c = _lm_cfg(model.cfg)
  b, p = tokens.shape
  s = p + max_new - 1
  dtype = c.compute_dtype

  def constrain(x):
    if mesh is None:
      return x
    spec = sharding.logical_to_spec(("act_batch",) + (None,) * (x.ndim - 1), x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  # Right-align each prompt (left padding); slot positions are `slot - pad`.
  pad = p - lengths
  src = jnp.arange(p)[None] - pad[:, None]
  is_real = src >= 0
  left = jnp.where(is_real, jnp.take_along_axis(tokens, jnp.maximum(src, 0), axis=1), pad_id)
  kv_pos = jnp.arange(s)[None] - pad[:, None]  # [B, S]
  kv_seg = jnp.concatenate([is_real, jnp.zeros((b, s - p), bool)], axis=1).astype(jnp.int32)
  kv_shape = (b, s, c.n_kv_heads, c.head_dim)
  caches = [dict(k=constrain(jnp.zeros(kv_shape, dtype)), v=constrain(jnp.zeros(kv_shape, dtype)),
                 index=jnp.int32(0)) for _ in range(c.n_layers)]
  choose = functools.partial(_choose, temperature=temperature, top_k=top_k, top_p=top_p, sample=sample,
                             filtered=filtered)

  q_pos = kv_pos[:, :p]
  mask = layers.attention_mask(is_real.astype(jnp.int32), kv_seg, True, q_pos, kv_pos)
  logits, caches = model.apply(variables, left, jnp.maximum(q_pos, 0), mask, caches, media, method=_forward)
  first = choose(logits, jax.random.fold_in(rng, 0))
  done = jnp.isin(first, stop)
  out = jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first)
  counts = jnp.ones((b,), jnp.int32)

  def cond(state):
    t, _, _, done, _, _, _ = state
    return (t < max_new) & ~jnp.all(done)

  def body(state):
    t, out, last, done, counts, caches, kv_seg = state
    slot = p + t - 1
    kv_seg = jax.lax.dynamic_update_slice_in_dim(kv_seg, jnp.ones((b, 1), jnp.int32), slot, 1)
    pos = jax.lax.dynamic_slice_in_dim(kv_pos, slot, 1, 1)  # [B, 1]
    mask = layers.attention_mask(jnp.ones((b, 1), jnp.int32), kv_seg, True, pos, kv_pos)
    caches = [dict(cache, index=slot) for cache in caches]
    logits, caches = model.apply(variables, last[:, None], pos, mask, caches, method=_forward)
    new = jnp.where(done, pad_id, choose(logits, jax.random.fold_in(rng, t)))
    out = jax.lax.dynamic_update_slice_in_dim(out, new[:, None], t, 1)
    counts = counts + (~done).astype(jnp.int32)
    done = done | jnp.isin(new, stop)
    return t + 1, out, new, done, counts, caches, kv_seg

  state = (jnp.int32(1), out, first, done, counts, caches, kv_seg)
  _, out, _, _, counts, _, _ = jax.lax.while_loop(cond, body, state)
  return out, counts


def _jitted(model, max_new, sample, filtered, pad_id, mesh, rules):
  fast = dict(remat="none", lora_dropout=0.0)
  if hasattr(model.cfg, "llm"):  # a VLM: decode settings for both towers
    cfg = dataclasses.replace(model.cfg, llm=dataclasses.replace(model.cfg.llm, **fast),
                              vision=dataclasses.replace(model.cfg.vision, **fast))
  else:
    cfg = dataclasses.replace(model.cfg, **fast)
  cfg_key = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
  key = (type(model), cfg_key, max_new, sample, filtered, pad_id, mesh, rules)
  if key not in _JITTED:
    fn = functools.partial(_generate, model=type(model)(cfg), max_new=max_new, sample=sample, filtered=filtered,
                           pad_id=pad_id, mesh=mesh, rules=rules)
    _JITTED[key] = jax.jit(sharding.in_context(fn, mesh, rules))
  return _JITTED[key]


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
  """Ragged token-id lists -> (right-padded [B, P] int32, lengths [B] int32)."""
  lengths = np.asarray([len(x) for x in prompts], np.int32)
  width = int(lengths.max()) if length is None else int(length)
  if lengths.max() > width:
    raise ValueError(f"a prompt has {lengths.max()} tokens, more than prompt_len={width}")
  out = np.full((len(prompts), width), pad_id, np.int32)
  for i, x in enumerate(prompts):
    out[i, : len(x)] = x
  return out, lengths


def generate(model, variables: dict, prompts, *, lengths=None, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), rng: jax.Array | None = None,
             pad_id: int = 0, prompt_len: int | None = None, mesh=None, rules=sharding.DEFAULT_RULES,
             images=None, frames=None) -> tuple[jax.Array, jax.Array]:
  """Samples continuations of a batch of prompts.

  model: a `Llama` or a `VLM` (its config is used, with remat and LoRA dropout off for
    decoding). For a VLM, `images` [B, H, W, C] or `frames` [B, T, H, W, C] fill the
    prompts' image placeholders, and the placeholder token is never generated.
  variables: {'params': ..., optionally 'lora': ...}.
  prompts: list of token-id lists, or a right-padded [B, P] int array with `lengths` [B]
    (every prompt needs at least one token). `prompt_len` pads lists to a fixed P so that
    prompts of different lengths reuse one compiled function.
  temperature: 0 = greedy (argmax; top_k/top_p unused); otherwise softmax(logits / T)
    restricted to the `top_k` most likely tokens (0 = all) and to the smallest set whose
    probability reaches `top_p`, drawn with `rng` folded with the step.
  stop_tokens: a row ends after emitting one of these (it is kept in the output).

  Returns (tokens [B, max_new_tokens] int32, padded with `pad_id` after a row stops;
  lengths [B] int32: tokens generated per row, the stop token included).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  vocab = _lm_cfg(model.cfg).vocab_size
  if not 0 <= top_k <= vocab:
    raise ValueError(f"top_k={top_k} must be in [0, vocab_size={vocab}] (0 = off)")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1]")
  sample = temperature > 0
  if sample and rng is None:
    raise ValueError("temperature > 0 needs an rng key")
  rng = jax.random.key(0) if rng is None else rng
  if lengths is None:
    if isinstance(prompts, (list, tuple)):
      tokens, lengths = pad_prompts(prompts, pad_id, prompt_len)
    else:
      tokens = np.asarray(prompts, np.int32)
      lengths = np.full((tokens.shape[0],), tokens.shape[1], np.int32)
  else:
    tokens, lengths = np.asarray(prompts, np.int32), np.asarray(lengths, np.int32)
  if tokens.ndim != 2 or lengths.shape != tokens.shape[:1]:
    raise ValueError(f"prompts must be [B, P] with lengths [B]; got {tokens.shape} and {lengths.shape}")
  if lengths.min() < 1 or lengths.max() > tokens.shape[1]:
    raise ValueError(f"prompt lengths must be in [1, {tokens.shape[1]}]; got {lengths.tolist()}")
  n = tokens.shape[0]
  media = {k: np.asarray(v, np.float32) for k, v in (("images", images), ("frames", frames)) if v is not None}
  if mesh is not None:
    # Dummy rows (one pad token) make the batch divide the data-parallel axes.
    extra = -n % sharding.data_parallel_size(mesh, rules)
    tokens = np.concatenate([tokens, np.full((extra, tokens.shape[1]), pad_id, np.int32)])
    lengths = np.concatenate([lengths, np.ones((extra,), np.int32)])
    row = sharding.batch_sharding(mesh, rules, 1)
    tokens = jax.device_put(tokens, sharding.batch_sharding(mesh, rules, 2))
    lengths = jax.device_put(lengths, row)
    media = {k: jax.device_put(np.concatenate([v, np.repeat(v[:1], extra, 0)]),
                               sharding.batch_sharding(mesh, rules, v.ndim)) for k, v in media.items()}
  stop = list(stop_tokens)
  stop += [-1] * (-len(stop) % _STOP_BUCKET)  # -1 never matches; buckets keep the shape fixed
  filtered = sample and (top_k > 0 or top_p < 1.0)
  fn = _jitted(model, int(max_new_tokens), sample, filtered, int(pad_id), mesh, sharding.rules_from_config(rules))
  out, counts = fn(variables, tokens, lengths, jnp.asarray(stop, jnp.int32), jnp.float32(temperature),
                   jnp.int32(top_k), jnp.float32(top_p), rng, media)
  return out[:n], counts[:n]
