"""The fusion modes compared on one backbone, one budget and one evaluation.

``python -m xattn_vlm.recipe.fusion --config=experiments/shapes_tiny.py:fusion --workdir=DIR``

Trains ``lm_pretrain`` and ``vision_pretrain`` once (into ``DIR/<stage>``, as the recipe does),
then the Flamingo stage once per trained mode of ``config.fusion_modes`` (into
``DIR/flamingo_<mode>``: the same data, steps and pretrained towers, ``config.model.fusion`` set
to the mode) and evaluates each with the recipe's evaluation (``DIR/eval_<mode>``). The
training-free modes (``magic``, ``socratic``: ``recipe.training_free``, settings in
``config.training_free``) run on the pretrained towers alone, on the same queries. It writes
``fusion.md`` (a table: trainable parameters, median step time, evaluation time, each task's
score per shot count; a dash where a mode has no such row or score),
``fusion.png`` (score against shots per task, a line per mode) and ``fusion.json``. A rerun
resumes or skips what is done, as the recipe does.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Any

import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_flags

from xattn_vlm import cli
from xattn_vlm import console
from xattn_vlm import lock
from xattn_vlm import recipe
from xattn_vlm.eval import runner
from xattn_vlm.inference import Processor
from xattn_vlm.models import config as model_config
from xattn_vlm.models import parameters
from xattn_vlm.recipe import report
from xattn_vlm.recipe import training_free
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import metrics as train_metrics
from xattn_vlm.train import trainer

TABLE, FIGURE, SUMMARY = "fusion.md", "fusion.png", "fusion.json"


def modes(config: ml_collections.ConfigDict) -> list[str]:
  """``config.fusion_modes`` ("xattn,prefix,joint,magic,socratic") as a checked list, with
  ``config.training_free`` checked when a training-free mode is in it (before any training)."""
  names = [m.strip() for m in config.fusion_modes.split(",")]
  known = (*model_config.FUSION_MODES, *training_free.MODES)
  for name in names:
    if name not in known:
      raise ValueError(f"config.fusion_modes: expected modes from {known}, got {name!r}")
  if any(name in training_free.MODES for name in names):
    training_free.check_settings(config.get("training_free") or {})
  return names


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, evaluates and tabulates each mode (see the module docstring); returns
  ``fusion.json``'s content."""
  with lock.hold(workdir, "--workdir"):
    return _run(config, pathlib.Path(workdir))


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  names = modes(config)
  free = [name for name in names if name in training_free.MODES]
  pretrained = {}  # the towers as models, for the training-free modes alone
  for stage in ("lm_pretrain", "vision_pretrain"):
    stage_cfg = recipe.stage_config(config, stage, workdir)
    state = trainer.train(stage_cfg, str(workdir / stage))
    if int(state.step) < stage_cfg.total_steps:
      return {"stopped": stage}
    if free:
      pretrained[stage] = recipe.stage_model(stage_cfg, state.params)
  rows = {}
  for mode in (name for name in names if name in model_config.FUSION_MODES):
    cfg = recipe.stage_config(config, "flamingo", workdir)
    cfg.model.fusion = mode
    run_dir = workdir / f"flamingo_{mode}"
    state = trainer.train(cfg, str(run_dir))
    if int(state.step) < cfg.total_steps:
      return {"stopped": f"flamingo_{mode}"}
    processor = Processor.from_model_config(cfg.model, input_pipeline.tokenizer_for(cfg))
    began = time.perf_counter()
    results = runner.evaluate(recipe.stage_model(cfg, state.params), processor, config.eval,
                              workdir / f"eval_{mode}", model_name=mode)
    step_times = [r["step_time"] for r in train_metrics.read_metrics(str(run_dir))
                  if "step_time" in r]
    rows[mode] = {
        "trainable_parameters": parameters.count_parameters(cfg.model)["trainable"],
        "step_time": statistics.median(step_times) if step_times else float("nan"),
        "eval_seconds": time.perf_counter() - began,
        "results": _means(results),
    }
  if free:
    rows.update(_training_free_rows(config, workdir, free, pretrained))
  rows = {name: rows[name] for name in names}
  (workdir / TABLE).write_text(table(rows))
  plot(rows, workdir / FIGURE)
  (workdir / SUMMARY).write_text(json.dumps(rows, indent=2) + "\n")
  console.say(f"fusion comparison: {workdir / TABLE}")
  return rows


def _means(results: dict[str, dict[Any, list[float]]]) -> dict[str, dict[int, float]]:
  """Each task's score per shot count, the mean over trials."""
  return {task: {int(s): float(np.mean(v)) for s, v in by_shot.items()}
          for task, by_shot in results.items()}


def _training_free_rows(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        names: list[str], pretrained: dict[str, Any]) -> dict[str, dict]:
  """The rows of the training-free modes: nothing trains, so no parameters and no step time;
  their evaluation time is shared (each image is captioned once for both)."""
  cfg = recipe.stage_config(config, "flamingo", workdir)
  processor = Processor.from_model_config(cfg.model, input_pipeline.tokenizer_for(cfg))
  began = time.perf_counter()
  results = training_free.evaluate(pretrained["lm_pretrain"], pretrained["vision_pretrain"],
                                   processor, config.eval, names, config.training_free)
  seconds = time.perf_counter() - began
  return {name: {"trainable_parameters": 0, "step_time": float("nan"), "eval_seconds": seconds,
                 "results": _means(results[name])} for name in names}


def table(rows: dict[str, dict[str, Any]]) -> str:
  """The Markdown table: a row per mode; a column per (task, shots), the mean over trials."""
  columns = sorted({(task, shots) for row in rows.values()
                    for task, by_shot in row["results"].items() for shots in by_shot})
  head = ["mode", "trainable params", "step time (s)", "evaluation (s)"] + [
      f"{report.TITLES.get(task, task)}, {shots}-shot" for task, shots in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for mode, row in rows.items():
    cells = [mode, f"{row['trainable_parameters']:,}", _number(row["step_time"], ".3f"),
             f"{row['eval_seconds']:.0f}"]
    cells += [_number(row["results"].get(task, {}).get(shots, float("nan")), ".1f")
              for task, shots in columns]
    lines.append("| " + " | ".join(cells) + " |")
  return "# Fusion modes compared\n\n" + "\n".join(lines) + "\n"


def _number(value: float, spec: str) -> str:
  return "–" if np.isnan(value) else format(value, spec)


def plot(rows: dict[str, dict[str, Any]], path: pathlib.Path) -> None:
  """Score against shots, one panel per task, one line per mode."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  tasks = sorted({task for row in rows.values() for task in row["results"]})
  fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
  for ax, task in zip(axes[0], tasks):
    for i, (mode, row) in enumerate(rows.items()):
      by_shot = row["results"].get(task, {})
      if not by_shot:  # a training-free mode without this task: no line, no legend entry
        continue
      shots = sorted(by_shot)
      ax.plot(shots, [by_shot[s] for s in shots], marker="o", label=mode, color=f"C{i}")
    shots = sorted({s for row in rows.values() for s in row["results"].get(task, {})})
    ax.set(title=report.TITLES.get(task, task), xlabel="shots", xticks=shots)
    ax.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main() -> None:
  """The command line; its flags are defined here, so importing the module defines none."""
  config_flags.DEFINE_config_file("config", None,
                                  "Recipe config file[:preset] with fusion_modes.",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for the stages, evaluations and the table.")
  flags.mark_flags_as_required(["config", "workdir"])
  cli.run(lambda: run(flags.FLAGS.config, flags.FLAGS.workdir), name="recipe.fusion",
          doc=__doc__, module=__name__, log_dir=lambda: flags.FLAGS.workdir, training=True)


if __name__ == "__main__":
  main()
