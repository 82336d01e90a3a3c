"""SFT objective: next-token cross-entropy on the tokens selected by `loss_mask`."""
from __future__ import annotations

import dataclasses

from mmjax.objectives import base

NAME = "sft"
FAMILIES = ("llama", "vlm")
BATCH_FIELDS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def config_dict() -> dict:
  return {}  # SFT needs nothing beyond the run keys


def validate(config, env) -> None:
  """Nothing beyond the run keys."""


@dataclasses.dataclass(frozen=True)
class SFT(base.Objective):

  @property
  def batch_fields(self):
    return BATCH_FIELDS + tuple(self.media)

  def loss(self, variables, batch, rng, train: bool):
    out = self.decoder_outputs(variables, batch["tokens"], batch["positions"], batch["segment_ids"], rng, train,
                               {k: batch[k] for k in self.media})
    # one fused pass for the loss and accuracy (custom VJP; see losses.cross_entropy_and_accuracy),
    # or a chunk of positions at a time (model.logits_chunk)
    loss_sum, count, correct = self.cross_entropy_and_accuracy(variables, out, batch["targets"], batch["loss_mask"])
    return loss_sum, count, {"loss": loss_sum, "accuracy": correct}


OBJECTIVE = SFT
