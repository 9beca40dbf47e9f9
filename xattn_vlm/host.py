"""Settings for the host process that must come before JAX starts its CPU backend."""

from __future__ import annotations

import ctypes
import platform

from absl import flags
import jax

REUSE_FREED_MEMORY = flags.DEFINE_bool(
    "reuse_freed_memory", True,
    "Keep the memory XLA:CPU frees and run each step on the calling thread "
    "(xattn_vlm.host.reuse_freed_memory): faster training steps on CPU")

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def reuse_freed_memory() -> bool:
  """Keeps the memory XLA:CPU frees in the process, to hand it out again; returns whether it
  applied.

  For training processes: ``python -m xattn_vlm.train``, ``xattn_vlm.recipe`` and
  ``xattn_vlm.train.build_features`` call it unless given ``--noreuse_freed_memory``
  (``REUSE_FREED_MEMORY``). Every execution of a compiled program allocates one buffer for all its
  temporaries (373 MB for the bench-small train step) and frees it when it ends. glibc serves an
  allocation that large with a fresh ``mmap`` and returns it with ``munmap``: each step faulted
  every page in again, about 100,000 page faults and a quarter of a CPU second in the kernel per
  0.75 s step. This turns ``mmap`` off and trimming below 2 GiB, so the buffer comes back from
  the heap with its pages mapped, and runs each execution on the thread that calls it
  (``jax_cpu_enable_async_dispatch=False``): a buffer of more than 64 MB can only come from the
  heap of the main thread's arena, the others' are capped there and fall back to ``mmap``. The
  bench-small step is then about a tenth faster (``benchmarks/train_step.py``).

  The costs: the process keeps its peak heap, and a jitted call returns only when its result is
  ready, so Python no longer runs ahead of the computation. The trainer's input pipeline does
  not need it to: its read threads make whole batches ahead (``pipeline.batch_iterator``'s
  ``prefetch_batches``) while the step holds the main thread. Before they did, the miniature
  recipe's Flamingo stage, whose shapes-world batches take about 0.2 s of Python a step to draw,
  stepped at 0.42 s with this against 0.35 s without. On GPU and TPU hosts it changes only
  the host's allocator and the CPU client, which do not run the step. The generation and
  evaluation entry points do not call it (their buffers are small); the recipe's evaluation,
  in the same process as its training, runs under it, and decodes per token as fast.

  Call it first thing in a program's ``main``, before JAX's first computation creates the CPU
  client. A no-op (False) on a C library other than glibc (macOS, musl).
  """
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  applied = all(libc.mallopt(param, value) == 1 for param, value in (
      (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _LARGEST_TRIM_THRESHOLD)))
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return applied
