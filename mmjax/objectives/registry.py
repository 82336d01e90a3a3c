"""Objectives by name (`config.objective`). Adding one: a module exporting NAME, FAMILIES,
config_dict(), validate(config, env) and OBJECTIVE (see `mmjax.objectives.base`), and one
entry here (or `register(module)` at run time, as the tests' toy objective does)."""
from __future__ import annotations

from mmjax.config.core import Registry
from mmjax.objectives import dpo, sft, visft

OBJECTIVES = Registry("objective", (sft, dpo, visft))
register, unregister, names, modules, get = (OBJECTIVES.register, OBJECTIVES.unregister, OBJECTIVES.names,
                                             OBJECTIVES.modules, OBJECTIVES.get)
