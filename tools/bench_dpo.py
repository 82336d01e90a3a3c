"""DPO step time relative to an SFT step over the same number of tokens.

  python tools/bench_dpo.py [--shape bench_small] [--steps 5] [--warmup 2] [--out FILE]

Shape bench_small (as in tools/bench.py): LLaMA-style d512, 8 layers, vocab 8192, fp32,
LoRA rank 16 on every projection; DPO batch = 8 pairs of 256-token chosen and rejected
rows; the SFT step runs the same 16 rows of 256 tokens. Reports the median step time of
SFT, DPO with the `adapter_base` reference (an extra no-grad forward of both rows) and
DPO with precomputed reference log-probs, and the ratios (targets: <= 1.6x and <= 1.1x).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

SHAPES = {
    "bench_small": dict(model=dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64,
                                   mlp_dim=1408, dtype="float32", param_dtype="float32"),
                        seq_len=256, pairs=8, lora=dict(rank=16, alpha=32.0)),
    "tiny": dict(model=dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                            mlp_dim=64, dtype="float32", param_dtype="float32"),
                 seq_len=32, pairs=4, lora=dict(rank=4, alpha=8.0)),
}
LORA_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def make_config(shape: str, objective: str, reference: str = "adapter_base"):
  from mmjax.config import schema
  s = SHAPES[shape]
  c = schema.base_config()
  c.model.update(s["model"])
  c.lora.update(targets=LORA_TARGETS, **s["lora"])
  c.trainable = ("lora/.*",)
  c.seq_len = s["seq_len"]
  c.batch_size = s["pairs"] * (2 if objective == "sft" else 1)
  c.objective = objective
  c.dpo.update(reference=reference)
  c.optimizer.update(lr=1e-4, warmup_steps=0, schedule="constant")
  return c


def _rows(n, seq_len, vocab, rng, prompt=32):
  tokens = rng.integers(1, vocab, size=(n, seq_len), dtype=np.int32)
  mask = np.ones((n, seq_len), np.int32)
  mask[:, :prompt] = 0
  return dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1), mask=mask,
              segment_ids=np.ones((n, seq_len), np.int32),
              positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len)).copy())


def make_batch(config, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  v, t = config.model.vocab_size, config.seq_len
  if config.objective == "sft":
    r = _rows(config.batch_size, t, v, rng)
    return dict(tokens=r["tokens"], targets=r["targets"], loss_mask=r["mask"], segment_ids=r["segment_ids"],
                positions=r["positions"])
  out = {}
  for p in ("chosen", "rejected"):
    out.update({f"{p}_{k}": x for k, x in _rows(config.batch_size, t, v, rng).items()})
  if config.dpo.reference == "precomputed":
    out["ref_chosen_logps"] = rng.normal(size=(config.batch_size, 1)).astype(np.float32) - 2000
    out["ref_rejected_logps"] = rng.normal(size=(config.batch_size, 1)).astype(np.float32) - 2000
  return out


def time_step(config, steps: int = 5, warmup: int = 2) -> dict:
  """Median seconds per train step (compile excluded) of `config` on one device."""
  from mmjax import sharding
  from mmjax.train import run as run_lib
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  run = run_lib.build(config, mesh, config.model.vocab_size)
  batch = run.global_batch(make_batch(config))
  times = []
  with jax.set_mesh(mesh):
    state = run.init_state(jax.random.key(0))
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, m = run.train_step(state, batch, jax.random.key(1))
      jax.block_until_ready(m)
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "loss": float(m["loss"])}


def bench(shape: str = "bench_small", steps: int = 5, warmup: int = 2) -> dict:
  sft = time_step(make_config(shape, "sft"), steps, warmup)
  base = time_step(make_config(shape, "dpo", "adapter_base"), steps, warmup)
  pre = time_step(make_config(shape, "dpo", "precomputed"), steps, warmup)
  return {
      "shape": shape, "device": jax.devices()[0].device_kind, "steps": steps,
      "sft_s": sft["median_s"], "dpo_adapter_base_s": base["median_s"], "dpo_precomputed_s": pre["median_s"],
      "ratio_adapter_base": base["median_s"] / sft["median_s"],
      "ratio_precomputed": pre["median_s"] / sft["median_s"],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", default="bench_small", choices=sorted(SHAPES))
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="")
  a = p.parse_args(argv)
  r = bench(a.shape, a.steps, a.warmup)
  print(f"{r['shape']} on {r['device']}: SFT {r['sft_s'] * 1e3:.1f} ms, DPO adapter_base "
        f"{r['dpo_adapter_base_s'] * 1e3:.1f} ms ({r['ratio_adapter_base']:.2f}x, target <= 1.6x), DPO precomputed "
        f"{r['dpo_precomputed_s'] * 1e3:.1f} ms ({r['ratio_precomputed']:.2f}x, target <= 1.1x)")
  if a.out:
    with open(a.out, "w") as f:
      json.dump(r, f, indent=1)


if __name__ == "__main__":
  main()
