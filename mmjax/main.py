"""Entry point: `python -m mmjax.main --config configs/NAME.py[:ARG] --workdir DIR [--config.key=value ...]`.

Parses flags, starts `jax.distributed` when launched with coordinator settings (flags,
or the environment of SLURM / Open MPI / the local launcher), validates the config and
calls the training loop. Config errors exit with code 2 and one line, no traceback.
"""
from __future__ import annotations

import json
import os
import signal
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
flags.DEFINE_string("compile_cache", None, "Directory of XLA's compiled programs, shared by the stages and reruns "
                    "that compile the same ones (default: $JAX_COMPILATION_CACHE_DIR, else WORKDIR/compile_cache; "
                    "'none': off).")


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


def _config_arg(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return ""


def explain_flag_error(e: Exception, argv) -> str:
  """One line for a failure to parse the flags: an unknown --config.KEY override, a config file
  that does not exist, or what its get_config(arg) raised (the config's own message)."""
  from mmjax.config import core, schema
  msg = schema.explain_override_error(argv)
  if msg:
    return f"config error: {msg}"
  chain, c = [], e
  while c is not None and c not in chain:
    chain.append(c)
    c = c.__cause__ or (None if c.__suppress_context__ else c.__context__)
  root, spec = chain[-1], _config_arg(argv)
  path = spec.split(":", 1)[0]

  def first(x):
    return str(x).strip().splitlines()[0] if str(x).strip() else type(x).__name__

  if isinstance(root, FileNotFoundError) or (path and not os.path.exists(path)):
    return f"config error: config file {path!r} does not exist (--config {spec})"
  if str(e).startswith("flag --config."):  # a --config.KEY=VALUE override of the wrong type
    return f"config error: {first(e)}"
  ours = [c for c in chain if isinstance(c, core.ConfigError)]
  if ours:  # e.g. parse_arg's message for a bad configs/x.py:ARG
    return f"config error: {spec}: {first(ours[-1])}"
  if chain[0] is root and isinstance(e, flags.Error):
    return f"bad flags: {first(root)}"
  return f"config error: {spec}: get_config raised {type(root).__name__}: {first(root)}"


class Preempted(BaseException):
  """SIGTERM / SIGINT outside the training loop (whose own handler saves a checkpoint first)."""


def _preempt(signum, frame):
  raise Preempted(signal.Signals(signum).name)


def check_workdir(path: str) -> None:
  """A workdir must be (or become) a writable directory; one line otherwise (exit code 2)."""
  if os.path.exists(path) and not os.path.isdir(path):
    _fail(f"--workdir={path!r} is a file; give a directory (it is created when missing)")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    _fail(f"--workdir={path!r} cannot be written ({e.strerror or e}); give a writable directory")


def write_config(workdir: str, config) -> str:
  """The resolved config of this run as WORKDIR/config.json; a different one an earlier run
  wrote is kept as config.N.json (N = 1, 2, ...), so a rerun with changed flags loses nothing."""
  from mmjax import files
  path = os.path.join(workdir, "config.json")
  text = json.dumps(config.to_dict(), indent=1, default=str) + "\n"
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return path
    n = 1
    while os.path.exists(os.path.join(workdir, f"config.{n}.json")):
      n += 1
    os.replace(path, os.path.join(workdir, f"config.{n}.json"))
  return files.atomic_write(path, text)


def main(argv=None):
  argv = sys.argv if argv is None else argv
  try:
    FLAGS(argv)
    if FLAGS.config is not None:  # a config file that failed to load raises on first use
      FLAGS.config.get("seed")
  except Exception as e:  # noqa: BLE001 - absl and config_flags wrap the config file's own errors
    _fail(explain_flag_error(e, argv))
  if FLAGS.config is None:
    _fail("--config is required, e.g. --config configs/default.py")
  if not FLAGS.workdir:
    _fail("--workdir is required, e.g. --workdir /tmp/mmjax_run")
  check_workdir(FLAGS.workdir)
  for sig in (signal.SIGTERM, signal.SIGINT):  # a clean exit at any phase; the loop saves first
    signal.signal(sig, _preempt)
  logging.set_verbosity(logging.WARNING)
  from mmjax import runtime
  if getattr(FLAGS.config, "reuse_host_memory", False) is True and runtime.cpu_backend_expected():
    runtime.reuse_host_memory()  # before JAX's backend threads allocate (see mmjax/runtime.py)

  import jax
  from mmjax.config import core, schema
  from mmjax.recipes import stages
  from mmjax.train import checkpoint, loop
  runtime.use_compile_cache(runtime.compile_cache(FLAGS.compile_cache, FLAGS.workdir))  # before anything compiles

  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  config = FLAGS.config
  try:
    schema.validate(config, jax.device_count(), jax.process_count(), files=True)
  except ValueError as e:
    _fail(f"config error: {e}")
  except Preempted as e:
    _fail(f"stopped by {e} before training started; nothing was written", code=0)
  try:
    if jax.process_index() == 0:
      write_config(FLAGS.workdir, config)
    stages.train_and_evaluate(config, FLAGS.workdir)
  except Preempted as e:
    _fail(f"stopped by {e}; every output written so far is complete, rerun the same command to continue",
          code=0)
  except core.ConfigError as e:
    _fail(f"config error: {e}")
  except (loop.NonFiniteLoss, checkpoint.DamagedCheckpoints) as e:
    _fail(str(e), code=1)
  except (FileNotFoundError, ValueError) as e:
    if len(str(e).splitlines()) == 1:
      _fail(f"error: {e}", code=1)
    raise


if __name__ == "__main__":
  main()
