"""The GPU check: on one NVIDIA GPU, in under 8 minutes, runs the GPU tests and benchmarks a
Llama-3-8B-shaped LoRA train step and the sampler, then prints one table.

  .venv/bin/pip install -e '.[cuda12,test]' && .venv/bin/python tools/gpu_check.py [--out FILE]

1. `pytest -m gpu tests/test_gpu.py`: cuDNN flash attention against XLA attention in bf16
   (causal, padded and packed rows, values and gradients), the sampler's prefill on cuDNN,
   and a bf16-base LoRA train step (fp32 adapter and moments) against the XLA path.
2. `tools/bench.py`'s `llama3_8b` shape (Llama-3-8B's layers: d_model 4096, GQA 32/8, MLP
   14336, vocabulary 128256; bf16, remat, logits in 512-position chunks, LoRA r=16 on every
   projection; seq 4096, batch 2) with as many of its 32 layers as fit: tokens/s, step
   time, TFLOP/s and MFU against the device's bf16 peak (`mmjax.train.metrics.PEAK_TFLOPS`;
   the target on an H100-class GPU is MFU >= 45%).
3. Greedy sampling with a KV cache on the same model: new tokens/s.

It runs with the XLA GPU flags of `launch/xla_gpu_flags.sh` (what the SLURM script sets), so
a flag the installed XLA lacks fails here first. `--smoke` runs the whole script on the CPU
with a tiny shape (the GPU tests then run on jax.nn's XLA implementation): the CI check that
the script itself works.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_gpu_flags() -> str:
  """MMJAX_XLA_GPU_FLAGS of launch/xla_gpu_flags.sh, as one string."""
  text = open(os.path.join(ROOT, "launch", "xla_gpu_flags.sh")).read()
  m = re.search(r'MMJAX_XLA_GPU_FLAGS="([^"]*)"', text)
  if not m:
    raise SystemExit("launch/xla_gpu_flags.sh defines no MMJAX_XLA_GPU_FLAGS")
  return " ".join(m.group(1).split())


def run_gpu_tests(smoke: bool, timeout: int) -> dict:
  env = dict(os.environ)
  if smoke:
    env.update(MMJAX_GPU_TESTS_ON_CPU="1", JAX_PLATFORMS="cpu")
  else:
    env["JAX_PLATFORMS"] = "cuda"
  t0 = time.perf_counter()
  try:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                        "tests/test_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    out = r.stdout + r.stderr
  except subprocess.TimeoutExpired:
    return dict(passed=0, failed=0, skipped=0, seconds=timeout, ok=False, tail=f"timed out after {timeout} s")
  counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", out)}
  ok = r.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped", 0)
  return dict(passed=counts.get("passed", 0), failed=counts.get("failed", 0) + counts.get("error", 0),
              skipped=counts.get("skipped", 0), seconds=time.perf_counter() - t0, ok=ok,
              tail="\n".join(out.strip().splitlines()[-15:]))


def _out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def bench_train_fitting(bench, shape: str, layers: list[int], steps: int, warmup: int) -> dict:
  """The train benchmark with the first layer count of `layers` that fits in memory."""
  import jax
  for n in layers:
    config = bench.make_config(shape, steps=warmup + steps + 1)
    config.model.n_layers = n
    try:
      report = bench.bench_train(config, steps=steps, warmup=warmup, devices=jax.devices()[:1])
      report.update(n_layers=n, seq_len=config.seq_len, batch=config.batch_size, config=config)
      return report
    except Exception as e:  # noqa: BLE001 - XlaRuntimeError: try fewer layers
      if not _out_of_memory(e):
        raise
      print(f"  {n} layers do not fit ({str(e).splitlines()[0][:120]}); trying fewer", flush=True)
      jax.clear_caches()
  raise SystemExit(f"not even {layers[-1]} layers of {shape} fit on {jax.devices()[0].device_kind}")


def table(rows: list[tuple[str, str]]) -> str:
  w = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (checks the script)")
  p.add_argument("--layers", type=int, default=0, help="layers of the 8B shape (0 = as many of 32 as fit)")
  p.add_argument("--steps", type=int, default=5, help="timed train steps")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  args = p.parse_args(argv)

  os.environ["XLA_FLAGS"] = f"{xla_gpu_flags()} {os.environ.get('XLA_FLAGS', '')}".strip()
  if args.smoke:
    os.environ["JAX_PLATFORMS"] = "cpu"
  t_start = time.perf_counter()
  print("1/3 GPU tests (tests/test_gpu.py) ...", flush=True)
  tests = run_gpu_tests(args.smoke, timeout=300)
  if not tests["ok"]:
    print(tests["tail"], flush=True)

  sys.path.insert(0, ROOT)
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import jax
  import bench
  from mmjax.train import metrics
  dev = jax.devices()[0]
  if not args.smoke and dev.platform != "gpu":
    print(f"no GPU: JAX's backend is {dev.platform!r}. Install the CUDA build: pip install -e '.[cuda12,test]'",
          file=sys.stderr)
    return 2
  shape = "tiny" if args.smoke else "llama3_8b"
  layers = [args.layers] if args.layers else ([2] if args.smoke else [32, 24, 16, 8, 4])
  print(f"2/3 train step, shape {shape} ...", flush=True)
  train = bench_train_fitting(bench, shape, layers, args.steps, warmup=2)
  config = train.pop("config")
  peak = metrics.peak_tflops(dev.device_kind, config.model.dtype)
  mfu = train["tflops_per_s"] / peak if peak else None
  train.update(peak_tflops=peak, mfu=mfu, **bench.peak_memory())
  print("3/3 sampler ...", flush=True)
  sample = bench.bench_sample(config, batch=8, prompt_len=128, new_tokens=64, reps=2, devices=jax.devices()[:1])

  mem = train.get("device_peak_mb", train["host_peak_rss_mb"])
  rows = [
      ("device", f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}"),
      ("GPU tests", f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped "
                    f"({tests['seconds']:.0f} s)"),
      ("train shape", f"{shape}: {train['n_layers']} layers, seq {train['seq_len']}, batch {train['batch']}, "
                      f"{config.model.dtype}, LoRA r={config.lora.rank}"),
      ("train tokens/s", f"{train['tokens_per_s']:.0f} ({train['step_ms']:.0f} ms/step, median of {args.steps})"),
      ("train TFLOP/s", f"{train['tflops_per_s']:.1f}" + (f" of {peak:.0f} peak" if peak else "")),
      ("MFU", f"{100 * mfu:.1f}% (target >= 45% on H100-class)" if mfu is not None else "n/a (no peak for device)"),
      ("compile", f"{train['compile_s']:.0f} s, {train['recompiles']} recompiles"),
      ("peak memory", f"{mem:.0f} MB"),
      ("sampler", f"{sample['new_tokens_per_s']:.0f} new tokens/s (batch 8, prompt 128, +64, greedy)"),
      ("XLA flags", "launch/xla_gpu_flags.sh"),
      ("wall time", f"{time.perf_counter() - t_start:.0f} s"),
  ]
  print(table(rows), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(dict(tests={k: v for k, v in tests.items() if k != "tail"}, train=train, sample=sample,
                     xla_flags=shlex.split(os.environ["XLA_FLAGS"]), rows=rows), f, indent=1, default=str)
  return 0 if tests["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
