"""DPO objective: the DPO-family losses on preference pairs, with a reference model.

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
fresh one: `mmjax.recipes.stages`) therefore makes the merged model the next reference.

Pairs come from a JSONL file (`mmjax.data.pairs`): the stage's prepared file (online pairs
sampled from the stage's starting policy, or offline pairs with precomputed reference
log-probs; `mmjax.recipes.pairs`), else `data.train_path`.

Loss per step = sum over pairs of the DPO-family loss (`mmjax.losses.dpo_loss`), plus
`gt_weight * mean NLL per ground-truth token * pairs`, divided by the number of pairs.
The ground-truth term is an SFT (token-mean NLL) term on each pair's ground-truth response,
added to the mean pair loss, as video-SALMONN 2 stabilises its DPO rounds; it has the form of
TRL's `rpo_alpha` term, which TRL applies to the chosen response instead. With gradient
accumulation it becomes the pair-weighted mean of the micro-batches' token means.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from mmjax import losses
from mmjax.config.core import ConfigError, check_choice
from mmjax.data import catalog, pairs as pairs_lib
from mmjax.evals import scorers
from mmjax.objectives import base

NAME = "dpo"
FAMILIES = ("llama", "vlm")
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "bco_pair", "apo_zero")
REFERENCES = ("adapter_base", "precomputed", "copy")
PAIR_LENGTHS = ("any", "matched")  # online pair choice: best vs worst, or the widest gap of similar length
PAIR_REJECTED = ("worst", "greedy")  # online: the rejected answer is the worst candidate, or the greedy answer
ROW_FIELDS = ("tokens", "targets", "mask", "segment_ids", "positions")
REF_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


def row_fields(prefix: str) -> tuple[str, ...]:
  return tuple(f"{prefix}_{f}" for f in ROW_FIELDS)


def config_dict() -> dict:
  """`config.dpo`: the DPO objective and where its pairs come from."""
  return {"dpo": ml_collections.ConfigDict(dict(
      beta=0.1,  # KL strength; rewards are beta * (policy - reference) log-prob
      loss_type="sigmoid",  # sigmoid | hinge | ipo | robust | bco_pair | apo_zero
      label_smoothing=0.0,  # sigmoid / robust; robust needs [0, 0.5)
      gt_weight=0.0,  # weight of an SFT (NLL) term on each pair's ground-truth response (video-SALMONN 2)
      reference="adapter_base",  # 'adapter_base' (the policy without its adapter), 'precomputed' (log-probs
      #                            stored with the pairs) or 'copy' (full-parameter training: a separate copy)
      ref_update_every=0,  # 'copy': refresh the copy with the policy every K steps; 0 = keep the stage's start
      ref_ema=0.0,  # 'copy': instead move it each step as ref <- ref_ema * ref + (1 - ref_ema) * policy; 0 = off
      online=False,  # sample pairs from the stage's starting policy (else data.train_path holds pairs)
      num_prompts=64,  # online: train prompts sampled per round
      num_candidates=4,  # online: candidates sampled per prompt
      temperature=1.0,  # online: sampling temperature
      top_k=0,  # online: 0 = no top-k filter
      max_new_tokens=64,  # online: candidate length limit
      scorer="shapes_caption",  # online: how candidates are scored (lower is better); see mmjax/evals/scorers.py
      min_score_gap=0.0,  # online: a pair needs worst - best score > this (0 = any difference; ties never pair)
      pair_length="any",  # online: 'any' (best vs worst) or 'matched' (the widest-gap pair of similar length)
      length_tolerance=0.1,  # online, 'matched': word counts within this fraction of the longer one's
      rejected="worst",  # online: 'worst' (a sampled candidate) or 'greedy' (the policy's greedy answer, paired
      #                    with the best sampled candidate when that one scores better)
      prompt_data=ml_collections.ConfigDict(),  # online: data overrides of the prompts' train set (e.g. captions
      #                                           only, while config.data, the evaluation data, also asks questions)
  ))}


def validate(config, env) -> None:
  """DPO keys of a run config; raises `ConfigError` (one line) naming the key and the value."""
  d = config.dpo
  check_choice("dpo.loss_type", d.loss_type, LOSS_TYPES)
  check_choice("dpo.reference", d.reference, REFERENCES)
  if not d.beta > 0:
    raise ConfigError(f"config.dpo.beta={d.beta!r} must be > 0")
  if not 0.0 <= d.label_smoothing < 0.5:
    raise ConfigError(f"config.dpo.label_smoothing={d.label_smoothing!r} must be in [0, 0.5)")
  if d.gt_weight < 0:
    raise ConfigError(f"config.dpo.gt_weight={d.gt_weight!r} must be >= 0")
  if d.reference == "adapter_base" and not config.lora.targets:
    raise ConfigError("config.dpo.reference='adapter_base' needs an adapter (config.lora.targets is empty); "
                      "use reference='copy' or 'precomputed' for full-parameter training")
  if d.reference == "copy" and config.lora.targets:
    raise ConfigError(f"config.dpo.reference='copy' keeps a second copy of the weights for full-parameter "
                      f"training, but config.lora.targets={config.lora.targets!r} adds an adapter; use "
                      "reference='adapter_base' with LoRA, or set lora.targets=''")
  if not 0.0 <= d.ref_ema < 1.0:
    raise ConfigError(f"config.dpo.ref_ema={d.ref_ema!r} must be in [0, 1)")
  if d.ref_update_every < 0:
    raise ConfigError(f"config.dpo.ref_update_every={d.ref_update_every!r} must be >= 0")
  if d.ref_ema > 0 and d.ref_update_every > 0:
    raise ConfigError(f"config.dpo.ref_ema={d.ref_ema!r} and config.dpo.ref_update_every={d.ref_update_every!r} "
                      "both move the reference; set one of them to 0")
  if d.reference != "copy" and (d.ref_ema > 0 or d.ref_update_every > 0):
    raise ConfigError(f"config.dpo.ref_ema / ref_update_every move a reference copy, but config.dpo.reference="
                      f"{d.reference!r}; use reference='copy'")
  if d.online:
    for key in ("num_prompts", "num_candidates", "max_new_tokens"):
      if not d[key] > 0:
        raise ConfigError(f"config.dpo.{key}={d[key]!r} must be > 0")
    if d.num_candidates < 2:
      raise ConfigError(f"config.dpo.num_candidates={d.num_candidates!r} must be >= 2 to form pairs")
    if not d.temperature > 0:
      raise ConfigError(f"config.dpo.temperature={d.temperature!r} must be > 0 to sample distinct candidates")
    check_choice("dpo.scorer", d.scorer, tuple(scorers.SCORERS))
    if not d.min_score_gap >= 0:
      raise ConfigError(f"config.dpo.min_score_gap={d.min_score_gap!r} must be >= 0")
    check_choice("dpo.pair_length", d.pair_length, PAIR_LENGTHS)
    check_choice("dpo.rejected", d.rejected, PAIR_REJECTED)
    if not 0 <= d.length_tolerance < 1:
      raise ConfigError(f"config.dpo.length_tolerance={d.length_tolerance!r} must be in [0, 1): the largest "
                        "difference of a pair's word counts, as a fraction of the longer one's")
    catalog.overridden(config.data, d.prompt_data, "dpo.prompt_data", env.files)
  elif config.data.source != "jsonl":
    raise ConfigError(f"config.objective='dpo' with config.dpo.online=False reads pairs from JSONL; "
                      f"config.data.source={config.data.source!r} must be 'jsonl'")


@dataclasses.dataclass(frozen=True)
class DPO(base.Objective):
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
    return self.decoder_outputs(_model_variables(variables), cat("tokens"), cat("positions"), cat("segment_ids"),
                                rng, train, media)

  def sequence_logps(self, variables, batch, rng=None, train=False):
    """Summed response log-probs of the chosen and rejected rows: ([B], [B])."""
    out = self._forward(variables, batch, ("chosen", "rejected"), rng, train)
    return self._split_logps(variables, out, batch)

  def _split_logps(self, variables, out, batch):
    b = batch["chosen_tokens"].shape[0]
    targets = jnp.concatenate([batch["chosen_targets"], batch["rejected_targets"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    logps = self.sequence_log_probs(_model_variables(variables), out[:2 * b], targets, mask)
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
    out = self._forward(variables, batch, self.row_prefixes, rng, train)
    pc, pr = self._split_logps(variables, out, batch)
    rc, rr = self.reference_logps(variables, batch)
    per_pair, cr, rj = losses.dpo_loss(
        pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
        chosen_lengths=batch["chosen_mask"].sum(-1), rejected_lengths=batch["rejected_mask"].sum(-1))
    n_pairs = jnp.float32(b)
    dpo_sum = jnp.sum(per_pair)
    sums = {"dpo_loss": dpo_sum}
    loss_sum = dpo_sum
    if self.gt_weight > 0:
      nll, count, _ = self.cross_entropy_and_accuracy(_model_variables(variables), out[2 * b:], batch["gt_targets"],
                                                      batch["gt_mask"])
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

  def train_iterator(self, ctx, data_cfg):
    """Pairs from the file the stage prepared (online pairs, or offline pairs with reference
    log-probs: `mmjax.recipes.pairs`), else from `data.train_path`."""
    c = ctx.config
    path = ctx.prepared.get("pairs") or c.data.train_path
    return pairs_lib.make_train_iterator(path, c, tokenizer=ctx.tokenizer, visual_tokens=ctx.visual_tokens,
                                         process_index=ctx.process_index, process_count=ctx.process_count,
                                         gt=self.gt_weight > 0, need_ref=self.reference == "precomputed",
                                         media_fields=self.media)

  def eval_batches(self, ctx):
    return []  # DPO stages are scored by generation (`sample_eval`)


OBJECTIVE = DPO


def _model_variables(variables: dict) -> dict:
  """The model's collections of the variables a loss sees (without the objective's `aux`)."""
  return {k: v for k, v in variables.items() if k != "aux"}
