"""Test setup: 8 forced CPU devices and a persistent compilation cache, before jax is imported."""

import gc
import os
import pathlib

# LLVM's optimisation off: the suite's tiny programs spend longer compiling than running
# (docs/performance.md, "The test suite"). Subprocesses inherit these flags.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module", params=("explicit", "fused"))
def attention(request) -> str:
  """Each attention implementation (``config.model.attention``) in turn, for the tests that pin
  masking, zero gates, prefill/decode and parity."""
  return request.param


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drops every compiled program after each test module. XLA:CPU maps each program's code into
  its own memory regions; the whole suite in one process passed the kernel's limit on memory
  maps (vm.max_map_count, 65,530) and died of a segfault."""
  yield
  jax.clear_caches()
  gc.collect()


def pytest_collection_modifyitems(items):
  """Test files with slow tests run first: with `-n 2 --dist loadfile --no-loadscope-reorder` the
  two workers then share the long files and finish together on short ones."""
  def has_slow(item) -> bool:
    return item.get_closest_marker("slow") is not None

  slow_files = {item.path for item in items if has_slow(item)}
  items.sort(key=lambda item: item.path not in slow_files)
