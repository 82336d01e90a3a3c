"""Error-driven data selection on its own: write one stage's selection file without training.

  python tools/select_data.py --config configs/shapes_errordriven.py --workdir /tmp/mmjax_errordriven \
      --stage errors_1000 [--out /tmp/selection.json] [--config.select.budget=500 ...]

The stage's student is the final model of the stage it starts from (its `init_from_stage`,
or the stage before it), which must have finished in WORKDIR (run the recipe that far, or
all of it). The selection is computed exactly as the recipe would (mmjax/select/recipe.py):
student answers on the validation set, errors, the teacher's gap profile, retrieval from the
pool by skills and embeddings; it is written to --out (default: the stage's own
selection.json, which a later recipe run then trains on) and summarised on stdout.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

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
  from mmjax import config_lib, sharding
  from mmjax.data.tokenizer import load_tokenizer
  from mmjax.select import recipe
  from mmjax.train import loop, stages

  config = FLAGS.config
  try:
    config_lib.validate(config, jax.device_count(), jax.process_count())
  except ValueError as e:
    mmjax_main._fail(f"config error: {e}")
  order = tuple(config.stage_order)
  if FLAGS.stage not in order:
    mmjax_main._fail(f"--stage={FLAGS.stage!r} is not a stage of this recipe; stages: {', '.join(order) or 'none'}")
  cfg = stages.stage_config(config, FLAGS.stage)
  if not cfg.select.method:
    mmjax_main._fail(f"stage {FLAGS.stage!r} has no config.select.method; stages with one: "
                     + ", ".join(n for n in order if stages.stage_config(config, n).select.method))
  k = order.index(FLAGS.stage)
  start = cfg.init_from_stage or (order[k - 1] if k else None)
  needed = [start] + ([cfg.select.teacher_stage] if cfg.select.method == "errors" and cfg.select.teacher == "model" else [])
  mesh = sharding.make_mesh(cfg.mesh)
  tok = load_tokenizer(cfg.data.tokenizer)
  run = loop.build(cfg, mesh, tok)
  finals = {}
  for name in needed:
    path = os.path.join(FLAGS.workdir, "stages", str(name), "final")
    if name is None or not os.path.isdir(path):
      mmjax_main._fail(f"stage {FLAGS.stage!r} starts from stage {name!r}, which has not finished in {FLAGS.workdir} "
                       f"(no {path}); run the recipe up to it first")
    finals[name] = stages._restore_params(path, stages.loop.build(stages.stage_config(config, name), mesh, tok))
  if FLAGS.out:  # computed afresh in a scratch directory next to --out, then moved there
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    out_dir = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(FLAGS.out)))
  else:
    out_dir = os.path.join(FLAGS.workdir, "stages", FLAGS.stage)
    os.makedirs(out_dir, exist_ok=True)
  with jax.set_mesh(mesh):
    written = recipe.select_for_stage(cfg, out_dir, run, finals[start], tok, finals)
  if FLAGS.out:
    os.replace(written, FLAGS.out)
    os.rmdir(out_dir)
    written = FLAGS.out
  with open(written) as f:
    meta = json.load(f)["meta"]
  print(json.dumps(meta, indent=1, sort_keys=True))
  print(f"selection: {written}")


if __name__ == "__main__":
  main(sys.argv)
