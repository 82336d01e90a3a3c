"""The fast attention and LoRA matmul paths against the plain einsum/autodiff versions:
values and gradients, with packed segments and padding."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmjax.models import layers


def _naive_attention(q, k, v, mask):
  return layers.dot_product_attention(q, k, v, mask, "xla", causal=False)


def _packed_segments(rng, b, t):
  """Rows of 1-3 packed segments followed by padding (segment 0); one row without padding."""
  seg = np.zeros((b, t), np.int32)
  for r in range(b):
    end = t if r == 0 else int(rng.integers(t // 2, t + 1))
    cuts = sorted(rng.choice(np.arange(1, end), size=int(rng.integers(0, 3)), replace=False))
    bounds = [0, *cuts, end]
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
      seg[r, lo:hi] = s + 1
  return jnp.asarray(seg)


@pytest.mark.parametrize("t,n,kh,block", [(256, 4, 2, None), (200, 4, 4, 64), (96, 2, 1, 32), (70, 3, 3, 64)])
def test_causal_block_attention_matches_dense(t, n, kh, block):
  rng = np.random.default_rng(t)
  b, h = 3, 16
  ks = jax.random.split(jax.random.key(t), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, kh, h))
  v = jax.random.normal(ks[2], (b, t, kh, h))
  seg = _packed_segments(rng, b, t)
  mask = layers.attention_mask(seg, seg, causal=True)
  valid = (seg != 0)[:, :, None, None]  # rows that see at least one key
  w = jax.random.normal(ks[3], (b, t, n, h)) * valid  # loss ignores padding rows

  fast = functools.partial(layers.causal_block_attention, block=block)
  np.testing.assert_allclose(np.where(valid, fast(q, k, v, mask), 0), np.where(valid, _naive_attention(q, k, v, mask), 0),
                             rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, mask) * w)
  g_fast = jax.grad(loss(fast), argnums=(0, 1, 2))(q, k, v)
  g_ref = jax.grad(loss(_naive_attention), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g_fast, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_dot_product_attention_dispatches_causal_path():
  b, t, n, h = 2, 192, 2, 8
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (b, t, n, h)) for kk in ks)
  seg = jnp.ones((b, t), jnp.int32).at[1, 150:].set(2)
  mask = layers.attention_mask(seg, seg, causal=True)
  out = layers.dot_product_attention(q, k, v, mask, "xla", causal=True)
  np.testing.assert_allclose(out, _naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)
  # jitted: the dispatch is static, the result the same
  out_jit = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, "auto", causal=True))(q, k, v)
  np.testing.assert_allclose(out_jit, out, rtol=1e-6, atol=1e-6)


def test_model_logits_and_grads_unchanged_by_causal_blocks():
  """The decoder with the block path equals the decoder run with the dense mask path."""
  from mmjax import lora
  from mmjax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48)
  model = Llama(cfg)
  b, t = 2, 160
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(1, 50, (b, t)), jnp.int32)
  seg = _packed_segments(rng, b, t)
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
  ad = lora.init(jax.random.key(1), params, r".*(q_proj|v_proj|gate_proj)", 4)
  ad = jax.tree.map(lambda x: x + 0.05, ad)  # non-zero b
  mask = layers.attention_mask(seg, seg, causal=True)
  valid = (seg != 0)[..., None]

  def logits(adapter, causal):
    v = {"params": params, "lora": adapter}
    h, _ = model.apply(v, model.apply(v, tokens, method=Llama.embed_tokens), pos, mask, True, None, causal,
                       method=Llama.hidden)
    return model.apply(v, h, method=Llama.logits)

  np.testing.assert_allclose(logits(ad, True) * valid, logits(ad, False) * valid, rtol=1e-5, atol=1e-5)
  wts = jax.random.normal(jax.random.key(2), (b, t, 50)) * valid
  loss = lambda causal: lambda a: jnp.sum(jax.nn.log_softmax(logits(a, causal)) * wts)
  g1, g0 = jax.grad(loss(True))(ad), jax.grad(loss(False))(ad)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(y))))


def _padded_segments(rng, b, t):
  """One right-padded example per row (segment 1, then 0); one row without padding."""
  lengths = [t] + [int(x) for x in rng.integers(t // 3, t, b - 1)]
  return jnp.asarray((np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32))


@pytest.mark.parametrize("layout", ["causal", "padded", "packed"])
def test_fused_path_equals_todays_attention(layout):
  """'cudnn' runs `jax.nn.dot_product_attention` (its XLA implementation on CPU) with
  is_causal and sequence lengths (no mask) for unpacked rows, the mask with is_causal for
  packed ones: the same values and gradients as the 'xla' path on every row that sees a key."""
  rng = np.random.default_rng(1)
  b, t, n, kh, h = 3, 96, 4, 2, 16
  ks = jax.random.split(jax.random.key(1), 4)
  q = jax.random.normal(ks[0], (b, t, n, h))
  k = jax.random.normal(ks[1], (b, t, kh, h))
  v = jax.random.normal(ks[2], (b, t, kh, h))
  seg = {"causal": jnp.ones((b, t), jnp.int32), "padded": _padded_segments(rng, b, t),
         "packed": _packed_segments(rng, b, t)}[layout]
  fused_in = layers.attention_inputs(seg, "cudnn", jnp.float32, packed_rows=layout == "packed")
  assert fused_in.shape == ((b, 1, t, t) if layout == "packed" else (b,))  # no mask unless packed
  mask = layers.attention_mask(seg, seg, causal=True)
  assert layers.attention_inputs(seg, "xla", jnp.float32, packed_rows=False).shape == (b, 1, t, t)
  valid = (seg != 0)[:, :, None, None]
  w = jax.random.normal(ks[3], (b, t, n, h)) * valid
  fused = lambda q, k, v: layers.dot_product_attention(q, k, v, fused_in, "cudnn", causal=True)
  today = lambda q, k, v: layers.dot_product_attention(q, k, v, mask, "xla", causal=True)
  np.testing.assert_allclose(np.where(valid, fused(q, k, v), 0), np.where(valid, today(q, k, v), 0),
                             rtol=1e-5, atol=1e-5)
  g_fused = jax.grad(lambda *a: jnp.sum(fused(*a) * w), argnums=(0, 1, 2))(q, k, v)
  g_today = jax.grad(lambda *a: jnp.sum(today(*a) * w), argnums=(0, 1, 2))(q, k, v)
  for a, r in zip(g_fused, g_today):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5)


def test_vit_attention_without_a_mask_equals_the_all_ones_mask():
  ks = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(kk, (2, 50, 3, 8)) for kk in ks)
  ones = jnp.ones((2, 1, 50, 50), bool)
  want = layers.dot_product_attention(q, k, v, ones, "xla")
  np.testing.assert_allclose(layers.dot_product_attention(q, k, v, None, "xla"), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(layers.dot_product_attention(q, k, v, None, "cudnn"), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed", [False, True])
def test_decoder_on_the_fused_path_equals_the_xla_path(packed):
  """A whole decoder (attention='cudnn', which on CPU is jax.nn's XLA implementation) gives
  the logits and adapter gradients of attention='xla' on padded and on packed rows."""
  import dataclasses
  from mmjax import lora
  from mmjax.models.llama import Llama, LlamaConfig
  cfg = LlamaConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=48,
                    attention="xla", packed_rows=packed)
  b, t = 3, 80
  rng = np.random.default_rng(3)
  tokens = jnp.asarray(rng.integers(1, 50, (b, t)), jnp.int32)
  seg = _packed_segments(rng, b, t) if packed else _padded_segments(rng, b, t)
  pos = jnp.asarray(np.concatenate([[np.arange(t)]] * b))
  params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), tokens)["params"])
  ad = jax.tree.map(lambda x: x + 0.05, lora.init(jax.random.key(1), params, r".*(q_proj|v_proj)", 4))
  valid = (seg != 0)[..., None]
  wts = jax.random.normal(jax.random.key(2), (b, t, 50)) * valid

  def loss(attention):
    model = Llama(dataclasses.replace(cfg, attention=attention))
    return lambda a: jnp.sum(jax.nn.log_softmax(model.apply({"params": params, "lora": a}, tokens, pos, seg)) * wts)

  np.testing.assert_allclose(loss("cudnn")(ad), loss("xla")(ad), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(jax.grad(loss("cudnn"))(ad)), jax.tree.leaves(jax.grad(loss("xla"))(ad))):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(y))))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_lora_matmul_matches_autodiff(dtype):
  ks = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(ks[0], (2, 5, 12)).astype(dtype)
  w = (jax.random.normal(ks[1], (12, 7)) * 0.3).astype(dtype)
  a = (jax.random.normal(ks[2], (12, 3)) * 0.3).astype(dtype)
  b = (jax.random.normal(ks[3], (3, 7)) * 0.3).astype(dtype)
  dy = jax.random.normal(ks[4], (2, 5, 7)).astype(dtype)
  scale = 2.5
  plain = lambda x, w, a, b: jnp.dot(x, w) + jnp.dot(jnp.dot(x, a), b) * scale
  f32 = lambda t: np.asarray(t, np.float32)
  # bf16: compare with the float32 result of the same inputs, to bf16 resolution of the largest entry
  tol = (lambda ref: dict(rtol=1e-5, atol=1e-5)) if dtype == jnp.float32 else (
      lambda ref: dict(rtol=0, atol=2e-2 * float(np.abs(ref).max())))
  args32 = [jnp.asarray(t, jnp.float32) for t in (x, w, a, b)]
  ref = f32(plain(*args32))
  np.testing.assert_allclose(f32(layers.lora_matmul(x, w, a, b, scale)), ref, **tol(ref))
  loss = lambda f: lambda *args: jnp.sum((f(*args) * dy).astype(jnp.float32))
  g = jax.grad(loss(lambda x, w, a, b: layers.lora_matmul(x, w, a, b, scale)), argnums=(0, 1, 2, 3))(x, w, a, b)
  r = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(*args32)
  for u, v in zip(g, r):
    assert u.dtype == dtype
    np.testing.assert_allclose(f32(u), f32(v), **tol(f32(v)))


def test_lora_matmul_zero_adapter_is_base_and_jits():
  x = jnp.ones((4, 6))
  w = jnp.arange(18.0).reshape(6, 3)
  a, b = jnp.ones((6, 2)), jnp.zeros((2, 3))
  np.testing.assert_array_equal(jax.jit(lambda *t: layers.lora_matmul(*t, 2.0))(x, w, a, b), x @ w)


def test_fused_cross_entropy_matches_naive_values_and_grads():
  from mmjax import losses
  ks = jax.random.split(jax.random.key(3), 3)
  logits = jax.random.normal(ks[0], (3, 7, 11)) * 3
  targets = jax.random.randint(ks[1], (3, 7), 0, 11)
  mask = (jax.random.uniform(ks[2], (3, 7)) > 0.3).astype(jnp.int32)
  s0, c0 = losses.cross_entropy(logits, targets, mask)
  s1, c1 = losses.fused_cross_entropy(logits, targets, mask)
  s2, c2, hits = losses.cross_entropy_and_accuracy(logits, targets, mask)
  np.testing.assert_allclose(s1, s0, rtol=1e-6)
  np.testing.assert_allclose(s2, s0, rtol=1e-6)
  assert float(c1) == float(c0) == float(c2)
  np.testing.assert_allclose(hits, losses.token_accuracy(logits, targets, mask)[0])
  g0 = jax.grad(lambda x: losses.cross_entropy(x, targets, mask)[0])(logits)
  g1 = jax.grad(lambda x: losses.fused_cross_entropy(x, targets, mask)[0])(logits)
  g2 = jax.jit(jax.grad(lambda x: losses.cross_entropy_and_accuracy(x, targets, mask)[0]))(logits)
  np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g2, g0, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g1[np.asarray(mask) == 0]).max()) == 0.0  # masked positions get no gradient


def test_accuracy_ties_count_when_target_reaches_the_max():
  from mmjax import losses
  logits = jnp.zeros((1, 2, 4))  # every index ties
  targets = jnp.array([[0, 3]])
  mask = jnp.ones((1, 2))
  assert float(losses.cross_entropy_and_accuracy(logits, targets, mask)[2]) == 2.0
  assert float(losses.token_accuracy(logits, targets, mask)[0]) == 1.0  # argmax picks index 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_swiglu_matches_autodiff(dtype):
  ks = jax.random.split(jax.random.key(4), 3)
  gate = (jax.random.normal(ks[0], (3, 5, 16)) * 3).astype(dtype)
  up = jax.random.normal(ks[1], (3, 5, 16)).astype(dtype)
  dy = jax.random.normal(ks[2], (3, 5, 16))
  plain = lambda g, u: jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)
  tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  out = layers.swiglu(gate, up)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), plain(gate, up), **tol)
  loss = lambda f: lambda g, u: jnp.sum(f(g, u).astype(jnp.float32) * dy)
  got = jax.jit(jax.grad(loss(layers.swiglu), argnums=(0, 1)))(gate, up)
  ref = jax.grad(loss(plain), argnums=(0, 1))(gate.astype(jnp.float32), up.astype(jnp.float32))
  for a, r in zip(got, ref):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), r, **(dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else tol))


def test_rope_table_matches_direct_formula_and_flags_out_of_range_positions():
  ks = jax.random.split(jax.random.key(5), 2)
  b, t, n, h = 2, 40, 3, 16
  x = jax.random.normal(ks[0], (b, t, n, h))
  pos = jax.random.randint(ks[1], (b, t), 0, 50)
  inv = layers.rope_frequencies(h, 10000.0)
  angles = pos[..., None].astype(jnp.float32) * inv
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
  x1, x2 = jnp.split(x, 2, axis=-1)
  ref = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  np.testing.assert_allclose(jax.jit(lambda x, p: layers.apply_rope(x, p, inv, 50))(x, pos), ref, rtol=1e-5, atol=1e-5)
  out = layers.apply_rope(x, pos, inv, 30)  # positions 30..49 are outside the table: NaN, not a wrong angle
  bad = np.asarray(pos >= 30)
  assert np.isnan(np.asarray(out)[bad]).all() and np.isfinite(np.asarray(out)[~bad]).all()
