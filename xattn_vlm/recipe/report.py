"""The recipe's report: a Markdown summary, a figure of training and few-shot curves, and an
image grid of test images with the model's captions and answers.

Everything is read back from the workdir (the stages' ``metrics.jsonl``, the evaluation's
prediction logs) and from the shapes world (which regenerates any test image from its id), so
the report of a finished run can be rewritten without the model.
"""

from __future__ import annotations

import functools
import math
import pathlib
import textwrap
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np
from PIL import Image

from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.eval import metrics as metrics_lib
from xattn_vlm.eval import results as results_lib
from xattn_vlm.eval import runner
from xattn_vlm.eval import tasks as tasks_lib
from xattn_vlm.models import parameters
from xattn_vlm.train import metrics as train_metrics
from xattn_vlm.train.configs import STAGES

REPORT = "report.md"
FIGURE = "report.png"
GRID = "grid.png"
# "Far above" the majority baseline: 10 points, almost 3 standard deviations of an accuracy near
# 22% over 128 questions, so that noise alone does not pass the check.
VQA_MARGIN = 10.0
# Binding with images must come this close (points) to the same episodes described in words.
CEILING_MARGIN = 5.0
# Answer NLL (nats) that another question's image must add for the model to count as using images.
RELIANCE_MARGIN = 0.1
TITLES = {"shapes_captioning": "captioning (CIDEr)", "shapes_vqa": "VQA accuracy (%)",
          "shapes_binding": "in-context binding accuracy (%)"}

Results = Mapping[str, Mapping[int, Sequence[float]]]


def _vqa_queries(config: ml_collections.ConfigDict) -> tasks_lib.ShapesRecords:
  """The evaluated VQA test queries, rendered at 8 px: only their questions and answers are read."""
  shapes = config.eval.shapes
  return tasks_lib.ShapesRecords("vqa", split="test", num_records=shapes.num_queries,
                                 seed=shapes.seed, image_size=8)


def majority_baseline(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """VQA accuracy (%) of answering every test question with its type's most common training
  answer, overall and per question type, on the evaluated questions."""
  answers = shapes_world.majority_answers(seed=config.eval.shapes.seed)
  hits = {t: [] for t in shapes_world.QUESTION_TYPES}
  for record in _vqa_queries(config):
    hits[record["question_type"]].append(
        metrics_lib.vqa_question_accuracy(answers[record["question_type"]], record["answers"]))
  overall = 100 * float(np.mean([h for v in hits.values() for h in v]))
  return {"accuracy": overall, "answers": answers,
          "per_type": {t: 100 * float(np.mean(v)) for t, v in hits.items() if v}}


def _log_records(workdir: pathlib.Path, task: str, shots: int, trial: int = 0) -> dict:
  path = workdir / runner.PREDICTIONS / task / f"{shots}shot_trial{trial}.jsonl"
  return results_lib.PredictionLog(path).records if path.exists() else {}


def vqa_per_type(config: ml_collections.ConfigDict, eval_dir: pathlib.Path,
                 shots: int) -> dict[str, float]:
  """VQA accuracy (%) per question type at ``shots`` (every trial's predictions)."""
  types = {r["id"]: r["question_type"] for r in _vqa_queries(config)}
  hits = {t: [] for t in shapes_world.QUESTION_TYPES}
  trials = 1 if config.eval.demonstrations == "rices" else config.eval.trials
  for trial in range(trials):
    for key, record in _log_records(eval_dir, "shapes_vqa", shots, trial).items():
      hits[types[key]].append(metrics_lib.vqa_question_accuracy(record["prediction"],
                                                                record["reference"]))
  return {t: 100 * float(np.mean(v)) for t, v in hits.items() if v}


def _cell(results: Results, task: str, shots: int) -> str:
  scores = results.get(task, {}).get(shots)
  if not scores:
    return "—"
  summary = results_lib.summarize_trials(scores)
  return f"{summary.mean:.1f} ± {summary.std:.1f}"


def _mean(results: Results, task: str, shots: int) -> float:
  return float(np.mean(results[task][shots]))


def seed_means(per_seed: Mapping[int, Results], task: str,
               shots: Sequence[int]) -> dict[int, np.ndarray]:
  """Shots -> each seed's score (its trials' mean), in seed order."""
  return {s: np.asarray([_mean(per_seed[seed], task, s) for seed in sorted(per_seed)])
          for s in shots}


def targets(per_seed: Mapping[int, Results], reliance: Mapping[int, Mapping[str, float]],
            majority: float, shots: Sequence[int], *, rising: Sequence[str] = (),
            ceiling: Mapping[int, Results] | None = None) -> dict[str, bool]:
  """The recipe's targets judged over seeds (each seed's score the mean of its trials; spread =
  the standard deviation across seeds, 0 for one seed): VQA's mean minus two spreads at least
  ``VQA_MARGIN`` points over the majority answer at its best shot count; at the most shots,
  VQA and captioning no worse than at 0 shots beyond the larger spread of the two; binding
  rising with shots (in the mean); every seed's answers worse with another question's image.
  ``rising`` tasks must beat 0 shots at every larger shot count by more than the seed spread;
  with ``ceiling`` (each seed's binding in words, ``diagnostics.binding_text_ceiling``) binding
  must come within ``CEILING_MARGIN`` points of it at the most shots."""
  checks = {}
  first, last = min(shots), max(shots)
  for task in rising:
    if task in next(iter(per_seed.values())):
      scores = seed_means(per_seed, task, shots)
      checks[f"{task} above {first} shots at every larger shot count beyond the seed spread"] = all(
          float(scores[s].mean()) - float(scores[first].mean())
          > max(float(scores[s].std()), float(scores[first].std())) for s in shots if s > first)
  if ceiling is not None and "shapes_binding" in next(iter(per_seed.values())):
    ours = seed_means(per_seed, "shapes_binding", shots)[last].mean()
    words = np.mean([np.mean(ceiling[seed][last]) for seed in sorted(ceiling)])
    checks[f"binding within {CEILING_MARGIN:g} points of the text-only ceiling at {last} shots"] = (
        float(ours) >= float(words) - CEILING_MARGIN)
  for task, name in (("shapes_vqa", "VQA"), ("shapes_captioning", "captioning")):
    if task not in next(iter(per_seed.values())):
      continue
    scores = seed_means(per_seed, task, shots)
    if task == "shapes_vqa":
      worst = max(float(v.mean() - 2 * v.std()) for v in scores.values())
      checks[f"VQA far above the majority baseline (mean - 2 std over seeds >= majority + "
             f"{VQA_MARGIN:g} points at the best shot count)"] = worst >= majority + VQA_MARGIN
    if last > first:
      spread = max(float(scores[first].std()), float(scores[last].std()))
      checks[f"{name} at {last} shots no worse than at {first} beyond the seed spread"] = (
          float(scores[last].mean()) >= float(scores[first].mean()) - spread)
  if "shapes_binding" in next(iter(per_seed.values())):
    binding = [float(v.mean()) for v in seed_means(per_seed, "shapes_binding", shots).values()]
    checks["binding rises with shots"] = all(b > a for a, b in zip(binding, binding[1:]))
  checks["uses its images (VQA answers worse with another question's image, every seed)"] = all(
      r["swapped_nll"] > r["own_nll"] + RELIANCE_MARGIN for r in reliance.values())
  return checks


def write(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, results: Results,
          untrained: Results, reliance: Mapping[str, float],
          seconds: Mapping[str, float], binding_text: Results | None = None) -> dict[str, Any]:
  """Writes report.md, report.png and grid.png into ``workdir``; returns the baselines and
  target checks it reports. ``binding_text``: binding accuracy per shots and trial with the
  images described in words (the ceiling), when measured."""
  workdir = pathlib.Path(workdir)
  majority = majority_baseline(config)
  shots = sorted(int(s) for s in config.eval.shots)
  ways = config.eval.shapes.binding_ways
  checks = targets({0: results}, {0: reliance}, majority["accuracy"], shots,
                   rising=tuple(config.get("rising_tasks", ())),
                   ceiling=None if binding_text is None else {0: binding_text})
  extras = {"majority": majority, "checks": checks, "image_reliance": dict(reliance),
            "binding_text": binding_text,
            "vqa_per_type": {s: vqa_per_type(config, workdir / "eval", s) for s in shots}
            if "shapes_vqa" in results else {}}
  plot(config, workdir, results, untrained, majority, ways)
  grid(config, workdir)
  (workdir / REPORT).write_text(markdown(config, workdir, results, untrained, extras, seconds))
  return extras


def markdown(config: ml_collections.ConfigDict, workdir: pathlib.Path, results: Results,
             untrained: Results, extras: Mapping[str, Any], seconds: Mapping[str, float]) -> str:
  """The summary: results beside their baselines, target checks, settings and wall times."""
  shots = sorted(int(s) for s in config.eval.shots)
  majority = extras["majority"]
  ways = config.eval.shapes.binding_ways
  head = "| | " + " | ".join(f"{s}-shot" for s in shots) + " |"
  rule = "|---|" + "---|" * len(shots)
  rows = []
  if "shapes_captioning" in results:
    rows.append("| captioning, CIDEr | "
                + " | ".join(_cell(results, "shapes_captioning", s) for s in shots) + " |")
  if "shapes_vqa" in results:
    rows.append("| VQA accuracy (%) | "
                + " | ".join(_cell(results, "shapes_vqa", s) for s in shots) + " |")
    if "shapes_vqa" in untrained:
      rows.append("| VQA, untrained (gates 0: the frozen LM alone) | "
                  + " | ".join(_cell(untrained, "shapes_vqa", s) for s in shots) + " |")
    rows.append(f"| VQA, majority answer per question type | "
                + " | ".join(f"{majority['accuracy']:.1f}" for _ in shots) + " |")
  if "shapes_binding" in results:
    rows.append("| in-context binding accuracy (%) | "
                + " | ".join(_cell(results, "shapes_binding", s) for s in shots) + " |")
    if extras.get("binding_text"):
      words = {"shapes_binding": {int(k): v for k, v in extras["binding_text"].items()}}
      rows.append("| binding, text-only ceiling (images described in words) | "
                  + " | ".join(_cell(words, "shapes_binding", s) for s in shots) + " |")
    rows.append(f"| binding, chance ({ways} names in the prompt) | "
                + " | ".join(f"{100 / ways:.1f}" for _ in shots) + " |")
  e = config.eval
  trials = 1 if e.demonstrations == "rices" else e.trials
  lines = [
      "# The miniature Flamingo recipe on the shapes world", "",
      f"Wall time: {seconds['total']:.0f} s in all (" + ", ".join(
          f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total") + ").", "",
      f"Test split of the shapes world ({e.shapes.num_queries} queries per task, held-out "
      f"colour+shape pairs included), {e.demonstrations} demonstrations from the training split "
      f"({trials} trial{'s' if trials > 1 else ''}, mean ± std), 0-shot = 2 text-only "
      f"demonstrations, beam {e.num_beams}, stop at <|endofchunk|>.", "",
      head, rule, *rows, "",
  ]
  if extras["checks"]:
    lines += ["Targets (this seed alone; run several with `--seeds` to judge them over seeds):",
              *[f"- {name}: {'yes' if ok else 'NO'}" for name, ok in extras["checks"].items()],
              ""]
  r = extras["image_reliance"]
  lines += [f"Image-swap ablation ({r['questions']} validation VQA questions, teacher-forced): "
            f"answer NLL {r['own_nll']:.3f} nats and accuracy {r['own_accuracy']:.1f}% with each "
            f"question's own image, {r['swapped_nll']:.3f} nats and {r['swapped_accuracy']:.1f}% "
            f"with another question's image. A model that reads its images does clearly better "
            f"with its own (the check above asks for {RELIANCE_MARGIN:g} nats).", ""]
  if extras["vqa_per_type"]:
    per_type = extras["vqa_per_type"]
    types = [t for t in shapes_world.QUESTION_TYPES if any(t in p for p in per_type.values())]
    lines += ["VQA accuracy (%) per question type (the majority answer beside):", "",
              "| type | " + " | ".join(f"{s}-shot" for s in shots) + " | majority |",
              "|---|" + "---|" * (len(shots) + 1),
              *[f"| {t} ({majority['answers'][t]}) | "
                + " | ".join(f"{per_type[s][t]:.1f}" if t in per_type[s] else "—" for s in shots)
                + f" | {majority['per_type'].get(t, float('nan')):.1f} |" for t in types], ""]
  lines += ["## Training", "", "| stage | steps | final loss | batch (per dataset) |",
            "|---|---|---|---|"]
  for stage in [s for s in STAGES if s in config.stages]:
    cfg = config.stages[stage]
    final = train_metrics.read_metrics(str(workdir / stage))[-1]["loss"]
    batches = ", ".join(f"{n} {d.batch_size} (x{d.weight})" for n, d in cfg.data.datasets.items())
    lines.append(f"| {stage} | {cfg.total_steps} | {final:.3f} | {batches} |")
  counts = parameters.count_parameters(config.stages.flamingo.model)
  lines += ["", "Parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ".", "",
            f"![training and few-shot curves]({FIGURE})", "",
            f"![test images with the model's captions and answers]({GRID})", ""]
  return "\n".join(lines)


def plot(config, workdir: pathlib.Path, results: Results, untrained: Results,
         majority: Mapping[str, Any], ways: int) -> None:
  """report.png: losses of the three stages, gate values per layer, the few-shot curves."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
  for ax, stage in zip(axes[0], [s for s in STAGES if s in config.stages]):
    rows = train_metrics.read_metrics(str(workdir / stage))
    names = sorted({k for r in rows for k in r if k.startswith("loss")})
    for name in names:
      points = [(r["step"], r[name]) for r in rows if name in r and math.isfinite(r[name])]
      ax.plot(*zip(*points), label=name if name != "loss" else "total (weighted)")
    ax.set(title=f"{stage} loss", xlabel="step", ylabel="loss")
    ax.legend(fontsize="small")
  rows = train_metrics.read_metrics(str(workdir / "flamingo"))
  gates = sorted({k for r in rows for k in r if k.startswith("gate/")})
  ax = axes[1][0]
  for name in gates:
    points = [(r["step"], r[name]) for r in rows if name in r]
    ax.plot(*zip(*points), label=name[len("gate/"):], linestyle="-" if "/attn/" in name else "--")
  ax.set(title="tanh(gate) per gated block (before LM layer i)", xlabel="flamingo step")
  ax.axhline(0, color="grey", linewidth=0.5)
  ax.legend(fontsize="small")

  shots = sorted(int(s) for s in config.eval.shots)
  for ax, task in zip(axes[1][1:], ("shapes_vqa", "shapes_binding")):
    _curve(ax, results, task, shots, "trained")
    if task in untrained:
      _curve(ax, untrained, task, shots, "untrained (gates 0)")
    if task == "shapes_vqa":
      ax.axhline(majority["accuracy"], color="red", linestyle=":", label="majority answer")
    else:
      ax.axhline(100 / ways, color="red", linestyle=":", label=f"chance (1/{ways})")
    ax.set(title=TITLES[task], xlabel="shots", xticks=shots, ylim=(0, 100))
    ax.legend(fontsize="small", loc="upper left")
  if "shapes_captioning" in results:
    inset = axes[1][1].inset_axes([0.64, 0.6, 0.33, 0.3])
    _curve(inset, results, "shapes_captioning", shots, "CIDEr")
    inset.set_title("captioning CIDEr", fontsize="small")
    inset.set_xticks(shots)
    inset.tick_params(labelsize="x-small")
  fig.tight_layout()
  fig.savefig(workdir / FIGURE, dpi=90)
  plt.close(fig)


def _curve(ax, results: Results, task: str, shots: Sequence[int], label: str) -> None:
  if task not in results:
    return
  present = [s for s in shots if s in results[task]]
  means = [np.mean(results[task][s]) for s in present]
  stds = [np.std(results[task][s]) for s in present]
  ax.errorbar(present, means, yerr=stds, marker="o", capsize=3, label=label)


def grid(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """grid.png: test images with the model's caption, or a question with its answer and the
  truth, at the evaluation's middle shot count (first trial)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  shots = sorted(int(s) for s in config.eval.shots)
  shown = shots[len(shots) // 2]
  eval_dir = workdir / "eval"
  records = functools.partial(tasks_lib.ShapesRecords, split="test",
                              num_records=config.eval.shapes.num_queries,
                              seed=config.eval.shapes.seed,
                              image_size=config.stages.flamingo.model.vision.image_size)
  panels = []
  captions = _log_records(eval_dir, "shapes_captioning", shown)
  for key in sorted(captions)[:config.grid_images // 2]:
    record = records("caption")[key]
    panels.append((record["image"], f"model: {captions[key]['prediction']}\n"
                                     f"reference: {record['captions'][0]}"))
  answers = _log_records(eval_dir, "shapes_vqa", shown)
  for key in sorted(answers)[:config.grid_images - len(panels)]:
    record = records("vqa")[key]
    panels.append((record["image"], f"Q: {record['question']}\nmodel: "
                                     f"{answers[key]['prediction']}   truth: "
                                     f"{record['answers'][0]}"))
  if panels:
    draw_grid(panels, f"shapes-world test images as the model sees them, {shown}-shot prompts",
              workdir / GRID)


# A grid cell, in inches: the image on top, its text below it in a box of its own.
_CELL_WIDTH, _IMAGE_SIZE, _TEXT_HEIGHT, _MARGIN = 3.2, 2.4, 1.2, 0.15
_TEXT_LINES, _TEXT_WIDTH = 7, 40  # what fits the text box at 8 pt, in lines and characters


def panel_text(text: str) -> str:
  """``text`` wrapped to the cell's width and cut to the lines its box holds."""
  lines = [wrapped for line in text.split("\n")
           for wrapped in (textwrap.wrap(line, _TEXT_WIDTH, break_long_words=True) or [""])]
  if len(lines) > _TEXT_LINES:
    lines = lines[:_TEXT_LINES - 1] + [lines[_TEXT_LINES - 1][:_TEXT_WIDTH - 3] + "..."]
  return "\n".join(lines)


def draw_grid(panels: Sequence[tuple[np.ndarray, str]], title: str, path: pathlib.Path,
              columns: int = 4) -> tuple[Any, list, list]:
  """Images in rows of ``columns``, each with its text in a box right below it: every cell has
  a fixed place, so no text reaches into another cell's image. Returns the figure's text
  artists and image axes (for checks) after saving it to ``path``, with the figure."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = -(-len(panels) // columns)
  cell_height = _IMAGE_SIZE + _TEXT_HEIGHT + _MARGIN
  width, height = columns * _CELL_WIDTH, rows * cell_height + 0.5
  fig = plt.figure(figsize=(width, height))
  fig.suptitle(title, y=1 - 0.15 / height, fontsize=10)
  texts, image_axes = [], []
  for i, (image, text) in enumerate(panels):
    row, column = divmod(i, columns)
    left = column * _CELL_WIDTH + (_CELL_WIDTH - _IMAGE_SIZE) / 2
    top = height - 0.5 - row * cell_height  # inches from the bottom
    ax = fig.add_axes((left / width, (top - _IMAGE_SIZE) / height, _IMAGE_SIZE / width,
                       _IMAGE_SIZE / height))
    ax.imshow(Image.fromarray(image).resize((192, 192), Image.NEAREST))
    ax.axis("off")
    image_axes.append(ax)
    texts.append(fig.text((column * _CELL_WIDTH + 0.1) / width, (top - _IMAGE_SIZE - 0.05) / height,
                          panel_text(text),
                          fontsize=8, va="top", ha="left", family="monospace"))
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return fig, texts, image_axes


SEED_COLUMNS = (("shapes_captioning", "CIDEr"), ("shapes_vqa", "VQA %"),
                ("shapes_binding", "binding %"))


def write_seeds(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                summaries: Mapping[int, Mapping[str, Any]], seconds: float) -> dict[str, Any]:
  """report.md of a run over several seeds (each seed's own report is in ``seed_<s>/``): every
  seed's scores (mean of its trials), their mean ± std across seeds, and the targets judged over
  the seeds. Returns the aggregate and the checks."""
  workdir = pathlib.Path(workdir)
  seeds = sorted(summaries)
  shots = sorted(int(s) for s in config.eval.shots)
  per_seed = {seed: summaries[seed]["results"] for seed in seeds}
  reliance = {seed: summaries[seed]["image_reliance"] for seed in seeds}
  majority = majority_baseline(config)
  ceiling = ({seed: {int(k): v for k, v in summaries[seed]["binding_text"].items()}
              for seed in seeds} if all(summaries[s].get("binding_text") for s in seeds) else None)
  checks = targets(per_seed, reliance, majority["accuracy"], shots,
                   rising=tuple(config.get("rising_tasks", ())), ceiling=ceiling)
  columns = [(task, title, s) for task, title in SEED_COLUMNS if task in per_seed[seeds[0]]
             for s in shots]
  scores = {(task, s): seed_means(per_seed, task, shots)[s] for task, _, s in columns}
  gap = np.asarray([reliance[seed]["swapped_nll"] - reliance[seed]["own_nll"] for seed in seeds])
  lines = [
      f"# The miniature Flamingo recipe over {len(seeds)} seeds", "",
      f"Seeds {', '.join(map(str, seeds))} (each seed sets the stages' initialisation and data "
      f"order; the test queries are the same), {seconds:.0f} s in all. Each seed's score is the "
      "mean of its trials; the last row is the mean ± standard deviation across seeds. Each "
      "seed's own report: `seed_<s>/report.md`.", "",
      "| seed | " + " | ".join(f"{title} {s}-shot" for _, title, s in columns)
      + " | swap ablation (nats) |",
      "|---|" + "---|" * (len(columns) + 1),
  ]
  for i, seed in enumerate(seeds):
    lines.append(f"| {seed} | " + " | ".join(f"{scores[(t, s)][i]:.1f}" for t, _, s in columns)
                 + f" | {gap[i]:.3f} |")
  lines += ["| mean ± std | " + " | ".join(
      f"{scores[(t, s)].mean():.1f} ± {scores[(t, s)].std():.1f}" for t, _, s in columns)
            + f" | {gap.mean():.3f} ± {gap.std():.3f} |", "",
            f"Baselines: VQA majority answer per question type {majority['accuracy']:.1f}%; "
            f"binding chance {100 / config.eval.shapes.binding_ways:.1f}%. Swap ablation: answer "
            "NLL with another question's image minus with the question's own "
            f"(the target asks for {RELIANCE_MARGIN:g} nats).", "",
            *([] if ceiling is None else [
                "Binding with every image described in words (the text-only ceiling), mean ± "
                "std over seeds: " + ", ".join(
                    f"{s}-shot {np.mean([np.mean(ceiling[x][s]) for x in seeds]):.1f} ± "
                    f"{np.std([np.mean(ceiling[x][s]) for x in seeds]):.1f}" for s in shots)
                + ".", ""]),
            "Targets over the seeds:", *[f"- {name}: {'yes' if ok else 'NO'}"
                                         for name, ok in checks.items()], ""]
  (workdir / REPORT).write_text("\n".join(lines))
  aggregate = {f"{task}/{s}": {"mean": float(scores[(task, s)].mean()),
                               "std": float(scores[(task, s)].std()),
                               "seeds": scores[(task, s)].tolist()} for task, _, s in columns}
  return {"seeds": seeds, "aggregate": aggregate, "checks": checks, "majority": majority,
          "swap_gap_nats": gap.tolist()}
