"""Process-level settings, applied once before JAX starts its backends.

`reuse_host_memory()`: XLA:CPU takes each step's temporary buffer (activations and their
gradients; 1.1-1.3 GB for `bench_small`) from malloc on one of its worker threads and frees
it when the step ends. glibc serves an allocation that large from a fresh `mmap` in a
thread arena and returns it with `munmap`, so every step page-faults the whole buffer
again: 320k minor faults and about 0.6 s of kernel time per `bench_small` step on 2 cores,
a fifth of the step. With one malloc arena, no mmap-backed chunks and a high trim
threshold, the freed buffer stays in the heap and the next step reuses it (zero faults).
The cost is that host memory freed by a step is kept by the process for the next one,
like any caching allocator. It must run before the first large allocation of the
threads that use it, so `mmjax.main` and `tools/bench.py` call it before JAX's backends
start (`config.reuse_host_memory`, on by default) when JAX will run on the CPU
(`cpu_backend_expected`): on GPU and TPU hosts the step's buffers live in device memory and
the host keeps glibc's defaults. A no-op where libc is not glibc.

`compile_cache(flag, workdir)`: where XLA keeps compiled programs between the stages and runs
that compile the same one (JAX's persistent compilation cache). Each stage of a recipe builds
its own jitted steps, so without it a DPO round recompiles what the round before compiled;
with it, `shapes_mrdpo` at `scale=0.02` (three rounds) ran in 118 s instead of 160 s from an
empty cache and in 67 s when rerun (2-core AMD EPYC, 2026-12-06). Programs that compile in
under a second are not kept (JAX's default).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import platform

# mallopt parameters (glibc malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = None


def reuse_host_memory() -> bool:
  """Makes glibc keep freed memory for reuse (see the module docstring). Returns whether
  it was applied (False off Linux/glibc). Idempotent."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  ok = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1),  # every thread allocates from the main (brk) heap ...
      (_M_MMAP_MAX, 0),  # ... never from a fresh mmap ...
      (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))  # ... and free() keeps up to 2 GB at the top of the heap
  _applied = ok
  return ok


def cpu_backend_expected(environ=None) -> bool:
  """Whether JAX will compute on the CPU, decided before it is imported: JAX_PLATFORMS when
  set, else whether a GPU (a CUDA plugin and an NVIDIA device node) or a TPU (libtpu and an
  accelerator device) is present."""
  environ = os.environ if environ is None else environ
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  cuda = any(importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  if cuda and os.path.exists("/dev/nvidiactl"):
    return False
  if importlib.util.find_spec("libtpu") is not None and (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio")):
    return False
  return True


CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"


def compile_cache(flag: str | None, workdir: str, environ=None) -> str:
  """The compilation cache directory of a run: `flag` when given ('none' or '' turns the
  cache off: returns ''), else JAX's own environment variable when set, else
  WORKDIR/compile_cache (kept with the run, shared by its stages and reruns)."""
  environ = os.environ if environ is None else environ
  if flag is not None:
    return "" if flag.strip().lower() in ("", "none") else flag
  return environ.get(CACHE_ENV) or os.path.join(workdir, "compile_cache")


def use_compile_cache(path: str) -> None:
  """Points JAX's persistent compilation cache at `path` ('' leaves it off)."""
  import jax
  jax.config.update("jax_compilation_cache_dir", path or None)
