"""The model-family interface: every hook a family may provide, with its default.

A family module exports `NAME`, `config_dict()` (its config sections), `validate(config,
env)` (its checks, run when `config.model.name` selects it) and `FAMILY`, an instance of a
`Family` subclass. `mmjax.families.registry` maps names to modules.
"""
from __future__ import annotations

import jax
from flax import traverse_util


class Family:
  """A model family: builds its model from the run config, says which pixel fields its
  batches carry, counts its FLOPs, imports its Hugging Face weights and exports its result."""

  def build(self, config, tokenizer):
    """(model module, model config, visual tokens) from the run config. `visual tokens` maps
    'image' / 'video' to the placeholders one image / video takes (None: no media)."""
    raise NotImplementedError

  def media_fields(self, config) -> tuple[str, ...]:
    """Pixel batch fields the objective feeds the model: () for text-only families."""
    return ()

  def flops(self, model_cfg, config, abstract_params, patterns, visual_tokens) -> tuple[float, float]:
    """(per language-model token, per example) analytic training FLOPs."""
    return 0.0, 0.0

  def hf_parts(self, config) -> dict:
    """{params subtree: import function} of the Hugging Face weights the config names. The key
    None means the whole params tree; each function takes (config, mesh, rules) and returns
    params. {} when nothing is imported (the init is random)."""
    return {}

  def import_hf(self, config, run) -> dict | None:
    """The stage's base params with the Hugging Face parts of `hf_parts` imported into their
    shardings (the other parts keep the seeded random init), or None when there are none."""
    parts = self.hf_parts(config)
    if not parts:
      return None
    if None in parts:
      return parts[None](config, run.mesh, run.rules)
    with jax.set_mesh(run.mesh):
      params = dict(run.random_params(jax.random.key(config.seed)))
    for key, fn in parts.items():
      params[key] = fn(config, run.mesh, run.rules)
    want = traverse_util.flatten_dict(run.abstract_params, sep="/")
    got = traverse_util.flatten_dict(params, sep="/")
    describe = lambda t, p: f"{tuple(t[p].shape)} {t[p].dtype}" if p in t else "absent"
    for p in sorted(set(want) | set(got)):
      if describe(want, p) != describe(got, p):
        raise ValueError(f"imported Hugging Face weights do not fit the model the config builds: params {p!r} is "
                         f"{describe(got, p)}, the config builds {describe(want, p)} (check config.vision / "
                         "config.model sizes and dtypes against the checkpoint)")
    return params

  def start_from(self, config, run, params: dict) -> dict:
    """An earlier stage's result (params) as this stage's starting params; a family whose
    stages may add parts fills them here (default: the params as they are)."""
    return params

  def export(self, workdir: str, config, run, variables: dict) -> None:
    """Writes the finished run's model (`variables`: params and, if any, the adapter) under
    `workdir`, each directory atomically (`mmjax.files.atomic_dir`) and only when it is not
    there yet, so a rerun completes an export a kill interrupted (default: nothing)."""
