"""The README's plan table: ``python -m xattn_vlm.plan`` over paper configs and TPU topologies.

Each (config, topology) cell is one subprocess running the plan CLI with ``--json`` (one compile at
a time: libtpu's compile of a paper-size step takes many minutes and GiBs of host memory), on
``experiments/<config>.py:mesh=tpu`` (``--preset``) with the experiment's own global batch (the
paper's). The preset's mesh is sized for one slice; on a smaller topology the plan fits it
(``xattn_vlm.plan.plans.fit_mesh``: ``tensor`` kept, ``fsdp`` capped, ``data`` the rest).
Topologies run in order of chip count per TPU generation; after the first that fits, only
``--after_fit`` larger ones are planned (a step that fits on N chips fits on more). Prints a
Markdown table: config, topology, chips, mesh, memory per chip against its HBM, fits, predicted
step time and MFU (the plan's range from communication fully to not overlapped) and the plan's
wall time on this host, with the smallest topology of each generation that fits in bold.

COMMAND: python -m benchmarks.plan_table \
    --configs=flamingo_3b,openflamingo_9b,flamingo_9b,flamingo_80b \
    --topologies=v5p:2x2x2,v5p:2x4x4,v5p:4x4x8,v5p:8x8x8 --after_fit=0
(the defaults; add e.g. v5e:4x4,v5e:8x8,v5e:16x16 for a second generation). One paper-size compile
of the scanned paper configs takes 4-6 minutes and up to 11 GB of memory on a 2-core host.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import flags

from xattn_vlm import cli
from xattn_vlm.plan import report
from xattn_vlm.train import configs
from xattn_vlm.train import sharding
from xattn_vlm.train.configs import MESH_AXES

REPO = pathlib.Path(__file__).resolve().parent.parent

_CONFIGS = flags.DEFINE_list(
    "configs", ["flamingo_3b", "openflamingo_9b", "flamingo_9b", "flamingo_80b"],
    "experiments/<name>.py files, planned with their --preset.")
_TOPOLOGIES = flags.DEFINE_list(
    "topologies", ["v5p:2x2x2", "v5p:2x4x4", "v5p:4x4x8", "v5p:8x8x8"],
    "Cloud TPU topologies, e.g. v5e:8x8 or v5p:4x4x8 (chips: the product of the dimensions, one "
    "device each).")
_AFTER_FIT = flags.DEFINE_integer(
    "after_fit", 0, "Larger topologies of a generation to plan after the first that fits.")
_PRESET = flags.DEFINE_string("preset", "mesh=tpu", "The preset string of every config.")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds one plan may take.")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "A --config.KEY=VALUE for every plan (e.g. config.microbatches=2).")


@dataclasses.dataclass
class Cell:
  """One plan: its figures (``plan.report.summary``, or what does not fit), or why there are
  none."""
  config: str
  topology: str
  mesh: dict[str, int]
  figures: dict[str, Any] | None = None
  error: str = ""
  seconds: float = 0.0

  @property
  def fits(self) -> bool:
    return bool(self.figures and self.figures.get("fits"))


def chips(topology: str) -> int:
  """``v5p:4x4x8`` -> 128."""
  return math.prod(int(d) for d in topology.partition(":")[2].split("x"))


def planned_mesh(config: str, preset: str, devices: int) -> dict[str, int]:
  """The mesh the plan of ``experiments/<config>.py:<preset>`` on ``devices`` uses (the preset's,
  fitted to them: ``sharding.fitted_mesh_shape``)."""
  module = configs.load_file(REPO / "experiments" / f"{config}.py")
  shape = sharding.fitted_mesh_shape(module.get_config(preset).mesh, devices)
  return dict(zip(MESH_AXES, shape))


def plan_command(config: str, preset: str, topology: str, json_path: str,
                 overrides: Sequence[str] = ()) -> list[str]:
  return [sys.executable, "-m", "xattn_vlm.plan", f"--config=experiments/{config}.py:{preset}",
          f"--topology={topology}", f"--json={json_path}",
          *[f"--{o.removeprefix('--')}" for o in overrides]]


def run_plan(config: str, preset: str, topology: str, overrides: Sequence[str] = (),
             timeout: float = 3600) -> Cell:
  """Plans one cell in a subprocess (``python -m xattn_vlm.plan --json``)."""
  cell = Cell(config, topology, planned_mesh(config, preset, chips(topology)))
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "plan.json"
    start = time.perf_counter()
    try:
      command = plan_command(config, preset, topology, str(path), overrides)
      result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
      cell.error = f"no plan within {timeout:.0f} s"
      return cell
    finally:
      cell.seconds = time.perf_counter() - start
    if path.exists():
      cell.figures = json.loads(path.read_text())
      cell.error = cell.figures.get("error", "")
    else:
      cell.error = (result.stderr.strip().splitlines() or [f"exit {result.returncode}"])[-1]
  return cell


def plan_all(configs: Sequence[str], preset: str, topologies: Sequence[str], after_fit: int,
             overrides: Sequence[str] = (), timeout: float = 3600) -> list[Cell]:
  """Cells of every config on each generation's topologies, smallest first, stopping
  ``after_fit`` topologies after the first that fits. Ctrl-C (SIGINT) ends the sweep with the
  cells finished so far: a paper-size sweep takes hours on a small host."""
  generations = {}
  for topology in sorted(topologies, key=chips):
    generations.setdefault(topology.partition(":")[0], []).append(topology)
  cells = []
  try:
    for config in configs:
      for ladder in generations.values():
        left = None
        for topology in ladder:
          if left == 0:
            break
          cell = run_plan(config, preset, topology, overrides, timeout)
          print(row(cell), file=sys.stderr, flush=True)
          cells.append(cell)
          if left is not None:
            left -= 1
          elif cell.fits:
            left = after_fit
  except KeyboardInterrupt:
    print(f"interrupted: a table of the {len(cells)} plans finished", file=sys.stderr)
  return cells


def row(cell: Cell, smallest: bool = False) -> str:
  """The cell's Markdown row (``plan.report.table_row``); ``smallest`` puts its topology in bold."""
  return report.table_row(cell.config, cell.topology, chips(cell.topology), cell.mesh,
                          cell.figures or {"error": cell.error}, cell.seconds, smallest)


def markdown(cells: Sequence[Cell]) -> str:
  """The table; the smallest topology of each (config, generation) that fits is in bold."""
  smallest = {}
  for cell in cells:
    key = (cell.config, cell.topology.partition(":")[0])
    if cell.fits and (key not in smallest or chips(cell.topology) < chips(smallest[key])):
      smallest[key] = cell.topology
  lines = [report.table_header()]
  lines += [row(c, smallest.get((c.config, c.topology.partition(":")[0])) == c.topology)
            for c in cells]
  return "\n".join(lines)


def benchmark() -> None:
  cells = plan_all(_CONFIGS.value, _PRESET.value, _TOPOLOGIES.value, _AFTER_FIT.value,
                   _OVERRIDES.value, _TIMEOUT.value)
  print(markdown(cells))


def main() -> None:
  cli.run(benchmark, name="benchmark-plan-table", doc=__doc__, module=__name__, skip_tpu=False)


if __name__ == "__main__":
  main()
