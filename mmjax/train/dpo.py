"""DPO objective, online pair generation and scorers.

Batch fields of one step (B pairs, T = seq_len; every row laid out like an SFT row, see
`mmjax.data.pipeline`; the chosen and rejected rows of a pair share the prompt):

  chosen_{tokens,targets,mask,segment_ids,positions}    int32 [B, T]
  rejected_{tokens,targets,mask,segment_ids,positions}  int32 [B, T]
  gt_{...}                         the ground-truth response (when dpo.gt_weight > 0)
  ref_chosen_logps, ref_rejected_logps  float32 [B, 1]  (when dpo.reference == 'precomputed')
  images [B, H, W, 3] / frames [B, F, H, W, 3]         (VLM)

One step runs chosen, rejected (and ground-truth) rows as ONE forward pass, concatenated
along the batch. The `adapter_base` reference is the same model applied to
`{'params': params}` — the policy with its adapter left out — under stop_gradient, so no
second copy of the base weights exists; a round boundary (merge the adapter, start a
fresh one: `mmjax.train.stages`) therefore makes the merged model the next reference.

Loss per step = sum over pairs of the DPO-family loss (`mmjax.losses.dpo_loss`), plus
`gt_weight * mean NLL per ground-truth token * pairs`, divided by the number of pairs.
The ground-truth term is TRL's `rpo_alpha` term (token-mean NLL over the batch's
responses, added to the mean pair loss); with gradient accumulation it becomes the
pair-weighted mean of the micro-batches' token means.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmjax import losses

ROW_FIELDS = ("tokens", "targets", "mask", "segment_ids", "positions")
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


def row_fields(prefix: str) -> tuple[str, ...]:
  return tuple(f"{prefix}_{f}" for f in ROW_FIELDS)


class AllTiesError(ValueError):
  """Every prompt of an online round gave candidates with equal scores: no pairs to train on."""


@dataclasses.dataclass(frozen=True)
class DPO:
  model: nn.Module
  media: tuple = ()  # pixel fields passed to a VLM: ('images',) or ('frames',)
  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  gt_weight: float = 0.0
  reference: str = "adapter_base"  # or 'precomputed' or 'copy'
  ref_update_every: int = 0  # 'copy': refresh the reference with the policy every K steps (0 = never)
  ref_ema: float = 0.0  # 'copy': or move it as ref <- ema * ref + (1 - ema) * policy each step

  @classmethod
  def from_config(cls, config, model, media=()):
    d = config.dpo
    return cls(model, tuple(media), beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
               gt_weight=d.gt_weight, reference=d.reference, ref_update_every=d.ref_update_every,
               ref_ema=d.ref_ema)

  @property
  def row_prefixes(self) -> tuple[str, ...]:
    return ("chosen", "rejected") + (("gt",) if self.gt_weight > 0 else ())

  @property
  def batch_fields(self):
    out = sum((row_fields(p) for p in self.row_prefixes), ())
    if self.reference == "precomputed":
      out += REF_FIELDS
    return out + tuple(self.media)

  @property
  def flops_factor(self) -> float:
    """Training FLOPs per pair relative to one SFT row (a reference forward ~ 1/3 of a step)."""
    return len(self.row_prefixes) + (2 / 3 if self.reference in ("adapter_base", "copy") else 0.0)

  # A separate reference copy (full-parameter training): `TrainState.aux['ref']`, a params
  # tree sharded like the params, starting equal to the stage's starting policy.
  def init_aux(self, variables):
    return {"ref": variables["params"]} if self.reference == "copy" else {}

  def aux_names(self, param_names):
    return {"ref": param_names} if self.reference == "copy" else {}

  def update_aux(self, aux, variables, step):
    """The reference after optimizer step `step` (1, 2, ...): an EMA of the policy, or the
    policy itself every `ref_update_every` steps, or unchanged."""
    if self.reference != "copy":
      return aux
    policy = variables["params"]
    if self.ref_ema > 0:
      e = self.ref_ema
      ref = jax.tree.map(lambda r, p: (e * r.astype(jnp.float32) + (1 - e) * p.astype(jnp.float32)).astype(r.dtype),
                         aux["ref"], policy)
    elif self.ref_update_every > 0:
      refresh = step % self.ref_update_every == 0
      ref = jax.tree.map(lambda r, p: jnp.where(refresh, p, r), aux["ref"], policy)
    else:
      return aux
    return {"ref": ref}

  def _forward(self, variables, batch, prefixes, rng, train):
    """Logits [len(prefixes) * B, T, V] of the rows of `prefixes`, one forward pass."""
    cat = lambda f: jnp.concatenate([batch[f"{p}_{f}"] for p in prefixes], axis=0)
    media = {k: jnp.concatenate([batch[k]] * len(prefixes), axis=0) for k in self.media}
    variables = {k: v for k, v in variables.items() if k != "aux"}
    return self.model.apply(variables, cat("tokens"), cat("positions"), cat("segment_ids"),
                            deterministic=not train, rngs={"dropout": rng} if train else {}, **media)

  def sequence_logps(self, variables, batch, rng=None, train=False):
    """Summed response log-probs of the chosen and rejected rows: ([B], [B])."""
    logits = self._forward(variables, batch, ("chosen", "rejected"), rng, train)
    return self._split_logps(logits, batch)

  @staticmethod
  def _split_logps(logits, batch):
    b = batch["chosen_tokens"].shape[0]
    targets = jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    logps = losses.sequence_log_probs(logits[:2 * b], targets, mask)
    return logps[:b], logps[b:]

  def reference_logps(self, variables, batch):
    if self.reference == "precomputed":
      return batch["ref_chosen_logps"][:, 0], batch["ref_rejected_logps"][:, 0]
    if self.reference == "copy":
      rc, rr = self.sequence_logps({"params": variables["aux"]["ref"]}, batch)
      return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)
    # The policy without its adapter: the same base weights, no copy.
    rc, rr = self.sequence_logps({"params": variables["params"]}, batch)
    return jax.lax.stop_gradient(rc), jax.lax.stop_gradient(rr)

  def loss(self, variables, batch, rng, train: bool):
    b = batch["chosen_tokens"].shape[0]
    logits = self._forward(variables, batch, self.row_prefixes, rng, train)
    pc, pr = self._split_logps(logits, batch)
    rc, rr = self.reference_logps(variables, batch)
    per_pair, cr, rj = losses.dpo_loss(
        pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
        chosen_lengths=batch["chosen_mask"].sum(-1), rejected_lengths=batch["rejected_mask"].sum(-1))
    n_pairs = jnp.float32(b)
    dpo_sum = jnp.sum(per_pair)
    sums = {"dpo_loss": dpo_sum}
    loss_sum = dpo_sum
    if self.gt_weight > 0:
      nll, count = losses.fused_cross_entropy(logits[2 * b:], batch["gt_targets"], batch["gt_mask"])
      gt_sum = nll / jnp.maximum(count, 1.0) * n_pairs  # token mean, weighted like the pair mean
      loss_sum = loss_sum + self.gt_weight * gt_sum
      sums["gt_nll"] = gt_sum
    pc, pr = jax.lax.stop_gradient(pc), jax.lax.stop_gradient(pr)
    sums.update(
        reward_accuracy=jnp.sum((cr > rj).astype(jnp.float32)),
        reward_margin=jnp.sum(cr - rj),
        chosen_reward=jnp.sum(cr),
        rejected_reward=jnp.sum(rj),
        kl=jnp.sum((pc - rc + pr - rr) / 2),  # policy minus reference log-prob, mean of both responses
    )
    return loss_sum, n_pairs, dict(loss=loss_sum, **sums)

  def tokens(self, batch):
    return sum((batch[f"{p}_segment_ids"] != 0).sum() for p in self.row_prefixes)


# ----------------------------------------------------------------------------- scorers


def shapes_caption_score(record: dict, answer: str) -> float:
  """missing + hallucination + repetition of a shapes caption against its atomic facts."""
  from mmjax.evals import captions
  kind = "video" if record.get("kind") == "video_caption" else "image"
  m = captions.caption_metrics(answer, record["facts"], kind)
  return float(m["missing"] + m["hallucination"] + m["repetition"])


def exact_match_score(record: dict, answer: str) -> float:
  """0 when the answer equals the reference response, else 1."""
  return float(answer.strip() != record["response"].strip())


def edit_distance_score(record: dict, answer: str) -> float:
  """Levenshtein distance between the answer and the reference response, in characters,
  divided by the reference length (for text tasks such as the generated ones)."""
  a, b = answer.strip(), record["response"].strip()
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1] / max(len(b), 1)


SCORERS = {  # name -> fn(record, answer) -> float, lower is better
    "shapes_caption": shapes_caption_score,
    "exact_match": exact_match_score,
    "edit_distance": edit_distance_score,
}


# ----------------------------------------------------------------------------- online pairs


def sample_answers(run, variables, records, tokenizer, *, max_new_tokens, batch, temperature=0.0, top_k=0,
                   rng=None) -> list[str]:
  """Answers (text up to eos) to each record's prompt: greedy, or sampled at `temperature`."""
  from mmjax.evals import generation
  return generation.generate_answers(run, variables, records, tokenizer, max_new_tokens=max_new_tokens,
                                     batch=batch, temperature=temperature, top_k=top_k, rng=rng)


def prompt_indices(n_source: int, n: int, seed: int, label: str) -> list[int]:
  """`n` distinct train indices, a function of the seed and the stage name (each round its own)."""
  rng = np.random.default_rng([int(seed) % 2**32, zlib.crc32(label.encode())])
  return sorted(int(i) for i in rng.choice(n_source, size=min(n, n_source), replace=False))


def online_pairs(config, run, variables, tokenizer, label: str) -> list[dict]:
  """Samples `dpo.num_candidates` answers per prompt from `variables`, scores them and keeps
  best (chosen) vs worst (rejected) per prompt, skipping ties (and empty answers). Raises
  AllTiesError when no prompt gives a pair."""
  from mmjax.data import sources
  d = config.dpo
  if d.scorer not in SCORERS:
    raise ValueError(f"config.dpo.scorer={d.scorer!r} is unknown; valid: {', '.join(SCORERS)}")
  score = SCORERS[d.scorer]
  source = sources.make_source(config.data, "train")
  idx = prompt_indices(len(source), d.num_prompts, config.seed, label)
  records = [source[i] for i in idx]
  rng = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(label.encode()))
  cands = [sample_answers(run, variables, records, tokenizer, max_new_tokens=d.max_new_tokens,
                          batch=config.eval_batch_size, temperature=d.temperature, top_k=d.top_k,
                          rng=jax.random.fold_in(rng, k)) for k in range(d.num_candidates)]
  pairs = []
  for j, (i, r) in enumerate(zip(idx, records)):
    answers = [c[j] for c in cands]
    scores = [score(r, a) for a in answers]
    ok = [k for k, a in enumerate(answers) if a.strip()]  # empty answers make no training row
    if len(ok) < 2:
      continue
    best = min(ok, key=lambda k: scores[k])
    worst = max(ok, key=lambda k: scores[k])
    if scores[best] == scores[worst] or answers[best] == answers[worst]:
      continue
    pairs.append({"id": f"{label}/{i}", "index": i, "prompt": r["prompt"], "chosen": answers[best],
                  "rejected": answers[worst], "ground_truth": r["response"],
                  "scores": {"chosen": scores[best], "rejected": scores[worst], "all": scores}})
  if not pairs:
    raise AllTiesError(
        f"stage {label!r}: all {len(records)} prompts gave {d.num_candidates} candidates with equal "
        f"{d.scorer} scores (or empty answers), so there are no pairs to train on; raise config.dpo.temperature, "
        f"config.dpo.num_candidates or config.dpo.num_prompts")
  return pairs


def precompute_reference(run, variables, pairs, tokenizer, batch: int) -> list[dict]:
  """`pairs` with `ref_chosen_logps` / `ref_rejected_logps` of `variables` (computed once)."""
  from mmjax.data import pairs as pairs_lib
  objective = dataclasses.replace(run.objective, gt_weight=0.0, reference="adapter_base")
  source = pairs_lib.PairsSource(pairs, media_source=pairs_lib.media_source(run.config))
  fn = jax.jit(lambda v, b: objective.sequence_logps(v, b))
  out = []
  for start in range(0, len(pairs), batch):
    rows = [source[i] for i in range(start, min(start + batch, len(pairs)))]
    rows += [rows[-1]] * (batch - len(rows))
    ex = [pairs_lib.tokenize_pair(r, tokenizer=tokenizer, seq_len=run.config.seq_len,
                                  visual_tokens=run.visual_tokens, image_size=run.config.data.image_size)
          for r in rows]
    b = {k: np.stack([e[k] for e in ex]) for k in ex[0] if not k.startswith("gt_")}
    rc, rr = jax.device_get(fn(variables, b))
    for j in range(min(batch, len(pairs) - start)):
      out.append(dict(pairs[start + j], ref_chosen_logps=float(rc[j]), ref_rejected_logps=float(rr[j])))
  return out


def stage_pairs(config, workdir: str, run, variables, tokenizer, label: str) -> str:
  """The pairs file this DPO stage trains on, written once (a resumed stage reuses it).

  Online: sampled from `variables` (the stage's starting policy) into WORKDIR/pairs.jsonl.
  Offline: `config.data.train_path`, copied with reference log-probs when the reference
  is 'precomputed' (unless every record already has them)."""
  from mmjax.data import pairs as pairs_lib
  path = os.path.join(workdir, "pairs.jsonl")
  if os.path.exists(path):
    return path
  d = config.dpo
  if d.online:
    pairs = online_pairs(config, run, variables, tokenizer, label)
  else:
    pairs = pairs_lib.read_pairs(config.data.train_path)
    if d.reference != "precomputed" or all(all(k in p for k in REF_FIELDS) for p in pairs):
      return config.data.train_path
  pairs_lib.check_pairs(pairs, tokenizer, config.seq_len, run.visual_tokens, where=path,
                        media=pairs_lib.media_source(config))
  if d.reference == "precomputed":
    pairs = precompute_reference(run, {"params": variables["params"]}, pairs, tokenizer, config.eval_batch_size)
  if jax.process_index() == 0:
    pairs_lib.write_pairs(path, pairs)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"pairs {path}")
  return path


def distill_records(config, run, params, tokenizer, workdir: str, label: str) -> str:
  """Rebirth data: greedy answers of `params` to `distill_examples` train prompts, written
  once to WORKDIR/distill.jsonl as {"index", "response"} (see data.responses_path)."""
  from mmjax.data import sources
  path = os.path.join(workdir, "distill.jsonl")
  if os.path.exists(path):
    return path
  source = sources.make_source(config.data, "train")
  idx = list(range(min(config.distill_examples, len(source))))
  records = [source[i] for i in idx]
  answers = sample_answers(run, {"params": params}, records, tokenizer,
                           max_new_tokens=config.sample_eval.max_new_tokens, batch=config.eval_batch_size)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      for i, a in zip(idx, answers):
        f.write(json.dumps({"index": i, "response": a}) + "\n")
    os.replace(tmp, path)
  return path
