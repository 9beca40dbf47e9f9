"""Settings for the host process that must come before JAX starts its CPU backend."""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def reuse_freed_memory() -> bool:
  """Makes glibc keep the memory XLA:CPU frees, to hand it out again; returns whether it applied.

  For training processes. Every execution of a compiled program allocates one buffer for all its
  temporaries (373 MB for the bench-small train step) on one of XLA's worker threads, and frees
  it when it ends. glibc serves an allocation that large, from a worker thread's arena, with a
  fresh ``mmap`` and returns it with ``munmap``: each step faulted every page in again, about
  100,000 page faults and a quarter of a CPU second in the kernel per 0.75 s step. With one
  arena, no ``mmap`` and no trimming below 2 GiB the buffer comes back from the heap, its pages
  already mapped, and the step is about a tenth faster (``benchmarks/train_step.py``).

  The costs: the process keeps its peak heap, and all threads allocate from one arena under one
  lock. Token-by-token decoding, whose steps are small and allocate often from several threads,
  contends for it: its per-token time was about 15% longer. So the training entry points call
  this, and generation and evaluation do not.

  Call it first thing in a program's ``main``: it only reaches threads that have not allocated
  yet, that is before JAX's first computation creates the CPU client and its thread pool. A no-op
  (False) on a C library other than glibc (macOS, musl).
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  return all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD)))
