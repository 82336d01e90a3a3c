"""The objective interface: every hook an objective may provide, with its default.

An objective module exports `NAME`, `FAMILIES` (the model families it trains), `config_dict()`
(its config section, possibly empty), `validate(config, env)` (its checks, run when
`config.objective` selects it) and `OBJECTIVE`, an `Objective` subclass.
`mmjax.objectives.registry` maps names to modules. The loop and the step call only the
hooks below, so an objective never needs an edit outside its own module.

Shapes: a batch is a dict of arrays with a leading batch axis B (the rows of one step, or of
one micro-batch under gradient accumulation); `loss` returns sums over those rows plus the
normaliser they are divided by, so accumulated micro-batches weigh by their normaliser.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from mmjax import losses
from mmjax.data import pipeline


@dataclasses.dataclass(frozen=True)
class DataContext:
  """What building a stage's data needs: the stage's run config, tokenizer, the model's
  visual placeholder counts, this process's place, and the data files the stage prepared
  before training (`mmjax.recipes.kinds`: name -> path)."""
  config: Any
  tokenizer: Any
  visual_tokens: dict | None = None
  process_index: int = 0
  process_count: int = 1
  prepared: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Base objective. Subclasses set `batch_fields` and `loss`; every other hook has a default."""
  model: nn.Module
  media: tuple = ()  # pixel fields passed to the model: ('images',) or ('frames',) for a VLM

  @classmethod
  def from_config(cls, config, model: nn.Module, media=()) -> "Objective":
    """The objective of a run config (override to read the objective's own config section)."""
    return cls(model, tuple(media))

  # -- the step ------------------------------------------------------------------------------
  @property
  def batch_fields(self) -> tuple[str, ...]:
    """The batch fields `loss` reads (the loop places exactly these on the devices)."""
    raise NotImplementedError

  def loss(self, variables: dict, batch: dict, rng, train: bool):
    """(loss sum, normaliser, {metric: sum}) over the batch's rows; the step divides the
    loss and metric sums by the normaliser summed over the whole accumulated batch."""
    raise NotImplementedError

  # -- decoder outputs for token losses (SFT, DPO) --------------------------------------------
  @property
  def logits_chunk(self) -> int:
    """The decoder's `logits_chunk` (0 when the model has none)."""
    cfg = getattr(self.model, "cfg", None)
    return int(getattr(getattr(cfg, "llm", cfg), "logits_chunk", 0) or 0)

  def decoder_outputs(self, variables, tokens, positions, segment_ids, rng, train: bool, media: dict):
    """What the token losses below take: logits [B, T, V], or with `logits_chunk` the final
    hidden states [B, T, D], from which the losses compute logits a chunk at a time."""
    return self.model.apply(variables, tokens, positions, segment_ids, deterministic=not train,
                            rngs={"dropout": rng} if train else {}, return_hidden=self.logits_chunk > 0, **media)

  def _head(self, variables):
    return lambda h: self.model.apply(variables, h, method="logits")

  def cross_entropy_and_accuracy(self, variables, outputs, targets, mask):
    """(nll sum, mask count, correct count) of `decoder_outputs`."""
    if self.logits_chunk:
      return losses.chunked_cross_entropy_and_accuracy(self._head(variables), outputs, targets, mask,
                                                       self.logits_chunk)
    return losses.cross_entropy_and_accuracy(outputs, targets, mask)

  def sequence_log_probs(self, variables, outputs, targets, mask):
    """Summed log p(target) over each row's mask [B] of `decoder_outputs`."""
    if self.logits_chunk:
      return losses.chunked_sequence_log_probs(self._head(variables), outputs, targets, mask, self.logits_chunk)
    return losses.sequence_log_probs(outputs, targets, mask)

  def tokens(self, batch: dict):
    """Tokens (or examples) processed, for throughput: non-padding positions."""
    return (batch["segment_ids"] != 0).sum()

  def init_args(self, config) -> tuple:
    """Dummy inputs for `model.init`: one token row."""
    return (jnp.zeros((1, config.seq_len), jnp.int32),)

  # -- objective-owned state, updated by the step and checkpointed (`TrainState.aux`) -------
  def init_aux(self, variables: dict) -> dict:
    return {}

  def aux_names(self, param_names: dict) -> dict:
    """Logical axis names of `init_aux`'s tree (for its shardings)."""
    return {}

  def update_aux(self, aux: dict, variables: dict, step):
    """The aux state after optimizer step `step` (1, 2, ...) given the updated variables."""
    return aux

  # -- FLOPs ---------------------------------------------------------------------------------
  flops_factor = 1.0  # training FLOPs per example relative to one plain row (a class attribute)

  def flops_per_step(self, config, per_token: float, per_example: float) -> float:
    rows = config.batch_size * self.flops_factor
    return per_token * rows * config.seq_len + per_example * rows

  # -- data ----------------------------------------------------------------------------------
  def example_fns(self, config, tokenizer) -> dict:
    """How the Grain pipeline turns records into this objective's batches: {'example_fn':
    record -> arrays, 'blank': example -> an eval padding row}; {} = tokenized rows."""
    return {}

  def train_iterator(self, ctx: DataContext, data_cfg):
    """An endless, checkpointable iterator of local batches of `data_cfg`'s train split."""
    c = ctx.config
    return pipeline.make_train_iterator(
        data_cfg, global_batch=c.batch_size, seq_len=c.seq_len, seed=c.seed, process_index=ctx.process_index,
        process_count=ctx.process_count, tokenizer=ctx.tokenizer, visual_tokens=ctx.visual_tokens,
        example_fn=self.example_fns(c, ctx.tokenizer).get("example_fn"), media_fields=self.media)

  def eval_batches(self, ctx: DataContext) -> list[dict]:
    """The held-out batches the loss metrics are averaged over ([] = none)."""
    c = ctx.config
    return pipeline.make_eval_batches(
        c.data, batch=c.eval_batch_size, seq_len=c.seq_len, tokenizer=ctx.tokenizer,
        process_index=ctx.process_index, process_count=ctx.process_count, visual_tokens=ctx.visual_tokens,
        media_fields=self.media, **self.example_fns(c, ctx.tokenizer))

  # -- evaluation ----------------------------------------------------------------------------
  def extra_eval(self, run, variables: dict, tokenizer) -> dict:
    """Metrics beyond the loss, computed before and after training (e.g. mAP)."""
    return {}

