"""The stage kinds a stage is checked against, in the order they prepare (see
`mmjax.recipes.kinds`). Adding one: a module with a `StageKind` subclass, its config section
(`config_dict()`, `validate(config, env)`) and one line here."""
from __future__ import annotations

from mmjax.recipes import pairs, reuse, select, stop

KINDS = (pairs.ONLINE_PAIRS, pairs.REBIRTH, select.SELECTION)
OWNERS = (pairs, select, stop, reuse)  # the kinds' config sections, the recipe's stop rule, reused stages


def kinds_for(config) -> tuple:
  """The kinds that apply to a stage config."""
  return tuple(k for k in KINDS if k.applies(config))
