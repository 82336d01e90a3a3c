"""Timed step annotations of real videos (YouCook2 style) as step-caption targets, and their
per-step timing metric.

A record {"video": path, "segments": [{"segment": [start_s, end_s], "sentence": str}, ...]}
(YouCook2 calls the list "annotations"; both are read) becomes a prompt/response record:
the prompt "describe the steps of the video." (or the record's own "prompt"), the response
one line per step in time order,

  frames 1-2: spread margarine on two slices of white bread
  frames 3-5: place a slice of cheese on the bread

where frames a-b are the 1-based sampled frames the step spans: the video's `n` frames
(`data.video_frames`) are spread uniformly over its duration D, frame k showing
[(k-1) D / n, k D / n), so a step [s, e] spans frames floor(s n / D) + 1 to ceil(e n / D).
The record keeps `steps` [(a, b, sentence)] for scoring.

`step_metrics(answer, steps)` parses the answer's lines and reports `step_tiou`: the mean over
true steps of the temporal IoU (in frames) with the answer's step of the same position
(0 for a missing one), and `step_count_error`: |answer steps - true steps| / true steps.
"""
from __future__ import annotations

import math
import re

STEP_PROMPT = "describe the steps of the video."
_LINE = re.compile(r"\s*frames\s+(\d+)\s*-\s*(\d+)\s*:\s*(.*?)\s*$")


def video_duration(path: str) -> float:
  """Seconds of a video file (PyAV container metadata)."""
  import av
  with av.open(path) as c:
    if c.duration:
      return c.duration / 1e6
    s = c.streams.video[0]
    if s.duration and s.time_base:
      return float(s.duration * s.time_base)
    return sum(1 for _ in c.decode(s)) / float(s.average_rate or 25)


def frame_span(start: float, end: float, duration: float, n: int) -> tuple[int, int]:
  """1-based sampled frames a..b a [start, end] second interval spans."""
  a = min(max(int(math.floor(start * n / duration)) + 1, 1), n)
  b = min(max(int(math.ceil(end * n / duration)), a), n)
  return a, b


def step_record(segments, duration: float, n: int, where: str = "record") -> tuple[str, list]:
  """(response text, steps [(a, b, sentence)]) of timed segments; one-line ValueError naming
  `where` for a malformed segment."""
  steps = []
  for i, seg in enumerate(segments):
    try:
      start, end = (float(x) for x in seg["segment"])
      sentence = str(seg["sentence"]).strip()
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{where}: segments[{i}] must be {{'segment': [start_s, end_s], 'sentence': str}}, "
                       f"got {seg!r:.80}") from None
    if not 0 <= start < end or not sentence:
      raise ValueError(f"{where}: segments[{i}] has segment [{start}, {end}] and sentence {sentence!r}; "
                       "expected 0 <= start < end and a sentence")
    steps.append((start, end, sentence))
  if not steps:
    raise ValueError(f"{where}: 'segments' is empty")
  steps.sort()
  spans = [(*frame_span(s, e, duration, n), text) for s, e, text in steps]
  return "\n".join(f"frames {a}-{b}: {text}" for a, b, text in spans), spans


def parse_steps(text: str) -> list[tuple[int, int, str]]:
  """The (a, b, sentence) lines of an answer; other lines are ignored."""
  out = []
  for line in text.splitlines():
    m = _LINE.fullmatch(line)
    if m:
      a, b = int(m.group(1)), int(m.group(2))
      out.append((min(a, b), max(a, b), m.group(3)))
  return out


def _tiou(x, y) -> float:
  inter = max(0, min(x[1], y[1]) - max(x[0], y[0]) + 1)
  union = max(x[1], y[1]) - min(x[0], y[0]) + 1
  return inter / union


def step_metrics(answer: str, steps) -> dict:
  """{'step_tiou', 'step_count_error'} of an answer against true steps (see the module doc)."""
  pred = parse_steps(answer)
  tiou = [(_tiou(pred[i][:2], t[:2]) if i < len(pred) else 0.0) for i, t in enumerate(steps)]
  return {"step_tiou": sum(tiou) / len(steps), "step_count_error": abs(len(pred) - len(steps)) / len(steps)}
