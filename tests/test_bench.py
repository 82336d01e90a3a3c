"""tools/bench.py: the tiny shape through the real train step, and the report's fields."""
import json
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import bench  # noqa: E402


def test_tiny_train_bench_report(tmp_path):
  r = bench.run_bench("tiny", "train", steps=2, warmup=1, peak=False, devices=jax.devices()[:1])
  for key in ("tokens_per_s", "step_ms", "tflops_per_s", "flops_per_token", "compile_s", "recompiles",
              "host_peak_rss_mb", "first_call_s", "cpu_s_per_step", "loss_first", "loss_last"):
    assert key in r, key
  assert r["mode"] == "train" and r["shape"] == "tiny"
  assert r["tokens_per_step"] == bench.SHAPES["tiny"]["batch_size"] * bench.SHAPES["tiny"]["seq_len"]
  assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["flops_per_token"] > 0
  assert r["recompiles"] == 0
  assert r["n_trainable"] > 0 and r["n_frozen"] > r["n_trainable"]
  assert len(r["step_ms_all"]) == 2
  assert r["first_call_s"] >= r["step_ms"] / 1e3
  text = bench.format_report(r)
  assert "tokens/s" in text and "recompiles        0" in text
  json.dumps(r)  # the --out file


def test_cli_with_peak_writes_json(tmp_path, monkeypatch):
  """The CLI path (all devices: 8 fake CPUs in tests), with the peak measurement stubbed."""
  monkeypatch.setattr(bench, "measure_matmul_peak", lambda: 100.0)
  out = tmp_path / "r.json"
  r = bench.main(["--shape", "tiny", "--steps", "2", "--warmup", "1", "--peak", "--out", str(out)])
  assert r["matmul_peak_gflops"] == 100.0
  assert r["fraction_of_matmul_peak"] == pytest.approx(r["tflops_per_s"] * 1e3 / 100.0)
  assert json.load(open(out))["recompiles"] == 0


def test_measure_matmul_peak_small():
  assert bench.measure_matmul_peak(n=128, reps=2) > 0


def test_sample_mode_reports_tokens_per_second():
  r = bench.run_bench("tiny", mode="sample", steps=6, devices=jax.devices()[:1])
  assert r["mode"] == "sample" and r["new_tokens_per_s"] > 0 and r["recompiles"] == 0
  assert "new tokens/s" in bench.format_report(r)


def test_dpo_mode_reports_ratios():
  r = bench.run_bench("tiny", mode="dpo", steps=2, warmup=1, devices=jax.devices()[:1])
  assert r["mode"] == "dpo" and r["sft_s"] > 0
  assert r["ratio_adapter_base"] == r["dpo_adapter_base_s"] / r["sft_s"]
  assert "DPO precomputed" in bench.format_report(r)


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_in_smoke_mode(tmp_path):
  """tools/gpu_check.py --smoke: the GPU tests on jax.nn's XLA implementation, the train and
  sampler benchmarks on a tiny shape, one table, under the SLURM script's XLA flags."""
  import subprocess
  from helpers import ROOT, subprocess_env
  out = tmp_path / "gpu.json"
  r = subprocess.run([sys.executable, "tools/gpu_check.py", "--smoke", "--steps", "2", "--out", str(out)], cwd=ROOT,
                     env=subprocess_env(1), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
  for row in ("GPU tests", "train tokens/s", "MFU", "sampler"):
    assert row in r.stdout
  report = json.loads(out.read_text())
  assert report["tests"]["passed"] == 5 and report["tests"]["failed"] == 0
  assert report["train"]["tokens_per_s"] > 0 and report["train"]["recompiles"] == 0
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in report["xla_flags"]
