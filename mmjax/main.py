"""Entry point: `python -m mmjax.main --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value ...]`.

Parses flags, starts `jax.distributed` when launched with coordinator settings (flags,
or the environment of SLURM / Open MPI / the local launcher), validates the config and
calls the training loop. Config errors exit with code 2 and one line, no traceback.
"""
from __future__ import annotations

import os
import sys

from absl import flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file with get_config(arg): configs/NAME.py[:ARG].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def _fail(msg: str, code: int = 2):
  print(f"mmjax: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> None:
  """`jax.distributed.initialize` from flags, or from a cluster environment jax detects
  (SLURM, Open MPI, ...), or from MMJAX_COORDINATOR/MMJAX_NUM_PROCESSES/MMJAX_PROCESS_ID."""
  import jax
  env = os.environ
  coordinator_address = coordinator_address or env.get("MMJAX_COORDINATOR")
  num_processes = num_processes if num_processes is not None else (
      int(env["MMJAX_NUM_PROCESSES"]) if "MMJAX_NUM_PROCESSES" in env else None)
  process_id = process_id if process_id is not None else (
      int(env["MMJAX_PROCESS_ID"]) if "MMJAX_PROCESS_ID" in env else None)
  if coordinator_address:
    # CPU processes need gloo for cross-process collectives; GPU backends ignore this flag.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()  # jax reads SLURM's environment


def main(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    FLAGS(argv)
  except flags.Error as e:
    _fail(f"bad flags: {str(e).splitlines()[0]}")
  except Exception as e:  # config_flags raises plain errors for bad overrides and config files
    from mmjax.config import schema
    msg = schema.explain_override_error(argv)
    _fail(f"config error: {msg}" if msg else
          f"bad config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  if FLAGS.config is None:
    _fail("--config is required, e.g. --config configs/default.py")
  if not FLAGS.workdir:
    _fail("--workdir is required, e.g. --workdir /tmp/mmjax_run")
  logging.set_verbosity(logging.WARNING)
  if getattr(FLAGS.config, "reuse_host_memory", False) is True:
    from mmjax import runtime
    runtime.reuse_host_memory()  # before JAX's backend threads allocate (see mmjax/runtime.py)

  import jax
  from mmjax.config import core, schema
  from mmjax.recipes import stages
  from mmjax.train import loop

  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = FLAGS.config
  try:
    schema.validate(config, jax.device_count(), jax.process_count(), files=True)
  except ValueError as e:
    _fail(f"config error: {e}")
  try:
    stages.train_and_evaluate(config, FLAGS.workdir)
  except core.ConfigError as e:
    _fail(f"config error: {e}")
  except loop.NonFiniteLoss as e:
    _fail(str(e), code=1)
  except (FileNotFoundError, ValueError) as e:
    if len(str(e).splitlines()) == 1:
      _fail(f"error: {e}", code=1)
    raise


if __name__ == "__main__":
  main()
