"""Training metrics: TensorBoard event files (tensorboardX) and ``metrics.jsonl`` in the workdir,
written by process 0; PNG plots of the losses and gate values at the end of a run."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import jax

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Scalars per step to TensorBoard and to one JSON line per write (process 0 only)."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    import tensorboardX  # pylint: disable=import-outside-toplevel  # slow to import
    self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", encoding="utf-8")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    for name, value in scalars.items():
      self._tensorboard.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
                      + "\n")
    self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tensorboard.close()
      self._jsonl.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
  """The rows of ``metrics.jsonl``; after a resume, later rows replace earlier ones of a step."""
  by_step = {}
  with open(os.path.join(workdir, METRICS_FILE), encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      by_step.setdefault(row["step"], {}).update(row)
  return [by_step[s] for s in sorted(by_step)]


def plot(workdir: str) -> list[str]:
  """``loss.png`` (every ``loss*`` series) and, for Flamingo runs, ``gates.png`` (tanh of every
  gate); returns the files written."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = read_metrics(workdir)
  written = []
  for filename, prefix, ylabel in (("loss.png", "loss", "loss"),
                                   ("gates.png", "gate/", "tanh(gate)")):
    names = sorted({k for row in rows for k in row if k.startswith(prefix)})
    if not names:
      continue
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in names:
      points = [(r["step"], r[name]) for r in rows if name in r and math.isfinite(r[name])]
      ax.plot(*zip(*points), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small", ncol=2 if len(names) > 8 else 1)
    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
  return written
