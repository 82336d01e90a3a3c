"""Run metrics: the per-device peak table for MFU, and writers for JSON lines, TensorBoard and the
terminal (analytic FLOPs are in `mmjax.train.flops`)."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from mmjax.files import atomic_write

# Dense peak TFLOP/s per device by (device kind substring, compute dtype). Sources: vendor
# data sheets (dense, no sparsity). fp32 on NVIDIA uses TF32 tensor cores only if enabled,
# so the fp32 entries are the plain FP32 peaks. CPUs are not listed: report TFLOP/s only,
# or pass config.peak_tflops_per_device (e.g. measured by tools/bench.py --peak).
PEAK_TFLOPS = {
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 67.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
    ("L4", "bfloat16"): 121.0, ("L4", "float32"): 30.3,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5", "bfloat16"): 459.0,
}


def peak_tflops(device_kind: str, dtype: str, override: float = 0.0) -> float | None:
  if override > 0:
    return override
  for (kind, dt), value in PEAK_TFLOPS.items():
    if kind.lower() in device_kind.lower() and dt == dtype:
      return value
  return None


class MetricsWriter:
  """Writes metrics on process 0: `metrics.jsonl`, TensorBoard events under `tb/`, and a
  progress line (a bar on a terminal, plain lines otherwise)."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.total = total_steps
    self.tty = sys.stdout.isatty()
    self.start = time.time()
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.jsonl = open(self.path, "a")
    self.written = set()  # (split, step) rows written by this writer
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))
    except ImportError:  # tensorboardX is an install requirement; keep running without it
      self.tb = None

  def resume(self, step: int) -> None:
    """Drops the rows a resumed run writes again: every row after `step` (the checkpoint it
    resumed from; 0 for a fresh start) and the eval at `step`. The file is rewritten atomically."""
    if not self.enabled:
      return
    self.jsonl.close()
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:  # a line a kill cut short
          continue
        if r.get("step", 0) < step or (r.get("step") == step and r.get("split") == "train" and step > 0):
          keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write(self.path, "".join(keep))
    self.jsonl = open(self.path, "a")

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled or (prefix, step) in self.written:  # e.g. a finished run's eval, re-run: once
      return
    self.written.add((prefix, step))
    row = {"step": step, "split": prefix, "time": round(time.time() - self.start, 3)}
    row.update({k: (float(v) if v is not None else None) for k, v in metrics.items()})
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in metrics.items():
        if v is not None and math.isfinite(float(v)):
          self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

  def progress(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    keys = ("loss", "accuracy", "grad_norm", "lr", "tokens_per_s", "tflops_per_s", "mfu")
    parts = [f"{k}={metrics[k]:.4g}" for k in keys if metrics.get(k) is not None]
    if self.tty:
      done = int(30 * step / max(self.total, 1))
      sys.stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{self.total} " + " ".join(parts) + "   ")
      sys.stdout.flush()
    else:
      print(f"step {step}/{self.total} " + " ".join(parts), flush=True)

  def line(self, text: str) -> None:
    if self.enabled:
      if self.tty:
        sys.stdout.write("\n")
      print(text, flush=True)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()
