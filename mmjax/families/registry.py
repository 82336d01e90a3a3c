"""Model families by name (`config.model.name`). Adding one: a module exporting NAME,
config_dict(), validate(config, env) and FAMILY (see `mmjax.families.base`), and one entry here."""
from __future__ import annotations

from mmjax.config.core import Registry
from mmjax.families import llama, visft, vlm

FAMILIES = Registry("model.name", (llama, vlm, visft))
register, unregister, names, modules, get = (FAMILIES.register, FAMILIES.unregister, FAMILIES.names,
                                             FAMILIES.modules, FAMILIES.get)
