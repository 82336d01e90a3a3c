"""SFT objective: next-token cross-entropy on the tokens selected by `loss_mask`.

An objective is a small object with `loss(variables, batch, rng, train)` returning
`(loss_sum, normaliser, metric_sums)`: the train step divides by the normaliser summed
over the whole accumulated batch, and reports metric sums divided the same way.
"""
from __future__ import annotations

import dataclasses

from flax import linen as nn

from mmjax import losses

BATCH_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class SFT:
  model: nn.Module
  media: tuple = ()  # pixel fields passed to a VLM: ('images',) or ('frames',)

  @property
  def batch_fields(self):
    return BATCH_FIELDS + tuple(self.media)

  def loss(self, variables, batch, rng, train: bool):
    logits = self.model.apply(
        variables, batch["tokens"], batch["positions"], batch["segment_ids"],
        deterministic=not train, rngs={"dropout": rng} if train else {},
        **{k: batch[k] for k in self.media})
    # one fused pass for the loss and accuracy (custom VJP; see losses.cross_entropy_and_accuracy)
    loss_sum, count, correct = losses.cross_entropy_and_accuracy(logits, batch["targets"], batch["loss_mask"])
    return loss_sum, count, {"loss": loss_sum, "accuracy": correct}

  def tokens(self, batch):
    """Tokens processed (for throughput): non-padding positions."""
    return (batch["segment_ids"] != 0).sum()
