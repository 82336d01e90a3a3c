"""What every Hugging Face converter shares: reading config.json, naming the architecture,
one-line errors for unsupported settings and a check of param shapes against a config."""
from __future__ import annotations

import json
import os


def read_json(path: str, file: str) -> dict:
  """PATH/FILE as a dict; a one-line ValueError when it is missing or not JSON."""
  full = os.path.join(path, file)
  if not os.path.exists(full):
    raise ValueError(f"no {file} in {path}")
  with open(full) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{full} is not valid JSON ({e.msg} at line {e.lineno})") from None


def unsupported(field: str, value, supported: str):
  """Raises the one-line error for a config.json setting mmjax does not convert."""
  raise ValueError(f"config.json {field}={value!r} is not supported; supported: {supported}")


def find_architecture(hf: dict, architectures, model_types: dict) -> str:
  """The first of config.json's `architectures` that is in `architectures`, else the class
  `model_types` maps its `model_type` to; anything else is a one-line ValueError."""
  archs = hf.get("architectures") or []
  for a in archs:
    if a in architectures:
      return a
  if archs:
    unsupported("architectures", archs, ", ".join(architectures))
  if hf.get("model_type") in model_types:
    return model_types[hf["model_type"]]
  unsupported("model_type", hf.get("model_type"), ", ".join(model_types))


def check_param_shapes(flat: dict, want: dict) -> None:
  """Flat params against the flat specs a model config implies; a one-line ValueError
  naming the first param that is absent, extra or mis-shaped."""
  for p in sorted(set(want) | set(flat)):
    if p not in flat or p not in want or tuple(flat[p].shape) != tuple(want[p].shape):
      got = tuple(flat[p].shape) if p in flat else "absent"
      raise ValueError(f"params {p!r} has shape {got}, but cfg implies "
                       f"{tuple(want[p].shape) if p in want else 'no such param'}")
