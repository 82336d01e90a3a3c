"""A recipe's stop rule (`config.stop`): its rounds end when a held-out metric degrades.

Multi-round DPO may erode what the rounds do not train (video-SALMONN 2 watches its language
abilities and stops the rounds). With `stop.stages` set (the rounds, in order), the
`stop.baseline` stage before them and each round, once trained, answer `stop.val_examples`
validation records greedily: eval-split records after the test set every stage is scored
on, none equal to a test record (`mmjax.evals.generation.validation_records`), so the
rule never reads the test. Each answer set is scored by the generation metric `stop.metric`
(e.g. `qa_exact_match`, the accuracy on the questions among them). The first round whose
value is worse than the baseline's by more than `stop.margin` (`degraded`) is rejected and
the rounds end:

  - that round's result, and that of every later round, is the model the round started from
    (the kept policy), so later stages that start or distil from a round (rebirth from
    dpo_R) use the kept policy;
  - later rounds are not trained; their table rows repeat the kept stage's metrics;
  - the rejected round's row keeps its own trained model's metrics;
  - the line under the table and `results.json` `_stop` say which round stopped the rounds,
    at what values, and how many rounds were kept (`kept_rounds`).

Each watched stage's validation value goes to its done.json (`validation`) and the table's
`validation` column, so a restarted recipe decides the same way without scoring again.
Controls outside `stop.stages` (other arms) run all their stages.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from mmjax.config.core import ConfigError, stage_config
from mmjax.evals import generation


def config_dict() -> dict:
  return {"stop": ml_collections.ConfigDict(dict(
      stages=(),  # the rounds the rule watches, in recipe order; () = no stop rule
      baseline="",  # the stage before them whose validation value a round must stay near
      metric="qa_exact_match",  # a generation metric of mmjax.evals.generation.score on the validation records
      margin=0.02,  # a round worse than the baseline by more than this ends the rounds (and is rejected)
      lower_is_better=False,  # the metric is an error rate
      val_examples=0,  # validation records (eval-split records after the test set); > 0 with stages
  ))}


def validate(config, env) -> None:
  """Per stage there is nothing to check: the rule is the recipe's (`validate_recipe`)."""


def validate_recipe(config, continued: set) -> None:
  """One-line ConfigErrors for a `config.stop` that cannot work; `continued` names the stages
  whose adapter a later stage trains on (a rejected round's adapter could not be replaced)."""
  s = config.stop
  if not s.stages:
    return
  order = tuple(config.stage_order)
  for name in s.stages:
    if name not in order:
      raise ConfigError(f"config.stop.stages names {name!r}, which is no stage of the recipe; stages: "
                        f"{', '.join(order) or 'none'}")
  where = [order.index(n) for n in s.stages]
  if where != sorted(set(where)):
    raise ConfigError(f"config.stop.stages={tuple(s.stages)!r} must name distinct stages in recipe order "
                      f"({', '.join(order)})")
  if s.baseline not in order or order.index(s.baseline) >= where[0]:
    raise ConfigError(f"config.stop.baseline={s.baseline!r} must name a stage before {s.stages[0]!r}; "
                      f"stages: {', '.join(order)}")
  if s.val_examples <= 0:
    raise ConfigError(f"config.stop.val_examples={s.val_examples} must be > 0 when config.stop.stages is set")
  if s.margin < 0:
    raise ConfigError(f"config.stop.margin={s.margin} must be >= 0")
  if not s.metric:
    raise ConfigError("config.stop.metric is empty; name a generation metric such as 'qa_exact_match'")
  both = sorted(set(s.stages) & continued)
  if both:
    raise ConfigError(f"config.stop.stages: a later stage continues the adapter of {both[0]!r} (continue_adapter), "
                      "which a rejected round could not hand on; watch rounds that each start a fresh adapter")
  short = generation.validation_room(stage_config(config, s.baseline), s.val_examples, "stop.val_examples")
  if short:
    raise ConfigError(short)


def degraded(value: float, baseline: float, margin: float, lower_is_better: bool = False) -> bool:
  """Whether `value` is worse than `baseline` by more than `margin` (beyond float rounding:
  0.60 is not more than 0.02 below 0.62)."""
  worse = (value - baseline) if lower_is_better else (baseline - value)
  return worse > margin + 1e-9


@dataclasses.dataclass
class Rule:
  """The stop rule's state through one run of a recipe (see the module docstring)."""
  cfg: ml_collections.ConfigDict  # config.stop
  values: dict = dataclasses.field(default_factory=dict)  # stage -> its validation value
  fired: dict | None = None  # the round that ended the rounds: {stage, kept, value, baseline_value}
  _records: list | None = None

  @classmethod
  def of(cls, config) -> "Rule | None":
    return cls(config.stop) if config.stage_order and config.stop.stages else None

  def watches(self, name: str) -> bool:
    return name == self.cfg.baseline or name in self.cfg.stages

  def skips(self, name: str) -> bool:
    """A watched round after the one that ended the rounds: not trained."""
    rounds = tuple(self.cfg.stages)
    return (self.fired is not None and name in rounds
            and rounds.index(name) > rounds.index(self.fired["stage"]))

  def kept(self, name: str) -> str | None:
    """The stage whose model stands for `name` (a rejected or skipped round), else None."""
    if self.fired is not None and (name == self.fired["stage"] or self.skips(name)):
      return self.fired["kept"]
    return None

  def score(self, cfg, run, params, tokenizer) -> float:
    """`stop.metric` of the model `params` (merged) on the validation records."""
    if self._records is None:
      self._records = generation.validation_records(cfg, self.cfg.val_examples, "config.stop.val_examples")
    metrics, _ = generation.evaluate_generation(run, {"params": params}, tokenizer, self._records,
                                                max_new_tokens=cfg.sample_eval.max_new_tokens,
                                                batch=cfg.eval_batch_size)
    if self.cfg.metric not in metrics:
      raise ConfigError(f"config.stop.metric={self.cfg.metric!r} is not scored on the validation records; "
                        f"scored: {', '.join(sorted(metrics))}")
    return float(metrics[self.cfg.metric])

  def record(self, name: str, value: float, start: str | None) -> None:
    """Notes `name`'s validation value; the first round that degrades ends the rounds, keeping
    `start`, the stage it started from."""
    self.values[name] = value
    if name not in self.cfg.stages or self.fired is not None:
      return
    base = self.values[self.cfg.baseline]
    if degraded(value, base, self.cfg.margin, self.cfg.lower_is_better):
      self.fired = dict(stage=name, kept=start, value=value, baseline_value=base)

  def summary(self) -> dict:
    """results.json's `_stop`: the rule, the values, and what it decided."""
    rounds = tuple(self.cfg.stages)
    kept = rounds.index(self.fired["stage"]) if self.fired else len([n for n in rounds if n in self.values])
    return dict(metric=self.cfg.metric, baseline=self.cfg.baseline, margin=float(self.cfg.margin),
                lower_is_better=bool(self.cfg.lower_is_better), val_examples=int(self.cfg.val_examples),
                values=dict(self.values), fired=self.fired, kept_rounds=kept, rounds=len(rounds))


def line(s: dict) -> str:
  """The line under a recipe's table (`Rule.summary`)."""
  rule = (f"stop rule: {s['metric']} on {s['val_examples']} validation records, a round more than "
          f"{s['margin']:.3f} {'above' if s['lower_is_better'] else 'below'} {s['baseline']}'s "
          f"{s['values'].get(s['baseline'], float('nan')):.4f} ends the rounds")
  f = s["fired"]
  if not f:
    return f"{rule}: no round did ({s['kept_rounds']} of {s['rounds']} trained and kept)"
  return (f"{rule}: {f['stage']} scored {f['value']:.4f} and was rejected; the later rounds were not trained and "
          f"every round from {f['stage']} on is {f['kept']}'s model ({s['kept_rounds']} of {s['rounds']} kept)")
