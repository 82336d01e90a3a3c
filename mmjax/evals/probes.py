"""Out-of-domain probes on frozen features: closed-form ridge models, pure numpy.

A probe asks what a frozen backbone's features already encode, without training the
backbone: fit a linear map on train features, score it on held-out features.

  ridge_fit(x [N, D], y [N, K], l2) -> (w [D, K], b [K])       min |x w + b - y|^2 + l2 |w|^2
  classification_probe(...)  -> accuracy of argmax(x w + b) against integer labels
  retrieval_probe(...)       -> image-to-text recall@k: a ridge map from image features to
                                bag-of-words caption vectors ranks every held-out caption

Features are standardised with the train set's mean and std first, so `l2` means the same
for any backbone width or scale.
"""
from __future__ import annotations

import re

import numpy as np


def _standardise(train: np.ndarray, test: np.ndarray):
  mu = train.mean(0, keepdims=True)
  sd = train.std(0, keepdims=True) + 1e-6
  return (train - mu) / sd, (test - mu) / sd


def ridge_fit(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, np.ndarray]:
  """Ridge regression with an unpenalised bias: (w [D, K], b [K]). Solved in float64 in the
  smaller of the primal (D x D) and dual (N x N) forms."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if y.ndim == 1:
    y = y[:, None]
  if x.ndim != 2 or y.shape[0] != x.shape[0]:
    raise ValueError(f"ridge_fit: x {x.shape} and y {y.shape} need the same number of rows")
  xm, ym = x.mean(0), y.mean(0)
  xc, yc = x - xm, y - ym
  n, d = xc.shape
  if d <= n:
    w = np.linalg.solve(xc.T @ xc + l2 * np.eye(d), xc.T @ yc)
  else:
    w = xc.T @ np.linalg.solve(xc @ xc.T + l2 * np.eye(n), yc)
  return w, ym - xm @ w


def classification_probe(train_x, train_labels, test_x, test_labels, num_classes: int, l2: float = 1e-2) -> float:
  """Accuracy of a ridge classifier (one-hot targets) fitted on train, scored on test."""
  train_labels = np.asarray(train_labels, np.int64)
  test_labels = np.asarray(test_labels, np.int64)
  if train_labels.min() < 0 or max(train_labels.max(), test_labels.max()) >= num_classes:
    raise ValueError(f"classification_probe: labels must lie in [0, {num_classes})")
  xtr, xte = _standardise(np.asarray(train_x, np.float64), np.asarray(test_x, np.float64))
  w, b = ridge_fit(xtr, np.eye(num_classes)[train_labels], l2)
  return float(np.mean(np.argmax(xte @ w + b, axis=1) == test_labels))


def words(text: str) -> list[str]:
  return re.findall(r"[a-z0-9]+", text.lower())


def bag_of_words(texts, vocab: dict) -> np.ndarray:
  """[N, V] word counts over `vocab` (word -> column); unknown words are dropped."""
  out = np.zeros((len(texts), len(vocab)), np.float64)
  for i, t in enumerate(texts):
    for w in words(t):
      j = vocab.get(w)
      if j is not None:
        out[i, j] += 1.0
  return out


def _unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def recall_at_k(scores: np.ndarray, correct: np.ndarray, ks=(1, 5)) -> dict:
  """scores [Q, C] (higher is better); correct [Q, C] bool (which candidates count as a hit
  for each query). recall@k = fraction of queries with a hit among their top k."""
  order = np.argsort(-scores, axis=1, kind="stable")
  hits = np.take_along_axis(np.asarray(correct, bool), order, axis=1)
  return {f"r{k}": float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def retrieval_probe(train_x, train_texts, test_x, test_texts, l2: float = 1e-2, ks=(1, 5)) -> dict:
  """Image-to-text retrieval through a ridge map from image features to (unit) bag-of-words
  caption vectors. Every test image ranks all test captions by cosine similarity with its
  predicted vector; a caption with the same text as the image's own counts as a hit (shapes
  captions repeat across images). Returns {'r1': ..., 'r5': ...}."""
  vocab = {w: i for i, w in enumerate(sorted({w for t in train_texts for w in words(t)}))}
  if not vocab:
    raise ValueError("retrieval_probe: the train captions have no words")
  xtr, xte = _standardise(np.asarray(train_x, np.float64), np.asarray(test_x, np.float64))
  w, b = ridge_fit(xtr, _unit(bag_of_words(train_texts, vocab)), l2)
  pred = _unit(xte @ w + b)
  cand = _unit(bag_of_words(test_texts, vocab))
  texts = np.asarray([" ".join(words(t)) for t in test_texts])
  return recall_at_k(pred @ cand.T, texts[:, None] == texts[None, :], ks)
