"""Caption metrics over atomic facts, for the shapes grammar (`mmjax.data.shapes`).

  parse_caption(text, kind)             -> (facts, unparsed spans)
  caption_metrics(pred_text, true_facts, kind) -> dict of floats
  aggregate(list of metric dicts)       -> dict of floats

Parsing. Text is lower-cased, whitespace collapsed, and cut into spans at `.`, `,`, `;`,
`!`, `?` and newlines. Image spans must read "a SIZE COLOUR SHAPE at the POSITION" and give
("object", colour, shape, size, position). Video spans may start with "first", "then" or
"and then", may end in "at frame N", and must read "a COLOUR SHAPE appears at the POS",
"the COLOUR SHAPE moves to the POS" or "the COLOUR SHAPE disappears [from the POS]" and give ("event", step, verb,
colour, shape, position), steps numbered 1, 2, ... over the parsed events (position None
for a bare "disappears"). Any other span is returned, normalised, in `unparsed`.

Metrics of one caption (n_true = number of true facts):

  missing        true facts not matched / n_true
  hallucination  invented items / max(n_true, 1); an invented item is a parsed fact that
                 matches no true fact, or an unparseable span (each counts as one)
  error          missing + hallucination (the global error rate of video-SALMONN 2)
  repetition     repeated items / predicted items (0 when none); an item is repeated when an
                 earlier item of the caption is the same fact (videos: the same event,
                 step number ignored) or the same unparsed span. A repetition is counted
                 here only: it is neither invented nor matched.
  exact_match    1 when the parsed facts equal the truth as a multiset (videos: the same
                 events in the same order) and nothing was unparsed, else 0
  n_true, n_pred (facts + unparsed spans), n_missing, n_invented, n_repeated, n_unparsed
  err_colour, err_shape, err_size, err_position  counts of invented facts that equal a
                 missed true fact except in that one attribute (paired greedily, each true
                 fact once), e.g. "a large blue circle..." for a large red circle at the
                 same place is one missing + one invented + err_colour 1
  err_count      1 when the number of distinct predicted objects (videos: events) differs
                 from the truth, else 0
  err_temporal_order  videos: events stated but out of order (see below)
  timing         (videos, given the true frames) true events matched in order whose clause
                 states the true frame (" at frame N", N 1-based) / n_true: per-step timing

Videos are matched in order: the longest common subsequence of predicted and true events,
comparing (verb, colour, shape, position) and ignoring step numbers, is what is correct, so
leaving out one event costs one miss rather than shifting every later step. An event that
is stated but falls outside that subsequence (e.g. two events swapped) counts as one missing
true event and one invented event, and also as one err_temporal_order.
"""
from __future__ import annotations

import collections
import re

from mmjax.data import shapes

_COLOUR = "|".join(shapes.COLOURS)
_SHAPE = "|".join(shapes.SHAPES)
_SIZE = "|".join(shapes.SIZES)
_POS = "|".join(sorted(shapes.POSITIONS, key=len, reverse=True))  # "top left" before "top"
_OBJECT = re.compile(rf"an? ({_SIZE}) ({_COLOUR}) ({_SHAPE}) at the ({_POS})")
_APPEARS = re.compile(rf"an? ({_COLOUR}) ({_SHAPE}) appears at the ({_POS})")
_MOVES = re.compile(rf"the ({_COLOUR}) ({_SHAPE}) moves to the ({_POS})")
_DISAPPEARS = re.compile(rf"the ({_COLOUR}) ({_SHAPE}) disappears(?: from the ({_POS}))?")
_CONNECTOR = re.compile(r"^(?:first|and then|then)\s+")
_TIME = re.compile(r" at frame (\d+)$")
_SPLIT = re.compile(r"[.,;!?\n]")
KINDS = ("image", "video")
ATTRIBUTE_SKILLS = ("colour", "shape", "size", "position")
ERROR_SKILLS = ("colour", "shape", "size", "position", "count", "temporal_order")
_RATES = ("missing", "hallucination", "error", "repetition", "exact_match")
_COUNTS = ("n_true", "n_pred", "n_missing", "n_invented", "n_repeated", "n_unparsed")


def _spans(text: str) -> list[str]:
  text = " ".join(str(text).lower().split())
  return [s for s in (p.strip() for p in _SPLIT.split(text)) if s]


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f"caption kind {kind!r} is unknown; valid: {', '.join(KINDS)}")


def parse_caption(text: str, kind: str = "image") -> tuple[list[tuple], list[str]]:
  """(facts, unparsed spans) of a caption; facts in caption order (see module docstring)."""
  facts, unparsed, _ = _parse(text, kind)
  return facts, unparsed


def parse_times(text: str) -> list:
  """The stated frame of each parsed event of a video caption, 0-based (None where the
  clause states none): " at frame N" at the end of a clause is frame N - 1."""
  return _parse(text, "video")[2]


def _parse(text, kind):
  _check_kind(kind)
  facts, unparsed, times = [], [], []
  for span in _spans(text):
    if kind == "image":
      m = _OBJECT.fullmatch(span)
      if m:
        size, colour, shape, position = m.groups()
        facts.append(("object", colour, shape, size, position))
        continue
    else:
      body = _CONNECTOR.sub("", span)
      t = _TIME.search(body)
      if t:
        body = body[:t.start()]
      for verb, pattern in (("appears", _APPEARS), ("moves", _MOVES), ("disappears", _DISAPPEARS)):
        m = pattern.fullmatch(body)
        if m:
          colour, shape, position = m.groups()
          facts.append(("event", len(facts) + 1, verb, colour, shape, position))
          times.append(int(t.group(1)) - 1 if t else None)
          break
      if m:
        continue
    unparsed.append(span)
  return facts, unparsed, times


def _lcs_pairs(a: list, b: list) -> list[tuple[int, int]]:
  """Index pairs (i, j) of one longest common subsequence of a and b."""
  n, m = len(a), len(b)
  table = [[0] * (m + 1) for _ in range(n + 1)]
  for i in range(n - 1, -1, -1):
    for j in range(m - 1, -1, -1):
      table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
  pairs, i, j = [], 0, 0
  while i < n and j < m:
    if a[i] == b[j]:
      pairs.append((i, j))
      i, j = i + 1, j + 1
    elif table[i + 1][j] >= table[i][j + 1]:
      i += 1
    else:
      j += 1
  return pairs


def one_off(pred, true, fields) -> str | None:
  """The one field (name) in which pred and true differ, else None."""
  diff = [name for name, k in fields.items() if pred[k] != true[k]]
  same_rest = all(pred[k] == true[k] for k in range(len(true)) if k not in fields.values())
  return diff[0] if len(diff) == 1 and same_rest else None


def match_facts(pred_text: str, true_facts, kind: str = "image", true_times=None) -> dict:
  """How a caption's parsed facts meet the truth (what `caption_metrics` counts).

  Returns `facts` (parsed, in order), `firsts` (each fact once; a repeat is neither matched
  nor invented), `n_repeated` (repeated facts), `missed` (true items), `invented` (predicted
  items), `out_of_order` (videos: events stated but outside the in-order match; [] for
  images) and `unparsed` (spans, repeats included). Images compare object facts; videos
  compare (verb, colour, shape, position) keys, matched in order (longest common subsequence).
  """
  _check_kind(kind)
  facts, unparsed = parse_caption(pred_text, kind)
  true = [tuple(f) for f in true_facts]
  key = (lambda f: f) if kind == "image" else (lambda f: f[2:])  # events: drop "event", step
  seen, firsts, n_repeated = set(), [], 0
  for f in facts:
    if key(f) in seen:
      n_repeated += 1
    else:
      seen.add(key(f))
      firsts.append(f)
  out_of_order, n_timed = [], 0
  if kind == "image":
    left = collections.Counter(true)
    invented = []
    for f in firsts:
      if left[f] > 0:
        left[f] -= 1
      else:
        invented.append(f)
    missed = list(left.elements())
  else:
    true_keys = [key(f) for f in sorted(true, key=lambda f: f[1])]
    pairs = _lcs_pairs([key(f) for f in firsts], true_keys)
    used_p, used_t = {i for i, _ in pairs}, {j for _, j in pairs}
    if true_times is not None:  # events matched in order that also state the true frame
      stated = dict(zip((f[1] for f in facts), parse_times(pred_text)))  # step number -> frame
      order = [f[1] for f in sorted(true, key=lambda f: f[1])]
      when = dict(zip((f[1] for f in true), true_times))
      n_timed = sum(stated.get(firsts[i][1]) == when[order[j]] for i, j in pairs)
    invented = [key(f) for i, f in enumerate(firsts) if i not in used_p]
    missed = [k for j, k in enumerate(true_keys) if j not in used_t]
    for k in list(invented):  # stated, but out of order
      if k in missed:
        out_of_order.append(k)
        invented.remove(k)
        missed.remove(k)
  return dict(facts=facts, firsts=firsts, n_repeated=n_repeated, missed=missed, invented=invented,
              out_of_order=out_of_order, unparsed=unparsed, n_timed=n_timed)


def caption_metrics(pred_text: str, true_facts, kind: str = "image", true_times=None) -> dict:
  """Metrics of one predicted caption against its true facts (see module docstring); with
  `true_times` (videos: each true event's 0-based frame, in step order) also `timing`."""
  m = match_facts(pred_text, true_facts, kind, true_times)
  facts, firsts, unparsed, missed, invented = m["facts"], m["firsts"], m["unparsed"], m["missed"], m["invented"]
  true = [tuple(f) for f in true_facts]
  n_repeated = m["n_repeated"] + len(unparsed) - len(set(unparsed))
  unique_unparsed = len(set(unparsed))

  errors = dict.fromkeys(ERROR_SKILLS, 0)
  errors["temporal_order"] = len(m["out_of_order"])
  if kind == "image":
    fields = {"colour": 1, "shape": 2, "size": 3, "position": 4}
  else:
    fields = {"colour": 1, "shape": 2, "position": 3}  # over (verb, colour, shape, position)

  unpaired = list(missed)
  for p in invented:
    for t in unpaired:
      skill = one_off(p, t, fields)
      if skill:
        errors[skill] += 1
        unpaired.remove(t)
        break
  errors["count"] = int(len(firsts) != len(true))

  n_true, n_pred = len(true), len(facts) + len(unparsed)
  n_order = errors["temporal_order"]  # each is one missed and one invented event
  n_missing = len(missed) + n_order
  n_invented = len(invented) + n_order + unique_unparsed
  exact = not unparsed and (sorted(facts, key=repr) == sorted(true, key=repr))
  out = {
      "missing": n_missing / n_true if n_true else 0.0,
      "hallucination": n_invented / max(n_true, 1),
      "error": (n_missing / n_true if n_true else 0.0) + n_invented / max(n_true, 1),
      "repetition": n_repeated / n_pred if n_pred else 0.0,
      "exact_match": float(exact),
      "n_true": n_true, "n_pred": n_pred, "n_missing": n_missing, "n_invented": n_invented,
      "n_repeated": n_repeated, "n_unparsed": len(unparsed),
  }
  out.update({f"err_{k}": v for k, v in errors.items()})
  if true_times is not None and kind == "video":
    out["timing"] = m["n_timed"] / n_true if n_true else 0.0
  return out


def aggregate(metrics: list[dict]) -> dict:
  """Means over examples of the rates and counts, plus summed-over-examples rates:

    micro_missing / micro_hallucination   summed n_missing / n_invented over summed n_true
    micro_error                           their sum (the global error rate)
    err_SKILL_rate                        summed err_SKILL over summed n_true (err_count:
                                          over the number of examples)
    n_examples
  """
  n = len(metrics)
  if not n:
    return {"n_examples": 0}
  total = lambda k: sum(float(m.get(k, 0)) for m in metrics)
  out = {"n_examples": n}
  for k in _RATES + _COUNTS + tuple(f"err_{s}" for s in ERROR_SKILLS):
    out[k] = total(k) / n
  if all("timing" in m for m in metrics):
    out["timing"] = total("timing") / n
  n_true = max(total("n_true"), 1.0)
  out["micro_missing"] = total("n_missing") / n_true
  out["micro_hallucination"] = total("n_invented") / n_true
  out["micro_error"] = out["micro_missing"] + out["micro_hallucination"]
  for s in ERROR_SKILLS:
    out[f"err_{s}_rate"] = total(f"err_{s}") / (n if s == "count" else n_true)
  return out
