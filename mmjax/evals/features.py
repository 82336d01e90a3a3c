"""Frozen tower features: the mean of a model's vision-tower tokens per image (or per video,
over all its frames), for selection embeddings and out-of-domain probes. The model says
which tokens (`mean_features`: a VLM's projector inputs, a ViSFT model's patch tokens)."""
from __future__ import annotations

import jax
import numpy as np

from mmjax import sharding
from mmjax.data import pipeline


def _features_fn(run):
  if "tower_features" not in run.cache:
    fn = lambda variables, pixels: run.model.apply(variables, pixels, method="mean_features")
    run.cache["tower_features"] = jax.jit(sharding.in_context(fn, run.mesh, run.rules))
  return run.cache["tower_features"]


def tower_features(run, variables, pixels: np.ndarray, batch: int) -> np.ndarray:
  """float32 [N, D_vision] for pixels [N, H, W, C] or frames [N, T, H, W, C] (every process
  passes the same pixels), `batch` rows per call, the batch split over the run's devices."""
  fn = _features_fn(run)
  out = []
  for chunk, n_real in pipeline.fixed_chunks(np.asarray(pixels, np.float32), batch):
    x = sharding.from_full(chunk, run.mesh, run.rules)
    out.append(sharding.to_host(fn(variables, x))[:n_real])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
