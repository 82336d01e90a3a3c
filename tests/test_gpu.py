"""GPU checks (marker `gpu`): cuDNN flash attention against XLA attention in bf16 (causal,
padded and packed rows, values and gradients; the sampler's prefill) and a bf16 LoRA train
step. They run on an NVIDIA GPU (`python tools/gpu_check.py` runs them and then the
benchmarks) and are skipped elsewhere, unless MMJAX_GPU_TESTS_ON_CPU=1, which runs them on
the CPU, where 'cudnn' is jax.nn's XLA implementation (how `gpu_check.py --smoke` checks
this file)."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmjax.models import layers

ON_GPU = jax.default_backend() == "gpu"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ON_GPU and os.environ.get("MMJAX_GPU_TESTS_ON_CPU") != "1",
                                                  reason="needs an NVIDIA GPU (or MMJAX_GPU_TESTS_ON_CPU=1)")]
BF16 = dict(rtol=3e-2, atol=3e-2)  # bf16 inputs, different accumulation orders


def _segments(layout, b, t, rng):
  if layout == "causal":
    return np.ones((b, t), np.int32)
  if layout == "padded":
    lengths = np.concatenate([[t], rng.integers(t // 3, t, b - 1)])
    return (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  seg = np.zeros((b, t), np.int32)  # packed: 1-3 examples per row, then padding
  for r in range(b):
    end = t - int(rng.integers(0, t // 4))
    cuts = sorted(rng.choice(np.arange(1, end), size=int(rng.integers(1, 3)), replace=False))
    for s, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, end])):
      seg[r, lo:hi] = s + 1
  return seg


@pytest.mark.parametrize("layout", ["causal", "padded", "packed"])
def test_cudnn_attention_matches_xla_in_bf16(layout):
  rng = np.random.default_rng(0)
  b, t, n, kh, h = 4, 512, 8, 2, 128
  ks = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(ks[0], (b, t, n, h), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, kh, h), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, kh, h), jnp.bfloat16)
  seg = jnp.asarray(_segments(layout, b, t, rng))
  fused_in = layers.attention_inputs(seg, "cudnn", jnp.bfloat16, packed_rows=layout == "packed")
  mask = layers.attention_mask(seg, seg, causal=True)
  valid = (seg != 0)[:, :, None, None]
  w = (jax.random.normal(ks[3], (b, t, n, h)) * valid).astype(jnp.float32)
  fused = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, fused_in, "cudnn", causal=True))
  xla = jax.jit(lambda q, k, v: layers.dot_product_attention(q, k, v, mask, "xla", causal=True))
  got, want = (np.where(valid, np.asarray(f(q, k, v), np.float32), 0) for f in (fused, xla))
  np.testing.assert_allclose(got, want, **BF16)
  grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=(0, 1, 2)))
  for a, r in zip(grad(fused)(q, k, v), grad(xla)(q, k, v)):
    a, r = np.asarray(a, np.float32), np.asarray(r, np.float32)
    np.testing.assert_allclose(a, r, rtol=5e-2, atol=5e-2 * float(np.abs(r).max()))


def _tiny_llama(attention, **kw):
  from mmjax.models.llama import LlamaConfig
  return LlamaConfig(vocab_size=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=512,
                     dtype="bfloat16", param_dtype="bfloat16", attention=attention, **kw)


def test_sampler_prefill_on_cudnn_matches_xla():
  from mmjax import sample
  from mmjax.models.llama import Llama
  cfg = _tiny_llama("xla")
  params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
  prompts = [[5, 9, 2, 7, 1, 3, 8, 4, 6, 11, 12, 13], [7, 3], [1, 2, 3, 4, 5]]
  out = {}
  for attention in ("xla", "cudnn"):
    model = Llama(dataclasses.replace(cfg, attention=attention))
    tokens, counts = sample.generate(model, {"params": params}, prompts, max_new_tokens=8, prompt_len=16)
    out[attention] = np.asarray(tokens)
  assert (out["cudnn"][:, :4] == out["xla"][:, :4]).mean() >= 0.9  # bf16 greedy paths may part late


def test_bf16_lora_train_step():
  """A bf16 base with fp32 adapter and moments trains on the cuDNN path and tracks the XLA path."""
  from mmjax import sharding
  from mmjax.config import schema
  from mmjax.train import run as run_lib
  losses = {}
  for attention in ("cudnn", "xla"):
    c = schema.base_config()
    c.model.update(vocab_size=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, mlp_dim=512,
                   dtype="bfloat16", param_dtype="bfloat16", attention=attention, logits_chunk=64)
    c.lora.update(rank=8, alpha=16.0)
    c.seq_len, c.batch_size, c.steps = 256, 4, 8
    c.optimizer.update(lr=3e-3, warmup_steps=0)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    run = run_lib.build(c, mesh, 256)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, (4, 256)).astype(np.int32)
    lengths = np.array([256, 200, 150, 90])
    seg = (np.arange(256)[None] < lengths[:, None]).astype(np.int32)
    batch = run.global_batch(dict(tokens=tokens, targets=np.roll(tokens, -1, 1), loss_mask=seg, segment_ids=seg,
                                  positions=np.broadcast_to(np.arange(256, dtype=np.int32), (4, 256)).copy()))
    with jax.set_mesh(mesh):
      state = run.init_state(jax.random.key(0))
      assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype(jnp.float32)}
      out = []
      for _ in range(6):
        state, m = run.train_step(state, batch, jax.random.key(1))
        out.append(float(m["loss"]))
    losses[attention] = np.array(out)
  assert np.all(np.isfinite(losses["cudnn"])) and losses["cudnn"][-1] < losses["cudnn"][0]
  np.testing.assert_allclose(losses["cudnn"], losses["xla"], rtol=3e-2)
