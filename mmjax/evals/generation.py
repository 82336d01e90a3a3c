"""Held-out evaluation by generation: greedy answers from the model, scored against the truth.

Every record scores `exact_match` (the decoded answer equals the reference response;
shapes questions of more than one kind also per kind, `gen_exact_<skill>`; shapes questions
answered in steps also by their final answer alone, `gen_answer_match` and `gen_answer_<skill>`;
questions among records of other tasks also alone, `qa_exact_match` with its standard error `qa_se`);
shapes caption records (with atomic `facts`) also score missing, hallucination, their sum
`error` (with its standard error over captions, `error_se`) and repetition rates through
`mmjax.evals.captions`, per caption and micro-averaged (`micro_*`); local video captions (of
a frame interval) score the same rates, with exact match, as `local_*`, global ones as
above. After a run's final evaluation, `answer_rows` are written to `WORKDIR/answers.jsonl`.
"""
from __future__ import annotations

import hashlib

import jax
import numpy as np

from mmjax import files, sample
from mmjax.config.core import ConfigError
from mmjax.data import catalog, media, pipeline, pixels, shapes, steps
from mmjax.evals import captions


def eval_records(data_cfg, n: int) -> list[dict]:
  """The first `n` records of the eval split (fewer if it is smaller)."""
  return catalog.records(data_cfg, "eval", n)


def content_key(record: dict) -> tuple:
  """What makes two records the same example: the question, the answer and the media bytes."""
  px = [np.asarray(record[k]).tobytes() for k in ("image", "frames") if k in record and not isinstance(record[k], str)]
  paths = [str(record[k]) for k in ("image", "frames") if isinstance(record.get(k), str)]
  return (pipeline.question(record), pipeline.reference(record), hashlib.sha1(b"".join(px)).hexdigest(), *paths)


def validation_room(config, n: int, what: str) -> str | None:
  """Why the eval split cannot hold the test records and, after them, `n` validation records
  (`what` names the asking key, e.g. 'select.val_examples'); None when it can. Opens nothing."""
  need = config.sample_eval.num_examples + n
  if config.data.num_eval_examples >= need:
    return None
  return (f"config.data.num_eval_examples={config.data.num_eval_examples} must hold the test records "
          f"(sample_eval.num_examples={config.sample_eval.num_examples}) and, after them, the "
          f"{what}={n} validation records: at least {need}")


def validation_records(config, n: int, what: str) -> list[dict]:
  """`n` held-out validation records: eval-split records after the test set (its first
  `sample_eval.num_examples`, which every stage is scored on), skipping any whose question,
  answer and media equal a test record's, so what reads them (a data selection, a stop rule:
  `what` names its config key) never sees the test."""
  n_test = config.sample_eval.num_examples
  test = {content_key(r) for r in eval_records(config.data, n_test)}
  rest = catalog.records(config.data, "eval", config.data.num_eval_examples)[n_test:]
  val = [r for r in rest if content_key(r) not in test][:n]
  if len(val) < n:
    raise ConfigError(f"{what}={n}: the eval split has only {len(val)} records after the "
                      f"{n_test} test records (config.sample_eval.num_examples) that differ from them; raise "
                      f"config.data.num_eval_examples to at least {n_test + n + max(n // 4, 8)}")
  return val


def _answer(tokenizer, ids) -> str:
  ids = list(np.asarray(ids))
  if tokenizer.eos_id in ids:
    ids = ids[: ids.index(tokenizer.eos_id)]
  return tokenizer.decode(ids)


def generate_answers(run, variables, records, tokenizer, *, max_new_tokens: int, batch: int,
                     temperature: float = 0.0, top_k: int = 0, rng=None) -> list[str]:
  """Answers (text up to eos) to each record's prompt, images/frames included: greedy, or
  sampled at `temperature` (chunk i draws with `rng` folded with i)."""
  out = []
  data = run.config.data
  px, fields = pixels.for_data(data), tuple(run.objective.media)
  for i, (chunk, n_real) in enumerate(pipeline.fixed_chunks(records, batch)):  # one compiled sampler
    prompts, rows = [], []
    for r in chunk:
      with pipeline.located(r):
        prompts.append(pipeline.prompt_ids(r, tokenizer, run.visual_tokens, run.config.seq_len))
        if fields:
          rows.append(media.media_arrays(r, px, fields, data.video_frames, data.video_fps))
    pixel_batch = {k: np.stack([r[k] for r in rows]) for k in fields}
    key = None if rng is None else jax.random.fold_in(rng, i)
    tokens, _ = sample.generate(run.model, variables, prompts, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, rng=key, stop_tokens=(tokenizer.eos_id,),
                                pad_id=tokenizer.pad_id, prompt_len=run.config.seq_len, **pixel_batch)
    out += [_answer(tokenizer, t) for t in np.asarray(tokens)[:n_real]]
  return out


def score(records, answers) -> dict:
  """exact_match over all records, plus aggregated caption metrics for caption records."""
  exact = [float(a.strip() == pipeline.reference(r).strip()) for r, a in zip(records, answers)]
  out = {"gen_exact_match": float(np.mean(exact)) if exact else 0.0}
  by_skill = {}  # shapes questions: exact match per question kind
  for r, e in zip(records, exact):
    if r.get("kind") in shapes.QA_TASKS and r.get("skills"):  # a question's first skill is the one it asks
      by_skill.setdefault(r["skills"][0], []).append(e)
  qa = [e for r, e in zip(records, exact) if r.get("kind") in shapes.QA_TASKS]
  if qa and len(qa) < len(records):  # questions among other tasks: their accuracy alone
    out["qa_exact_match"] = float(np.mean(qa))
    out["qa_se"] = float(np.std(qa, ddof=1) / np.sqrt(len(qa))) if len(qa) > 1 else 0.0
  if len(by_skill) > 1:
    out.update({f"gen_exact_{k}": float(np.mean(v)) for k, v in sorted(by_skill.items())})
  stepped = [(r, a) for r, a in zip(records, answers) if shapes.parse_reasoning(pipeline.reference(r))]
  if stepped:  # shapes questions answered in steps: the final answer alone, overall and per kind
    right = {}
    for r, a in stepped:
      right.setdefault(r["skills"][0], []).append(
          float(shapes.final_answer(a) == shapes.final_answer(pipeline.reference(r))))
    out["gen_answer_match"] = float(np.mean([x for v in right.values() for x in v]))
    if len(right) > 1:
      out.update({f"gen_answer_{k}": float(np.mean(v)) for k, v in sorted(right.items())})
  timed = [steps.step_metrics(a, r["steps"]) for r, a in zip(records, answers) if r.get("steps")]
  if timed:  # real videos with timed steps (YouCook2 style)
    out.update({k: float(np.mean([m[k] for m in timed])) for k in timed[0]})
  for prefix, kinds in (("", ("image_caption", "video_caption")), ("local_", ("video_local_caption",))):
    caps = [captions.caption_metrics(a, r["facts"], "video" if r["kind"] in shapes.VIDEO_TASKS else "image",
                                     r["times"] if r.get("timed") else None)
            for r, a in zip(records, answers) if r.get("kind") in kinds]
    if caps:  # local captions also report an exact match of their own
      out.update({prefix + k: v for k, v in caption_rates(caps, exact=bool(prefix)).items()})
  return out


def caption_rates(caps: list[dict], exact: bool = False) -> dict:
  """The table's caption rates of per-caption metrics (`captions.caption_metrics`), with
  `exact_match` when asked."""
  agg = captions.aggregate(caps)
  errors = np.array([m["error"] for m in caps])
  out = dict(missing=agg["missing"], hallucination=agg["hallucination"], error=agg["error"],
             error_se=float(errors.std(ddof=1) / np.sqrt(len(errors))) if len(errors) > 1 else 0.0,
             repetition=agg["repetition"], micro_missing=agg["micro_missing"],
             micro_hallucination=agg["micro_hallucination"], micro_error=agg["micro_error"])
  if "timing" in agg:
    out["timing"] = agg["timing"]
  if exact:
    out["exact_match"] = agg["exact_match"]
  return out


def answer_rows(records, answers) -> str:
  """JSON lines, one per scored record: its kind, prompt, reference and the model's answer
  (a stage's `answers.jsonl`)."""
  return files.jsonl({"kind": r.get("kind", ""), "prompt": pipeline.question(r), "truth": pipeline.reference(r),
                      "answer": a} for r, a in zip(records, answers))


def evaluate_generation(run, variables, tokenizer, records, *, max_new_tokens: int, batch: int):
  """(metrics, answers) for `records`."""
  answers = generate_answers(run, variables, records, tokenizer, max_new_tokens=max_new_tokens, batch=batch)
  return score(records, answers), answers
