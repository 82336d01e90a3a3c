"""Tests see 8 fake CPU devices (set before jax is imported); single-device tests build
their mesh over `jax.devices()[:1]`."""
import os

# The suite's time is mostly XLA compiling tiny programs: LLVM at -O0 compiles them about a
# third faster and runs them about as fast. (Float semantics do not depend on the LLVM level:
# XLA enables no fast-math by default.) `helpers.run_main` passes these flags on.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the mmjax.main processes they start, which inherit this environment)
# compile the same tiny programs: JAX's persistent compilation cache compiles each once.
# Entries are keyed by the program and the jax/XLA versions, so a stale one is never used.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Slow tests first (stable otherwise): under `-n 2` the two workers then start the long
  end-to-end runs early and finish together, instead of one worker running a long test alone
  at the end."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
