"""Stage kinds of preference recipes: online DPO pairs and rebirth data.

`OnlinePairs` (a DPO stage with `dpo.online`, or with `dpo.reference='precomputed'`): at the
start of the stage (a DPO round), the stage's starting policy samples `dpo.num_candidates`
answers to `dpo.num_prompts` train prompts (of `config.data` with the `dpo.prompt_data`
overrides; a function of the seed and the stage name, so each round draws its own); a
scorer (`mmjax.evals.scorers`) ranks them, and best (chosen) vs worst (rejected) per prompt
become a pair with the record's ground truth when their scores differ by more than
`dpo.min_score_gap` (ties and empty answers skipped). With `dpo.pair_length='matched'` the
pair is instead the two candidates of similar length (word counts within
`dpo.length_tolerance` of the longer one's) whose scores differ most, so a pair cannot
teach the policy to say less (or more) rather than to say it right. With `dpo.rejected='greedy'`
the rejected answer is the policy's own greedy answer (its mode, what evaluation scores) and
the chosen one the best sampled candidate (of similar length with 'matched'), so each pair
pushes down what the policy would say rather than a rare sample; prompts whose greedy answer
is already as good as every candidate make no pair. With the 'precomputed' reference, each
pair also gets the reference log-probs of both responses: the starting policy's, its adapter
included (a stage that continues an earlier stage's adapter, `continue_adapter`, so has that
policy as its reference; a fresh adapter adds zero). The pairs go to STAGE_DIR/pairs.jsonl
once; the DPO objective trains on them.

`Rebirth` (a stage with `distill_from_stage`): the final params of that earlier stage answer
`distill_examples` train prompts (of `config.data` with the `distill_data` overrides)
greedily; with `distill_scorer`, only answers that scorer rates at most `distill_max_score`
are kept (filtered rebirth). They are written once to STAGE_DIR/distill.jsonl as
{"index", "response"} records; the stage trains on those records with these responses
(`data.responses_path`; with `distill_data`, as one group, so `config.data` stays the
evaluation data): SFT of its starting weights on a later model's own outputs.
"""
from __future__ import annotations

import dataclasses
import os
import time
import zlib

import jax
import ml_collections
import numpy as np

from mmjax.config.core import ConfigError, check_choice, derive
from mmjax.data import catalog, pipeline, pixels
from mmjax.data import pairs as pairs_lib
from mmjax.evals import generation, scorers
from mmjax.files import jsonl
from mmjax.objectives import dpo
from mmjax.recipes import kinds
from mmjax.train import groups as groups_lib


class AllTiesError(ValueError):
  """Every prompt of an online round gave candidates with equal scores: no pairs to train on."""


class EmptyDistillError(ValueError):
  """A filtered rebirth kept none of the answers: no rows to train on."""


def prompt_indices(n_source: int, n: int, seed: int, label: str) -> list[int]:
  """`n` distinct train indices, a function of the seed and the stage name (each round its own)."""
  rng = np.random.default_rng([int(seed) % 2**32, zlib.crc32(label.encode())])
  return sorted(int(i) for i in rng.choice(n_source, size=min(n, n_source), replace=False))


def online_pairs(config, run, variables, tokenizer, label: str) -> list[dict]:
  """Samples `dpo.num_candidates` answers per prompt from `variables`, scores them and keeps
  best (chosen) vs worst (rejected) per prompt (`choose_pair`; with `dpo.rejected='greedy'`,
  vs the greedy answer), skipping ties (and empty answers). Raises AllTiesError when no
  prompt gives a pair."""
  d = config.dpo
  score = scorers.SCORERS[d.scorer]
  source = pairs_lib.prompt_source(config)
  idx = prompt_indices(len(source), d.num_prompts, config.seed, label)
  records = [source[i] for i in idx]
  rng = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(label.encode()))
  cands = [generation.generate_answers(run, variables, records, tokenizer, max_new_tokens=d.max_new_tokens,
                                       batch=config.eval_batch_size, temperature=d.temperature, top_k=d.top_k,
                                       rng=jax.random.fold_in(rng, k)) for k in range(d.num_candidates)]
  greedy = d.rejected == "greedy"
  if greedy:  # the policy's mode, the last "candidate": the only one a pair may reject
    cands.append(generation.generate_answers(run, variables, records, tokenizer, max_new_tokens=d.max_new_tokens,
                                             batch=config.eval_batch_size))
  pairs = []
  for j, (i, r) in enumerate(zip(idx, records)):
    answers = [c[j] for c in cands]
    scores = [score(r, a) for a in answers]
    ok = [k for k, a in enumerate(answers) if a.strip()]  # empty answers make no training row
    found = choose_pair(answers, scores, ok, d, rejected=len(answers) - 1 if greedy else None)
    if found is None:
      continue
    best, worst = found
    pairs.append({"id": f"{label}/{i}", "index": i, **pairs_lib.prompt_of(r), "chosen": answers[best],
                  "rejected": answers[worst], "ground_truth": pipeline.reference(r),
                  "scores": {"chosen": scores[best], "rejected": scores[worst], "all": scores[:d.num_candidates],
                             **({"greedy": scores[-1]} if greedy else {})}})
  if not pairs:
    raise AllTiesError(
        f"stage {label!r}: all {len(records)} prompts gave {d.num_candidates} candidates with equal "
        f"{d.scorer} scores (within dpo.min_score_gap={d.min_score_gap}, or empty answers"
        + (f"; with dpo.pair_length='matched', or none of similar length within dpo.length_tolerance="
           f"{d.length_tolerance}" if d.pair_length == "matched" else "")
        + ("; with dpo.rejected='greedy', no greedy answer worse than a candidate" if greedy else "")
        + "), so there are no pairs to train on; raise config.dpo.temperature, config.dpo.num_candidates or "
        "config.dpo.num_prompts")
  return pairs


def words(text: str) -> int:
  return len(text.split())


def choose_pair(answers: list[str], scores: list[float], ok: list[int], d,
                rejected: int | None = None) -> tuple[int, int] | None:
  """(chosen, rejected) candidate indices of one prompt under `config.dpo` `d`, or None: best vs
  worst (`pair_length='any'`) or the widest gap of similar length ('matched') among the
  non-empty candidates `ok`, by more than `d.min_score_gap`; equal texts never pair. With
  `rejected`, only that candidate may be rejected (and never chosen)."""
  if rejected is not None and rejected not in ok:
    return None
  chosen = [k for k in ok if k != rejected]
  worse = ok if rejected is None else [rejected]
  if d.pair_length == "matched":
    return matched_pair(answers, scores, ok, d.length_tolerance, d.min_score_gap, chosen=chosen, rejected=worse)
  if not chosen:
    return None
  best = min(chosen, key=lambda k: scores[k])
  worst = max(worse, key=lambda k: scores[k])
  if scores[worst] - scores[best] <= d.min_score_gap or answers[best] == answers[worst]:  # ties never pair
    return None
  return best, worst


def matched_pair(answers: list[str], scores: list[float], ok: list[int], tolerance: float,
                 min_gap: float, chosen: list[int] | None = None,
                 rejected: list[int] | None = None) -> tuple[int, int] | None:
  """(chosen, rejected) candidate indices of similar length (word counts within `tolerance` of
  the longer one's) whose scores differ most, by more than `min_gap`; ties go to the lower
  chosen score, then the earlier candidates. The chosen one comes from `chosen` and the
  rejected one from `rejected` (both default to `ok`). None when no such pair exists."""
  found, key = None, None
  n = {k: words(answers[k]) for k in ok}
  for a in (ok if chosen is None else chosen):
    for b in (ok if rejected is None else rejected):
      gap = scores[b] - scores[a]
      if gap <= min_gap or answers[a] == answers[b] or abs(n[a] - n[b]) > tolerance * max(n[a], n[b]):
        continue
      k = (-gap, scores[a], a, b)
      if key is None or k < key:
        found, key = (a, b), k
  return found


def pair_summary(pairs: list[dict]) -> str:
  """'N pairs' with their mean chosen and rejected scores (online pairs)."""
  scored = [p["scores"] for p in pairs if isinstance(p.get("scores"), dict)]
  if not scored:
    return f"{len(pairs)} pairs"
  mean = lambda k: sum(s[k] for s in scored) / len(scored)
  length = lambda k: sum(words(p[k]) for p in pairs) / len(pairs)
  return (f"{len(pairs)} pairs (mean score chosen {mean('chosen'):.3f}, rejected {mean('rejected'):.3f}; "
          f"mean words chosen {length('chosen'):.1f}, rejected {length('rejected'):.1f})")


def precompute_reference(run, variables, pairs, tokenizer, batch: int) -> list[dict]:
  """`pairs` with `ref_chosen_logps` / `ref_rejected_logps` of `variables` (computed once)."""
  objective = dataclasses.replace(run.objective, gt_weight=0.0, reference="adapter_base")
  variables = {k: v for k, v in variables.items() if k in ("params", "lora")}
  # sequence_logps applies `variables` as given: with an adapter, the policy with it
  source = pairs_lib.PairsSource(pairs, media_source=pairs_lib.media_source(run.config))
  fn = jax.jit(lambda v, b: objective.sequence_logps(v, b))
  out = []
  for rows, n_real in pipeline.fixed_chunks([source[i] for i in range(len(pairs))], batch):
    d = run.config.data
    ex = [pairs_lib.tokenize_pair(r, tokenizer=tokenizer, seq_len=run.config.seq_len, visual_tokens=run.visual_tokens,
                                  image_size=pixels.for_data(d), media_fields=run.objective.media,
                                  n_frames=d.video_frames, fps=d.video_fps) for r in rows]
    b = {k: np.stack([e[k] for e in ex]) for k in ex[0] if not k.startswith("gt_")}
    rc, rr = jax.device_get(fn(variables, b))
    for j in range(n_real):
      out.append(dict(pairs[len(out)], ref_chosen_logps=float(rc[j]), ref_rejected_logps=float(rr[j])))
  return out


class OnlinePairs(kinds.StageKind):
  name = "pairs"
  file = "pairs.jsonl"

  def applies(self, config) -> bool:
    return config.objective == dpo.NAME and (config.dpo.online or config.dpo.reference == "precomputed")

  def produce(self, ctx) -> str:
    c, run = ctx.config, ctx.run
    t0 = time.perf_counter()
    variables = ctx.start_variables()
    if c.dpo.online:
      pairs = online_pairs(c, run, variables, ctx.tokenizer, ctx.name or "main")
    else:
      pairs = pairs_lib.read_pairs(c.data.train_path)
    pairs_lib.check_pairs(pairs, ctx.tokenizer, c.seq_len, run.visual_tokens, where=os.path.join(ctx.sdir, self.file),
                          media=pairs_lib.media_source(c))
    if c.dpo.reference == "precomputed" and not all(all(k in p for k in dpo.REF_FIELDS) for p in pairs):
      pairs = precompute_reference(run, variables, pairs, ctx.tokenizer, c.eval_batch_size)
    ctx.log(f"{pair_summary(pairs)} in {os.path.join(ctx.sdir, self.file)} ({time.perf_counter() - t0:.1f}s)")
    return jsonl(pairs)


def rebirth_config_dict() -> dict:
  return dict(
      distill_from_stage="",  # rebirth: SFT on this earlier stage's own greedy answers (generated once)
      distill_examples=256,  # train prompts answered for distill_from_stage
      distill_data=ml_collections.ConfigDict(),  # data overrides of those prompts' train set ({} = config.data)
      distill_scorer="",  # keep only answers this scorer (mmjax/evals/scorers.py) rates <= distill_max_score
      distill_max_score=0.0,  # with distill_scorer: 0 = perfect answers only
  )


def distill_data(config):
  """The rebirth prompts' train set: config.data with the `distill_data` overrides."""
  return catalog.overridden(config.data, config.distill_data, "distill_data")


class Rebirth(kinds.StageKind):
  name = "distill"
  file = "distill.jsonl"

  def applies(self, config) -> bool:
    return bool(config.distill_from_stage)

  def reads(self, config) -> set:
    return {config.distill_from_stage}

  def configure(self, config, path):
    if not config.distill_data:
      return derive(config, {"data.responses_path": path})
    return groups_lib.one_group(config, "distill", derive(distill_data(config), {"responses_path": path}))

  def produce(self, ctx) -> str:
    c = ctx.config
    source = catalog.make_source(distill_data(c), "train")
    idx = list(range(min(c.distill_examples, len(source))))
    records = [source[i] for i in idx]
    answers = generation.generate_answers(ctx.run, {"params": ctx.finals[c.distill_from_stage]}, records,
                                          ctx.tokenizer, max_new_tokens=c.sample_eval.max_new_tokens,
                                          batch=c.eval_batch_size)
    rows = [{"index": i, "response": a} for i, a in zip(idx, answers)]
    if c.distill_scorer:
      score = scorers.SCORERS[c.distill_scorer]
      rows = [row for row, r in zip(rows, records) if score(r, row["response"]) <= c.distill_max_score]
      ctx.log(f"{len(rows)} of {len(idx)} answers of {c.distill_from_stage!r} kept by {c.distill_scorer} "
              f"<= {c.distill_max_score}")
      if not rows:
        raise EmptyDistillError(
            f"stage {ctx.name!r}: no answer of {c.distill_from_stage!r} scores <= distill_max_score="
            f"{c.distill_max_score} by distill_scorer={c.distill_scorer!r}; raise config.distill_max_score, "
            f"config.distill_examples, or set distill_scorer=''")
    return jsonl(rows)


def config_dict() -> dict:
  return rebirth_config_dict()


def validate(config, env) -> None:
  if config.distill_from_stage and config.distill_from_stage not in env.earlier_stages:
    raise ConfigError(f"config.distill_from_stage={config.distill_from_stage!r} names no earlier stage; "
                      f"earlier stages: {', '.join(env.earlier_stages) or 'none'}")
  if config.distill_from_stage and not config.distill_examples > 0:
    raise ConfigError(f"config.distill_examples={config.distill_examples!r} must be > 0")
  if config.distill_scorer:
    check_choice("distill_scorer", config.distill_scorer, tuple(scorers.SCORERS))
  if config.distill_data:
    if config.groups:
      raise ConfigError("config.distill_data trains rebirth through its own group; leave config.groups empty")
    catalog.overridden(config.data, config.distill_data, "distill_data", env.files)


ONLINE_PAIRS = OnlinePairs()
REBIRTH = Rebirth()
