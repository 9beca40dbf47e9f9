"""Input pipeline throughput: examples/s of the grain pipeline, and (optionally) the train step.

COMMAND: python -m benchmarks.data --workers=0,2 --batch_size=32 --steps=10 --repeats=5
         python -m benchmarks.data --recipe=experiments/shapes_tiny.py --steps=10 --repeats=3

Two workloads: shapes-world interleaved documents (rendered on read; up to 5 images each) and
a folder of JPEG + caption pairs (LAION layout, written to a temporary folder first). Each row is
the median over ``--repeats`` timed runs of ``--steps`` batches, after ``--warmup`` batches that
absorb worker start-up. The "train step" column is filled when ``run`` gets a ``step_fn`` (the
trainer calls ``run(step_fn=...)``); the script alone leaves it blank.

``--recipe=CONFIG`` measures a recipe's Flamingo stage instead: the time to draw one step's
batches of all its datasets (the trainer's own iterator, its worker count) beside the time of
its jitted train step on those batches (random towers, the step's shapes and mixture), so the
two can be compared: the step waits for its data when the first is the larger.
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable

from absl import flags
import PIL.Image

from benchmarks import common
from xattn_vlm import cli
from xattn_vlm.data import default_tokenizer
from xattn_vlm.data import pipeline
from xattn_vlm.data import sources
from xattn_vlm.data.shapes import records as shapes_records
from xattn_vlm.data.shapes import world as shapes_world

_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "grain worker counts to compare")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "examples per batch")
_STEPS = flags.DEFINE_integer("steps", 10, "batches per timed run")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per row (the median is reported)")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed batches before the timed runs")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "tower input size (pixels)")
_NUM_JPEGS = flags.DEFINE_integer("num_jpegs", 256, "JPEG pairs written for the folder workload")
_RECIPE = flags.DEFINE_string("recipe", None, "a recipe config file (experiments/shapes_tiny.py): "
                              "time its Flamingo stage's data per step beside its train step")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
StepFn = Callable[[str, pipeline.Batch], None]


def write_jpeg_folder(folder: pathlib.Path, count: int, size: int = 320) -> None:
  """``count`` shapes-world scenes saved as JPEG (web-photo sized) with their captions."""
  for i in range(count):
    item = shapes_world.caption_example("train", 0, i, image_size=size)
    PIL.Image.fromarray(item["image"]).save(folder / f"{i:05d}.jpg", quality=90)
    (folder / f"{i:05d}.txt").write_text(item["caption"])


def workloads(jpeg_folder: pathlib.Path, image_size: int) -> dict[str, tuple]:
  """Name -> (source, transform) of the benchmarked datasets."""
  tok = default_tokenizer()
  documents = pipeline.ExampleTransform(tok, max_tokens=256, max_images=5, image_size=image_size,
                                        mean=CLIP_MEAN, std=CLIP_STD)
  pairs = pipeline.ExampleTransform(tok, max_tokens=32, max_images=1, image_size=image_size,
                                    mean=CLIP_MEAN, std=CLIP_STD)
  return {
      "shapes world documents": (shapes_records.ShapesWorld("interleaved", num_records=100_000,
                                                     image_size=64), documents),
      "JPEG folder pairs": (sources.ImageTextFolder(jpeg_folder), pairs),
  }


def examples_per_second(iterator, *, batch_size: int, steps: int, repeats: int,
                        warmup: int) -> list[float]:
  """Throughput of ``repeats`` runs of ``steps`` batches each, after ``warmup`` batches."""
  for _ in range(warmup):
    next(iterator)
  rates = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      next(iterator)
    rates.append(steps * batch_size / (time.perf_counter() - start))
  return rates


def step_milliseconds(step_fn: StepFn, name: str, batch: pipeline.Batch, repeats: int) -> float:
  """Median wall time of ``step_fn(name, batch)`` after one untimed call (compilation)."""
  return 1e3 * common.median_time(lambda: step_fn(name, batch), repeats)


def run(step_fn: StepFn | None = None, *, workers=(0, 2), batch_size: int = 32, steps: int = 10,
        repeats: int = 5, warmup: int = 3, image_size: int = 224,
        num_jpegs: int = 256) -> list[dict]:
  """Measures every workload at every worker count; returns one row dict per measurement.

  ``step_fn(dataset_name, batch)`` runs one training step on a batch (blocking until done); when
  given, its median time fills the "train step ms" column, so input and compute can be compared.
  """
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    write_jpeg_folder(pathlib.Path(folder), num_jpegs)
    for name, (source, transform) in workloads(pathlib.Path(folder), image_size).items():
      for num_workers in workers:
        iterator = pipeline.batch_iterator(source, transform, batch_size=batch_size, seed=0,
                                           num_workers=num_workers, process_index=0,
                                           process_count=1)
        try:
          rates = examples_per_second(iterator, batch_size=batch_size, steps=steps,
                                      repeats=repeats, warmup=warmup)
          step_ms = (None if step_fn is None else
                     step_milliseconds(step_fn, name, next(iterator), repeats))
        finally:
          iterator.close()
        rows.append({"workload": name, "workers": num_workers,
                     "examples/s": statistics.median(rates), "min": min(rates),
                     "max": max(rates), "train step ms": step_ms})
  return rows


def format_table(rows: list[dict], batch_size: int) -> str:
  """A Markdown table of ``run``'s rows, with the input time per batch next to the step time."""
  lines = ["| workload | workers | examples/s (median) | min - max | input ms/batch | "
           "train step ms |", "|---|---|---|---|---|---|"]
  for row in rows:
    step = "" if row["train step ms"] is None else f"{row['train step ms']:.1f}"
    lines.append(f"| {row['workload']} | {row['workers']} | {row['examples/s']:.1f} | "
                 f"{row['min']:.1f} - {row['max']:.1f} | "
                 f"{1e3 * batch_size / row['examples/s']:.1f} | {step} |")
  return "\n".join(lines)


def recipe_step(config_path: str, *, steps: int, repeats: int) -> dict[str, float]:
  """The recipe's Flamingo stage: median ms to draw one step's batches (over ``repeats`` runs of
  ``steps`` steps), and median ms of the jitted train step on such batches."""
  # pylint: disable=import-outside-toplevel  # the trainer is only needed in this mode
  import jax
  from xattn_vlm.train import configs, input_pipeline, trainer

  if not pathlib.Path(config_path).is_file():
    raise ValueError(f"--recipe: expected a recipe config file such as "
                     f"experiments/shapes_tiny.py, got {config_path!r} (no such file)")
  config = configs.load_file(config_path).get_config().stages.flamingo
  config.init.lm_workdir = config.init.vision_workdir = ""  # random towers: timing only
  iterator = input_pipeline.create_iterator(config)
  try:
    rates = examples_per_second(iterator, batch_size=1, steps=steps, repeats=repeats, warmup=2)
    batches = jax.tree.map(jax.numpy.asarray, next(iterator))
    weights = iterator.weights
  finally:
    iterator.close()
  s = trainer.setup(config)
  state = trainer.create_train_state(s)
  step = jax.jit(trainer.make_train_step(s, weights))
  holder = {"state": state}

  def one_step():
    holder["state"], metrics = step(holder["state"], batches)
    return metrics

  return {"data ms/step": 1e3 / statistics.median(rates),
          "train step ms": 1e3 * common.median_time(one_step, steps)}


def benchmark() -> None:
  if _RECIPE.value:
    row = recipe_step(_RECIPE.value, steps=_STEPS.value, repeats=_REPEATS.value)
    print(f"| {_RECIPE.value} flamingo stage | data ms/step | train step ms |\n|---|---|---|\n"
          f"| all datasets, one step | {row['data ms/step']:.1f} | {row['train step ms']:.1f} |")
    print(common.load_average())
    return
  rows = run(workers=[int(w) for w in _WORKERS.value], batch_size=_BATCH_SIZE.value,
             steps=_STEPS.value, repeats=_REPEATS.value, warmup=_WARMUP.value,
             image_size=_IMAGE_SIZE.value, num_jpegs=_NUM_JPEGS.value)
  print(format_table(rows, _BATCH_SIZE.value))


def main() -> None:
  cli.run(benchmark, name="benchmark-data", doc=__doc__, module=__name__)


if __name__ == "__main__":
  main()
