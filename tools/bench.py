"""Benchmarks of mmjax's real jitted functions on named shapes.

  python tools/bench.py --shape bench_small [--mode train|sample|dpo] [--steps N] [--warmup W] [--peak] [--out FILE]

`--mode train` builds the train step through `mmjax.train.run.build` (the function a run
uses), feeds random token batches and reports: tokens/s (median over the timed steps
after warmup), step time, TFLOP/s from the run's analytic FLOPs per token, the fraction of
the measured matmul peak (`--peak` times a jitted f32 2048x2048 matmul once), peak memory
(host RSS on CPU, device memory stats on accelerators), compile time (first call minus the
median step) and the number of backend compiles after the first step (must be 0).

`--mode sample` times KV-cache greedy generation; `--mode dpo` times DPO steps (adapter_base
and precomputed reference) against an SFT step over the same tokens (`tools/bench_dpo.py`).
Modes are entries of `MODES` (name -> function(config, args) -> report dict). Shapes are
entries of `SHAPES`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmjax import runtime  # noqa: E402

if runtime.cpu_backend_expected():
  runtime.reuse_host_memory()  # as mmjax.main does by default on CPU hosts (config.reuse_host_memory)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Shapes: model fields of config.model, plus run sizes and LoRA settings.
SHAPES = {
    # LLaMA-style 8-layer decoder, same as the peer baselines in shared/peers.
    "bench_small": dict(
        model=dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, head_dim=64,
                   mlp_dim=1408, norm_eps=1e-5, rope_theta=10000.0, dtype="float32",
                   param_dtype="float32"),
        seq_len=256, batch_size=8, lora=dict(rank=16, alpha=32.0)),
    # Llama-3-8B's layer (GQA 32/8 heads, SwiGLU 14336, 128k vocabulary) in bf16 with remat and
    # chunked logits, for one GPU (`tools/gpu_check.py` sets n_layers to what fits).
    "llama3_8b": dict(
        model=dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
                   mlp_dim=14336, norm_eps=1e-5, rope_theta=500000.0, dtype="bfloat16", param_dtype="bfloat16",
                   remat="dots_no_batch", attention="auto", logits_chunk=512),
        seq_len=4096, batch_size=2, lora=dict(rank=16, alpha=32.0)),
    # For tests: seconds to compile and run.
    "tiny": dict(
        model=dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                   mlp_dim=64, dtype="float32", param_dtype="float32"),
        seq_len=32, batch_size=8, lora=dict(rank=4, alpha=8.0)),
}
LORA_TARGETS = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class CompileCounter:
  """Counts XLA backend compiles (jax.monitoring events) while active."""

  def __init__(self):
    self.count = 0
    self.seconds = 0.0
    self.active = False
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kw):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.count += 1
      self.seconds += duration

  def reset(self):
    self.count, self.seconds = 0, 0.0


_COUNTER = None


def compile_counter() -> CompileCounter:
  global _COUNTER
  if _COUNTER is None:
    _COUNTER = CompileCounter()
  return _COUNTER


def make_config(shape: str, steps: int = 100):
  """The run config of a named shape (AdamW on LoRA factors, fp32)."""
  from mmjax.config import schema
  s = SHAPES[shape]
  c = schema.base_config()
  c.model.update(s["model"])
  c.lora.update(targets=LORA_TARGETS, **s["lora"])
  c.trainable = ("lora/.*",)
  c.seq_len = s["seq_len"]
  c.batch_size = s["batch_size"]
  c.steps = steps
  c.optimizer.update(lr=1e-4, warmup_steps=0, schedule="constant")
  return c


def random_batches(n: int, batch: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
  """Unpacked rows of random non-pad tokens, every position in the loss."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(1, vocab, size=(batch, seq_len), dtype=np.int32)
    out.append(dict(
        tokens=tokens, targets=np.roll(tokens, -1, axis=1),
        loss_mask=np.ones((batch, seq_len), np.int32),
        segment_ids=np.ones((batch, seq_len), np.int32),
        positions=np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()))
  return out


def measure_matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """GFLOP/s of a jitted f32 n x n matmul on the default device (median of reps)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.float32)
  b = jax.random.normal(k2, (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  f(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 / statistics.median(times) / 1e9


def peak_memory() -> dict:
  """Peak memory so far: device stats where the backend has them, else host max RSS."""
  out = {"host_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    try:
      stats = dev.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2 ** 20
    except Exception:  # some backends have no memory stats
      pass
  return out


def time_calls(call, n_warmup: int, n_timed: int, block) -> dict:
  """Times `call(i)` (i = call index); the first call includes compilation."""
  counter = compile_counter()
  counter.reset()
  counter.active = True
  try:
    t0 = time.perf_counter()
    out = call(0)
    block(out)
    first = time.perf_counter() - t0
    first_compiles = counter.count
    first_compile_s = counter.seconds
    counter.reset()
    for i in range(1, n_warmup):
      block(call(i))
    times, cpu = [], []
    for i in range(max(n_warmup, 1), max(n_warmup, 1) + n_timed):
      t0, c0 = time.perf_counter(), time.process_time()
      out = call(i)
      block(out)
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    recompiles = counter.count
  finally:
    counter.active = False
  med = statistics.median(times)
  return dict(first_call_s=first, median_step_s=med, step_times_s=times, cpu_times_s=cpu,
              compile_s=max(first - med, 0.0), backend_compiles_first_call=first_compiles,
              backend_compile_s_first_call=first_compile_s, recompiles_after_first=recompiles,
              last_output=out)


def bench_train(config, steps: int = 10, warmup: int = 2, peak_gflops: float | None = None,
                devices=None) -> dict:
  """Times `run.train_step` of `mmjax.train.run.build(config, ...)` on random batches
  (on `devices`, default all)."""
  from mmjax import sharding
  from mmjax.train import run as run_lib

  mesh = sharding.make_mesh(config.mesh, devices)
  vocab = config.model.vocab_size
  t0 = time.perf_counter()
  run = run_lib.build(config, mesh, vocab)
  with jax.set_mesh(mesh):
    state = run.init_state(jax.random.key(config.seed))
    jax.block_until_ready(state)
    build_s = time.perf_counter() - t0
    n_calls = max(warmup, 1) + steps
    local = random_batches(n_calls, config.batch_size // jax.process_count(), config.seq_len, vocab)
    batches = [run.global_batch(b) for b in local]
    rng = jax.random.key(1)
    holder = {"state": state}
    losses = []

    def call(i):
      holder["state"], m = run.train_step(holder["state"], batches[i], rng)
      return m

    def block(m):
      jax.block_until_ready(m)
      losses.append(float(m["loss"]))

    t = time_calls(call, warmup, steps, block)
  tokens = config.batch_size * config.seq_len
  med = t["median_step_s"]
  tflops = run.flops_per_token * tokens / med / 1e12
  report = dict(
      mode="train", tokens_per_step=tokens, tokens_per_s=tokens / med, step_ms=1e3 * med,
      step_ms_all=[1e3 * x for x in t["step_times_s"]], step_ms_min=1e3 * min(t["step_times_s"]),
      cpu_s_per_step=statistics.median(t["cpu_times_s"]), first_call_s=t["first_call_s"],
      compile_s=t["compile_s"], backend_compile_s=t["backend_compile_s_first_call"],
      recompiles=t["recompiles_after_first"], build_and_init_s=build_s,
      flops_per_token=run.flops_per_token, tflops_per_s=tflops,
      loss_first=losses[0], loss_last=losses[-1],
      n_trainable=int(sum(x.size for x in jax.tree.leaves(holder["state"].trainable))),
      n_frozen=int(sum(x.size for x in jax.tree.leaves(holder["state"].frozen))))
  if peak_gflops:
    report["fraction_of_matmul_peak"] = tflops * 1e3 / peak_gflops
  return report


def _mode_train(config, args, peak):
  return bench_train(config, steps=args.steps, warmup=args.warmup, peak_gflops=peak, devices=args.devices)


def bench_sample(config, batch: int = 8, prompt_len: int = 64, new_tokens: int = 128, reps: int = 3,
                 devices=None) -> dict:
  """Times `mmjax.sample.generate` (KV cache, greedy) for `batch` prompts of `prompt_len`
  random tokens and `new_tokens` new tokens each, with the model's adapter applied."""
  from mmjax import sample, sharding
  from mmjax.train import run as run_lib

  mesh = sharding.make_mesh(config.mesh, devices)
  run = run_lib.build(config, mesh, config.model.vocab_size)
  with jax.set_mesh(mesh):
    variables = run.init_state(jax.random.key(config.seed)).variables
  prompts = np.random.default_rng(0).integers(1, config.model.vocab_size, (batch, prompt_len)).astype(np.int32)
  def call(i):
    return sample.generate(run.model, variables, prompts, max_new_tokens=new_tokens)

  t = time_calls(call, 1, reps, jax.block_until_ready)
  med = t["median_step_s"]
  return dict(mode="sample", batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
              new_tokens_per_s=batch * new_tokens / med, generate_s=med,
              generate_s_all=t["step_times_s"], first_call_s=t["first_call_s"], compile_s=t["compile_s"],
              recompiles=t["recompiles_after_first"])


def _mode_sample(config, args, peak):
  return bench_sample(config, reps=max(args.steps // 3, 2), devices=args.devices)


def _mode_dpo(config, args, peak):
  """DPO step time against an SFT step over the same tokens (see tools/bench_dpo.py)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import bench_dpo
  r = bench_dpo.bench(args.shape, args.steps, args.warmup)
  return dict(mode="dpo", **{k: v for k, v in r.items() if k != "shape"})


MODES = {"train": _mode_train, "sample": _mode_sample, "dpo": _mode_dpo}


def environment() -> dict:
  dev = jax.devices()[0]
  return dict(jax=jax.__version__, backend=dev.platform, device_kind=dev.device_kind,
              n_devices=jax.device_count(), cpu_count=os.cpu_count(), machine=platform.machine(),
              xla_flags=os.environ.get("XLA_FLAGS", ""),
              load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)


def run_bench(shape: str, mode: str = "train", steps: int = 10, warmup: int = 2, peak: bool = False,
              devices=None) -> dict:
  """The whole report of one benchmark (what the CLI prints)."""
  args = argparse.Namespace(steps=steps, warmup=warmup, devices=devices, shape=shape)
  peak_gflops = measure_matmul_peak() if peak else None
  config = make_config(shape, steps=warmup + steps + 1)
  report = dict(shape=shape, **MODES[mode](config, args, peak_gflops))
  if peak_gflops:
    report["matmul_peak_gflops"] = peak_gflops
  report.update(peak_memory())
  report["env"] = environment()
  return report


def format_report(r: dict) -> str:
  lines = [f"mmjax bench: shape={r['shape']} mode={r['mode']} on {r['env']['device_kind']} "
           f"({r['env']['backend']}, {r['env']['n_devices']} device(s))"]
  if r["mode"] == "dpo":
    lines.append(f"  SFT step          {r['sft_s'] * 1e3:.1f} ms")
    lines.append(f"  DPO adapter_base  {r['dpo_adapter_base_s'] * 1e3:.1f} ms ({r['ratio_adapter_base']:.2f}x SFT, "
                 "target <= 1.6x)")
    lines.append(f"  DPO precomputed   {r['dpo_precomputed_s'] * 1e3:.1f} ms ({r['ratio_precomputed']:.2f}x SFT, "
                 "target <= 1.1x)")
    return "\n".join(lines)
  if r["mode"] == "sample":
    lines.append(f"  new tokens/s      {r['new_tokens_per_s']:.1f} (batch {r['batch']}, prompt {r['prompt_len']}, "
                 f"+{r['new_tokens']} tokens, greedy, KV cache)")
    lines.append(f"  generate          {r['generate_s']:.3f} s (median; all: "
                 + ", ".join(f"{x:.3f}" for x in r["generate_s_all"]) + ")")
    lines.append(f"  compile           {r['compile_s']:.2f} s (first call {r['first_call_s']:.2f} s)")
    lines.append(f"  recompiles        {r['recompiles']}")
    lines.append(f"  peak memory       host RSS {r['host_peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
  lines.append(f"  tokens/s          {r['tokens_per_s']:.1f}")
  lines.append(f"  step              {r['step_ms']:.1f} ms (median; all: "
               + ", ".join(f"{x:.0f}" for x in r["step_ms_all"]) + ")")
  lines.append(f"  CPU time/step     {r['cpu_s_per_step']:.2f} s (all threads; wall min {r['step_ms_min']:.0f} ms)")
  lines.append(f"  TFLOP/s           {r['tflops_per_s']:.4f} ({r['flops_per_token'] / 1e6:.1f} MFLOP/token)")
  if "matmul_peak_gflops" in r:
    lines.append(f"  matmul peak       {r['matmul_peak_gflops']:.1f} GFLOP/s (f32 2048^2); "
                 f"fraction {r['fraction_of_matmul_peak']:.3f}")
  lines.append(f"  compile           {r['compile_s']:.2f} s (first call {r['first_call_s']:.2f} s)")
  lines.append(f"  recompiles        {r['recompiles']}")
  mem = f"  peak memory       host RSS {r['host_peak_rss_mb']:.0f} MB"
  if "device_peak_mb" in r:
    mem += f", device {r['device_peak_mb']:.0f} MB"
  lines.append(mem)
  lines.append(f"  loss              {r['loss_first']:.4f} -> {r['loss_last']:.4f}")
  if r["env"].get("load_average"):
    lines.append("  load average      " + " ".join(f"{x:.2f}" for x in r["env"]["load_average"])
                 + f" (1/5/15 min; other processes on {r['env']['cpu_count']} CPUs distort timings)")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="bench_small", choices=sorted(SHAPES))
  p.add_argument("--mode", default="train", choices=sorted(MODES))
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps, the first one compiles")
  p.add_argument("--peak", action="store_true", help="measure the f32 2048^2 matmul GFLOP/s")
  p.add_argument("--out", default=None, help="write the report as JSON here")
  args = p.parse_args(argv)
  r = run_bench(args.shape, args.mode, args.steps, args.warmup, args.peak)
  print(format_report(r), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(r, f, indent=1)
  return r


if __name__ == "__main__":
  main()
