"""What every benchmark shares: timing by median after warm-up, the machine's load."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

import jax


def times(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Wall times of ``repeats`` calls of ``fn()`` (blocked until its result is ready), after
  ``warmup`` untimed calls (compilation)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  out = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    out.append(time.perf_counter() - start)
  return out


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """The median of ``times``."""
  return statistics.median(times(fn, repeats, warmup))


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int,
                        warmup: int = 1) -> dict[str, float]:
  """The median wall time of each of ``fns``, called in turn within every repeat: on a shared
  machine a change of load then moves all of them, not whichever ran at the time."""
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  out = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      out[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in out.items()}


def load_average() -> str:
  """The 1, 5 and 15 minute load averages, printed with the figures they qualify: this machine is
  shared, so a figure is only as good as the load it ran under."""
  return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1 / 5 / 15 min)"
