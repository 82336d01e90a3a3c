"""Runs N mmjax processes on this machine, as a multi-host job would run on N hosts.

  python launch/local.py --num_processes 2 -- --config configs/default.py --workdir /tmp/mh

Each process gets MMJAX_COORDINATOR=127.0.0.1:PORT, MMJAX_NUM_PROCESSES and
MMJAX_PROCESS_ID; `mmjax.main` then calls `jax.distributed.initialize` (gloo collectives
on CPU). `--devices_per_process K` fakes K CPU devices in each process. Output of process
i goes to WORKDIR/process_i.log, and process 0 also streams to the terminal. The exit code
is the first non-zero exit code of any process.
"""
import argparse
import os
import re
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(num_processes: int, main_args: list[str], devices_per_process: int = 1, log_dir: str | None = None,
           module: str = "mmjax.main", timeout: float | None = None) -> int:
  port = free_port()
  procs, logs = [], []
  for i in range(num_processes):
    env = dict(os.environ, MMJAX_COORDINATOR=f"127.0.0.1:{port}", MMJAX_NUM_PROCESSES=str(num_processes),
               MMJAX_PROCESS_ID=str(i), JAX_PLATFORMS="cpu")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
    out = None
    if log_dir and i > 0:
      os.makedirs(log_dir, exist_ok=True)
      out = open(os.path.join(log_dir, f"process_{i}.log"), "w")
      logs.append(out)
    procs.append(subprocess.Popen([sys.executable, "-m", module, *main_args], env=env,
                                  stdout=out, stderr=subprocess.STDOUT if out else None))
  deadline = None if timeout is None else time.time() + timeout
  code = 0
  try:
    for p in procs:
      left = None if deadline is None else max(deadline - time.time(), 1)
      rc = p.wait(timeout=left)
      code = code or rc
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for f in logs:
      f.close()
  return code


def _workdir(args):
  for i, a in enumerate(args):
    if a == "--workdir" and i + 1 < len(args):
      return args[i + 1]
    if a.startswith("--workdir="):
      return a.split("=", 1)[1]
  return None


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=1)
  parser.add_argument("rest", nargs=argparse.REMAINDER, help="-- then the arguments of mmjax.main")
  a = parser.parse_args()
  rest = a.rest[1:] if a.rest[:1] == ["--"] else a.rest
  sys.exit(launch(a.num_processes, rest, a.devices_per_process, _workdir(rest)))
