"""Settings for the host process that must come before JAX starts its CPU backend."""

from __future__ import annotations

import ctypes
import platform

import jax

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def reuse_freed_memory() -> bool:
  """Keeps the memory XLA:CPU frees in the process, to hand it out again; returns whether it
  applied.

  Every execution of a compiled program allocates one buffer for all its temporaries and frees it
  when it ends; glibc returns a buffer that large to the kernel, so every training step faulted
  its pages in again (docs/performance.md has the measurements). This turns ``mmap`` off and
  trimming below 2 GiB, and runs each execution on the calling thread, whose arena is the only
  one that can hold such a buffer. The costs: the process keeps its peak heap, and a jitted call
  returns only when its result is ready (the input pipeline's read threads work ahead instead).

  The training entry points call it unless given ``--noreuse_freed_memory``. Call it before JAX's
  first computation creates the CPU client. A no-op (False) on a C library other than glibc.
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD)))
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return applied
