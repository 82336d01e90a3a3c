"""Shared test helpers: a tiny run config with odd dims and synthetic batches."""
import os
import re
import subprocess
import sys

import numpy as np

from mmjax.config import core, schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  c = schema.base_config()
  c.model.update(vocab_size=67, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=6, mlp_dim=30)
  c.lora.update(rank=4, alpha=8.0, targets=r".*(q_proj|v_proj|down_proj)")
  c.data.update(source="generated", task="reverse", tokenizer="builtin")
  c.seq_len = 16
  c.batch_size = 8
  c.steps = 4
  c.eval_every = 0
  c.eval_batch_size = 8
  c.log_every = 1
  c.checkpoint_every = 2
  c.optimizer.update(lr=1e-2, warmup_steps=1)
  return apply_overrides(c, overrides)


def apply_overrides(c, overrides: dict):
  """A copy of a config with dotted keys set ({'lora.rank': 8})."""
  return core.derive(c, overrides)


def synthetic_batches(n, batch, seq_len, vocab, seed=0):
  """Random token batches with two packed segments per row and padding at the end."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    tokens = rng.integers(1, vocab, size=(batch, seq_len)).astype(np.int32)
    seg = np.zeros((batch, seq_len), np.int32)
    pos = np.zeros((batch, seq_len), np.int32)
    for r in range(batch):
      cut = rng.integers(2, seq_len - 3)
      end = rng.integers(cut + 1, seq_len + 1)
      seg[r, :cut], seg[r, cut:end] = 1, 2
      pos[r, :cut], pos[r, cut:end] = np.arange(cut), np.arange(end - cut)
    targets = np.roll(tokens, -1, axis=1)
    mask = (seg != 0).astype(np.int32) * rng.integers(0, 2, size=(batch, seq_len)).astype(np.int32)
    out.append(dict(tokens=tokens, targets=targets, loss_mask=mask, segment_ids=seg, positions=pos))
  return out


def subprocess_env(devices=1, **extra) -> dict:
  """The environment of an `mmjax.main` process a test starts: the suite's XLA flags (see
  conftest.py) with `devices` fake CPU devices."""
  e = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", e.get("XLA_FLAGS", ""))
  e["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  e["JAX_PLATFORMS"] = "cpu"
  e.update(extra)
  return e


def run_main(args, env=None, timeout=600, devices=1):
  e = subprocess_env(devices, **(env or {}))
  return subprocess.run([sys.executable, "-m", "mmjax.main", *args], cwd=ROOT, env=e, capture_output=True,
                        text=True, timeout=timeout)
