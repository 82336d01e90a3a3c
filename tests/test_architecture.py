"""The package's seams: imports run one way (no cycles, no private names across modules), and
an objective defined entirely in this module trains through the real loop and checkpoints."""
import ast
import dataclasses
import json
import os
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from mmjax.config import core, schema
from mmjax.objectives import base
from mmjax.objectives import registry as objectives
from mmjax.recipes import stages

from helpers import ROOT, tiny_config

PACKAGE = os.path.join(ROOT, "mmjax")


# ------------------------------------------------------------------------- the import graph


def _modules() -> dict:
  """{dotted module name: file} of every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(folder, f)
        name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def import_graph(modules: dict):
  """({module: modules it imports, at any depth of the file}, [(module, owner, private name)])."""
  edges, private = {}, []
  for name, path in modules.items():
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    deps, aliases = set(), {}
    for node in ast.walk(tree):  # function-level imports included
      if isinstance(node, ast.Import):
        for a in node.names:
          if a.name.split(".")[0] == "mmjax":
            deps.add(a.name)
            aliases[a.asname or a.name] = a.name
      elif isinstance(node, ast.ImportFrom):
        base_name = node.module or ""
        if node.level:
          parts = package.split(".")[:len(package.split(".")) - node.level + 1]
          base_name = ".".join(parts + ([node.module] if node.module else []))
        if base_name.split(".")[0] != "mmjax":
          continue
        for a in node.names:
          full = f"{base_name}.{a.name}"
          if full in modules:  # a module: `from mmjax.data import pipeline`
            deps.add(full)
            aliases[a.asname or a.name] = full
          else:  # a name of a module
            deps.add(base_name)
            if a.name.startswith("_"):
              private.append((name, base_name, a.name))
    for node in ast.walk(tree):  # `module._name` on an imported module
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
          and node.attr.startswith("_") and not node.attr.startswith("__")):
        private.append((name, aliases[node.value.id], node.attr))
    edges[name] = {d for d in deps if d in modules and d != name}
  return edges, private


def cycles(edges: dict) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def test_imports_have_no_cycles_and_no_private_names_across_modules():
  modules = _modules()
  assert len(modules) > 40 and "mmjax.train.loop" in modules
  edges, private = import_graph(modules)
  assert cycles(edges) == []
  assert private == []


def test_the_checks_catch_a_cycle_and_a_private_import(tmp_path):
  """The walker itself: a function-level import closing a cycle and a private name are found."""
  pkg = tmp_path / "mmjax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from mmjax import b\n\ndef f():\n  return b._hidden\n")
  (pkg / "b.py").write_text("def g():\n  from mmjax import a\n  return a\n_hidden = 1\n")
  files = {"mmjax": str(pkg / "__init__.py"), "mmjax.a": str(pkg / "a.py"), "mmjax.b": str(pkg / "b.py")}
  edges, private = import_graph(files)
  assert cycles(edges) == [["mmjax.a", "mmjax.b"]]
  assert private == [("mmjax.a", "mmjax.b", "_hidden")]


def test_loop_step_and_stages_name_no_objective_or_family():
  """The loop, the step and the stage runner call hooks only: no objective or family names."""
  names = set(objectives.names()) | {"vlm", "llama"}
  for rel in ("train/loop.py", "train/step.py", "recipes/stages.py", "train/run.py"):
    text = open(os.path.join(PACKAGE, rel)).read()
    for n in names:
      assert f'"{n}"' not in text and f"'{n}'" not in text, (rel, n)
    assert "hasattr(" not in text and "getattr(" not in text, rel


# ------------------------------------------------------------------------- a toy objective

NAME = "toy_margin"
FAMILIES = ("llama",)


def config_dict() -> dict:
  return {"toy": ml_collections.ConfigDict(dict(margin=1.0))}  # the toy objective's own section


def validate(config, env) -> None:
  if not config.toy.margin > 0:
    raise core.ConfigError(f"config.toy.margin={config.toy.margin!r} must be > 0")


@dataclasses.dataclass(frozen=True)
class ToyMargin(base.Objective):
  """A multiclass hinge loss on next tokens: the target's logit should beat every other
  logit by `margin`."""
  margin: float = 1.0

  @classmethod
  def from_config(cls, config, model, media=()):
    return cls(model, tuple(media), margin=config.toy.margin)

  @property
  def batch_fields(self):
    return ("tokens", "targets", "loss_mask", "segment_ids", "positions")

  def loss(self, variables, batch, rng, train):
    logits = self.model.apply(variables, batch["tokens"], batch["positions"], batch["segment_ids"],
                              deterministic=not train).astype(jnp.float32)
    target = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    others = jnp.where(jnp.arange(logits.shape[-1]) == batch["targets"][..., None], -jnp.inf, logits)
    gap = target - jnp.max(others, axis=-1)
    mask = batch["loss_mask"].astype(jnp.float32)
    hinge = jnp.sum(jnp.maximum(self.margin - gap, 0.0) * mask)
    return hinge, jnp.sum(mask), {"loss": hinge, "violations": jnp.sum((gap < self.margin) * mask)}


OBJECTIVE = ToyMargin


@pytest.fixture
def toy():
  objectives.register(sys.modules[__name__])
  yield
  objectives.unregister(NAME)


def test_a_toy_objective_trains_through_the_loop_and_checkpoints(toy, tmp_path):
  c = schema.base_config()
  assert c.toy.margin == 1.0  # its section joins the schema
  c = tiny_config(objective=NAME, steps=3, checkpoint_every=2)
  c.toy.margin = 2.0
  schema.validate(c, n_devices=8)  # the suite's 8 fake devices: batch 8 over data=8
  bad = tiny_config(objective=NAME)
  bad.toy.margin = 0.0
  with pytest.raises(core.ConfigError, match=r"config.toy.margin=0.0 must be > 0"):
    schema.validate(bad, n_devices=1)
  with pytest.raises(core.ConfigError, match="the 'toy_margin' objective and the 'llama' model go together"):
    schema.validate(tiny_config(objective=NAME, **{"model.name": "vlm"}), n_devices=1)

  results = stages.train_and_evaluate(c, str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train = [r for r in rows if r["split"] == "train"]
  assert [r["step"] for r in train] == [1, 2, 3]
  assert all(r["loss"] > 0 and 0 <= r["violations"] <= 1 for r in train)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "3"]
  ev = results["main"]["eval_after"]
  assert set(ev) >= {"loss", "violations"} and ev["loss"] < results["main"]["eval_before"]["loss"]
  again = stages.train_and_evaluate(c, str(tmp_path))  # resumes at its last checkpoint
  assert again["main"]["start_step"] == 3
  assert again["main"]["eval_after"] == pytest.approx(ev)
