"""Error-driven data selection on its own: write one stage's selection file without training.

  python tools/select_data.py --config configs/shapes_errordriven.py --workdir /tmp/mmjax_errordriven \
      --stage errors_1000 [--out /tmp/selection.json] [--config.select.budget=500 ...]

The stage's student is the final model of the stage it starts from (its `init_from_stage`,
or the stage before it), which must have finished in WORKDIR (run the recipe that far, or
all of it). The selection is computed exactly as the recipe would (the stage kind in
mmjax/recipes/select.py):
student answers on the validation set, errors, the teacher's gap profile, retrieval from the
pool by skills and embeddings; it is written to --out (default: the stage's own
selection.json, which a later recipe run then trains on) and summarised on stdout.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from mmjax import main as mmjax_main  # noqa: E402  (defines --config and --workdir)

flags.DEFINE_string("stage", None, "The recipe stage whose selection to compute (one with config.select.method).")
flags.DEFINE_string("out", None, "Where to write the selection; default WORKDIR/stages/STAGE/selection.json.")
FLAGS = flags.FLAGS


def main(argv):
  try:
    FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - flags and config files raise many kinds
    mmjax_main._fail(f"bad flags or config: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
  if FLAGS.config is None or not FLAGS.workdir or not FLAGS.stage:
    mmjax_main._fail("--config, --workdir and --stage are required")
  import jax
  from mmjax import files, sharding
  from mmjax.config import schema
  from mmjax.config.core import stage_config
  from mmjax.data.tokenizer import load_tokenizer
  from mmjax.recipes import kinds, stages
  from mmjax.recipes.select import SELECTION
  from mmjax.train import run as run_lib

  config = FLAGS.config
  try:
    schema.validate(config, jax.device_count(), jax.process_count(), files=True)
  except ValueError as e:
    mmjax_main._fail(f"config error: {e}")
  order = tuple(config.stage_order)
  if FLAGS.stage not in order:
    mmjax_main._fail(f"--stage={FLAGS.stage!r} is not a stage of this recipe; stages: {', '.join(order) or 'none'}")
  cfg = stage_config(config, FLAGS.stage)
  if not SELECTION.applies(cfg):
    mmjax_main._fail(f"stage {FLAGS.stage!r} has no config.select.method; stages with one: "
                     + ", ".join(n for n in order if SELECTION.applies(stage_config(config, n))))
  k = order.index(FLAGS.stage)
  start = cfg.init_from_stage or (order[k - 1] if k else None)
  needed = [start] + ([cfg.select.teacher_stage] if cfg.select.method == "errors" and cfg.select.teacher == "model" else [])
  mesh = sharding.make_mesh(cfg.mesh)
  tok = load_tokenizer(cfg.data.tokenizer)
  sdir = os.path.join(FLAGS.workdir, "stages", FLAGS.stage)
  run = run_lib.build(SELECTION.configure(cfg, os.path.join(sdir, SELECTION.file)), mesh, tok)
  finals = {}
  for name in needed:
    path = os.path.join(FLAGS.workdir, "stages", str(name), "final")
    if name is None or not os.path.isdir(path):
      mmjax_main._fail(f"stage {FLAGS.stage!r} starts from stage {name!r}, which has not finished in {FLAGS.workdir} "
                       f"(no {path}); run the recipe up to it first")
    finals[name] = stages.restore_params(path, run_lib.build(stage_config(config, name), mesh, tok))
  ctx = kinds.StageContext(FLAGS.stage, cfg, sdir, run, tok, mesh, finals[start], finals)
  out = FLAGS.out or os.path.join(sdir, SELECTION.file)
  with jax.set_mesh(mesh):
    if FLAGS.out:  # computed afresh, written atomically
      files.atomic_write(out, SELECTION.produce(ctx))
    else:  # the stage's own file: kept if it exists (a stage may have trained on it)
      files.write_once(out, lambda: SELECTION.produce(ctx))
  with open(out) as f:
    meta = json.load(f)["meta"]
  print(json.dumps(meta, indent=1, sort_keys=True))
  print(f"selection: {out}")


if __name__ == "__main__":
  main(sys.argv)
