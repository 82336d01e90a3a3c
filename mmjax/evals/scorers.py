"""Scorers of generated answers for online preference pairs: fn(record, answer) -> float,
lower is better (`config.dpo.scorer` names one)."""
from __future__ import annotations

from mmjax.data import pipeline, shapes
from mmjax.evals import captions


def shapes_caption_score(record: dict, answer: str) -> float:
  """missing + hallucination + repetition of a shapes caption against its atomic facts (a
  shapes question: 0 when the answer is right, else 1)."""
  return _caption_score(record, answer, missing_weight=1.0)


def shapes_caption_recall_score(record: dict, answer: str) -> float:
  """shapes_caption with missing events counted twice: 2 x missing + hallucination + repetition
  (prefers captions that leave out less, for rounds that learn to drop events)."""
  return _caption_score(record, answer, missing_weight=2.0)


def _caption_score(record: dict, answer: str, missing_weight: float) -> float:
  if record.get("kind") in shapes.QA_TASKS:
    return exact_match_score(record, answer)
  kind = "video" if record.get("kind") in shapes.VIDEO_TASKS else "image"
  m = captions.caption_metrics(answer, record["facts"], kind)
  return float(missing_weight * m["missing"] + m["hallucination"] + m["repetition"])


def exact_match_score(record: dict, answer: str) -> float:
  """0 when the answer equals the reference response, else 1."""
  return float(answer.strip() != pipeline.reference(record).strip())


def edit_distance_score(record: dict, answer: str) -> float:
  """Levenshtein distance between the answer and the reference response, in characters,
  divided by the reference length (for text tasks such as the generated ones)."""
  a, b = answer.strip(), pipeline.reference(record).strip()
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1] / max(len(b), 1)


SCORERS = {  # name -> fn(record, answer) -> float, lower is better
    "shapes_caption": shapes_caption_score,
    "shapes_caption_recall": shapes_caption_recall_score,
    "exact_match": exact_match_score,
    "edit_distance": edit_distance_score,
}
