"""mmjax.runtime: host allocator settings (checked in fresh processes) and the compilation cache."""
import subprocess
import sys

import pytest

_PROBE = r"""
import ctypes, resource, sys, threading
if sys.argv[1] == "1":
  from mmjax import runtime
  assert runtime.reuse_host_memory() and runtime.reuse_host_memory()  # idempotent
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2 ** 20
out = []

def step():  # what XLA:CPU does each step: malloc a big buffer on a worker thread, touch it, free it
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  p = libc.malloc(size)
  ctypes.memset(p, 1, size)
  libc.free(p)
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(3):
  t = threading.Thread(target=step); t.start(); t.join()
print(out[-1])
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_host_memory_stops_refaulting_a_freed_buffer():
  faults = lambda on: int(subprocess.run([sys.executable, "-c", _PROBE, on], check=True, capture_output=True,
                                         text=True).stdout)
  default, reused = faults("0"), faults("1")
  assert default > 10000  # glibc: a fresh mmap each time, every 4 KB page faults again (16k pages)
  assert reused < 1000  # the freed heap memory is handed back as is


def test_host_memory_settings_only_where_jax_computes_on_the_cpu():
  from mmjax import runtime
  assert runtime.cpu_backend_expected({"JAX_PLATFORMS": "cpu"})
  assert not runtime.cpu_backend_expected({"JAX_PLATFORMS": "cuda"})
  assert not runtime.cpu_backend_expected({"JAX_PLATFORMS": "tpu,cpu"})
  assert runtime.cpu_backend_expected({})  # this machine: no accelerator


def test_slurm_xla_gpu_flags_are_known_to_the_installed_xla():
  """XLA aborts on an unknown flag; the flags are parsed on every backend, so CPU checks them."""
  import subprocess
  import sys
  from helpers import ROOT
  code = "import jax; print(float((jax.numpy.ones(2) + 1).sum()))"
  r = subprocess.run(["bash", "-c", f"source launch/xla_gpu_flags.sh && JAX_PLATFORMS=cpu {sys.executable} -c '{code}'"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == "4.0", r.stderr[-2000:]
  assert "source launch/xla_gpu_flags.sh" in open(f"{ROOT}/launch/slurm.sbatch").read()


def test_compile_cache_directory():
  from mmjax import runtime
  assert runtime.compile_cache(None, "/w", {}) == "/w/compile_cache"  # kept with the run
  assert runtime.compile_cache(None, "/w", {runtime.CACHE_ENV: "/c"}) == "/c"  # JAX's own variable
  assert runtime.compile_cache("/shared", "/w", {runtime.CACHE_ENV: "/c"}) == "/shared"
  for off in ("none", "None", ""):
    assert runtime.compile_cache(off, "/w", {runtime.CACHE_ENV: "/c"}) == ""
