"""Evaluation results: predictions logged as they come, trial summaries, results.json, a table.

Scores here are in the published tables' units: CIDEr x 100, accuracies and ROC-AUC in percent.
Results are ``{task: {shots: [score of each trial]}}``; task names are the keys of ``TASK_TITLES``
(others are allowed and shown as they are).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Hashable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

TASK_TITLES = {"coco": "COCO", "flickr30k": "Flickr30K", "vqav2": "VQAv2", "ok_vqa": "OK-VQA",
               "textvqa": "TextVQA", "vizwiz": "VizWiz", "hateful_memes": "HatefulMemes",
               "imagenet": "ImageNet"}
PUBLISHED_SHOTS = (0, 4, 8, 16, 32)

TABLE_11 = "OpenFlamingo paper Table 11 (random demonstrations)"
FLAMINGO_PAPER = "Flamingo paper (Alayrac et al. 2022)"


def _row(*values):
  return dict(zip(PUBLISHED_SHOTS, values))


# Published few-shot results (OpenFlamingo paper, Table 11; Flamingo paper): {model: {task:
# {shots: score}}}.
PUBLISHED: dict[str, dict[str, dict[int, float]]] = {
    "Flamingo-3B": {
        "coco": _row(73.0, 85.0, 90.6, 95.4, 99.0),
        "flickr30k": _row(60.6, 72.0, 71.7, 73.4, 71.2),
        "vqav2": _row(49.2, 53.2, 55.4, 56.7, 57.1),
        "ok_vqa": _row(41.2, 43.3, 44.6, 45.6, 45.9),
        "textvqa": _row(30.1, 32.7, 32.4, 31.8, 30.6),
        "vizwiz": _row(28.9, 34.0, 38.4, 43.3, 45.5),
        "hateful_memes": _row(53.7, 53.6, 54.7, 55.3, 56.3),
    },
    "Flamingo-9B": {
        "coco": _row(79.4, 93.1, 99.0, 102.2, 106.3),
        "flickr30k": _row(61.5, 72.6, 73.4, 72.7, 72.8),
        "vqav2": _row(51.8, 56.3, 58.0, 59.4, 60.4),
        "ok_vqa": _row(44.7, 49.3, 50.0, 50.8, 51.0),
        "textvqa": _row(31.8, 33.6, 33.6, 33.5, 32.6),
        "vizwiz": _row(28.8, 34.9, 39.4, 43.0, 44.0),
        "hateful_memes": _row(57.0, 62.7, 63.9, 64.5, 63.5),
    },
    "OF-3B": {
        "coco": _row(74.9, 77.3, 85.9, 89.8, 93.0),
        "flickr30k": _row(52.3, 57.2, 58.6, 59.2, 61.1),
        "vqav2": _row(44.6, 45.8, 46.2, 46.6, 47.0),
        "ok_vqa": _row(28.2, 30.3, 31.1, 30.9, 31.0),
        "textvqa": _row(24.2, 27.0, 27.7, 28.0, 28.3),
        "vizwiz": _row(23.7, 27.0, 32.1, 36.1, 39.8),
        "hateful_memes": _row(51.2, 50.6, 52.0, 48.5, 50.2),
    },
    "OF-4B": {
        "coco": _row(76.7, 81.8, 90.7, 93.9, 95.1),
        "flickr30k": _row(53.6, 60.7, 55.9, 56.8, 56.9),
        "vqav2": _row(45.1, 49.0, 48.3, 45.5, 43.0),
        "ok_vqa": _row(30.7, 35.1, 33.9, 28.5, 26.4),
        "textvqa": _row(21.0, 25.9, 21.3, 18.2, 14.1),
        "vizwiz": _row(18.8, 26.6, 28.8, 24.6, 23.1),
        "hateful_memes": _row(52.3, 51.5, 55.2, 54.5, 52.2),
    },
    "OF-9B": {
        "coco": _row(79.5, 89.0, 96.3, 98.8, 99.5),
        "flickr30k": _row(59.5, 65.8, 62.9, 62.8, 61.3),
        "vqav2": _row(52.7, 54.8, 54.8, 54.3, 53.3),
        "ok_vqa": _row(37.8, 40.1, 41.1, 42.7, 42.4),
        "textvqa": _row(24.2, 28.2, 29.1, 27.3, 23.8),
        "vizwiz": _row(27.5, 34.1, 38.5, 42.5, 44.0),
        "hateful_memes": _row(51.6, 54.0, 54.7, 53.9, 53.8),
    },
    # 0, 4 and 32 shots only. Its Hateful Memes figures come from a secondary source, not the
    # paper, and are left out.
    "Flamingo-80B": {
        "coco": {0: 84.3, 4: 103.2, 32: 113.8},
        "flickr30k": {0: 67.2, 4: 75.1, 32: 75.4},
        "vqav2": {0: 56.3, 4: 63.1, 32: 67.6},
        "ok_vqa": {0: 50.6, 4: 57.4, 32: 57.8},
        "textvqa": {0: 35.0, 4: 36.5, 32: 37.9},
        "vizwiz": {0: 31.6, 4: 39.6, 32: 49.8},
    },
}
PUBLISHED_SOURCES = {model: TABLE_11 for model in PUBLISHED} | {"Flamingo-80B": FLAMINGO_PAPER}


class TrialSummary(NamedTuple):
  """Mean and standard deviation over trials (population std, ddof=0, as OpenFlamingo reports)."""
  mean: float
  std: float
  trials: tuple[float, ...]


def summarize_trials(scores: Sequence[float]) -> TrialSummary:
  """The summary of one (task, shots) cell's per-trial scores."""
  scores = tuple(float(s) for s in scores)
  if not scores:
    raise ValueError("scores must hold at least one trial's score, got none")
  if not all(math.isfinite(s) for s in scores):
    raise ValueError(f"scores must be finite, got {scores}")
  return TrialSummary(float(np.mean(scores)), float(np.std(scores)), scores)


def summarize(results: Mapping[str, Mapping[int, Sequence[float]]]
              ) -> dict[str, dict[int, TrialSummary]]:
  """``summarize_trials`` for every cell, shots in increasing order."""
  return {task: {int(shots): summarize_trials(cells[shots]) for shots in sorted(cells, key=int)}
          for task, cells in results.items()}


def write_results_json(path: str | os.PathLike,
                       results: Mapping[str, Mapping[int, Sequence[float]]],
                       metadata: Mapping[str, Any] | None = None) -> None:
  """Writes ``{"metadata": ..., "results": {task: {shots: {mean, std, trials}}}}`` atomically."""
  body = {
      "metadata": dict(metadata or {}),
      "results": {task: {str(shots): cell._asdict() for shots, cell in cells.items()}
                  for task, cells in summarize(results).items()},
  }
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_name(path.name + ".partial")
  partial.write_text(json.dumps(body, indent=2) + "\n")
  os.replace(partial, path)


def markdown_table(results: Mapping[str, Mapping[int, Sequence[float]]], *,
                   model_name: str = "ours",
                   compare_with: Sequence[str] = tuple(PUBLISHED)) -> str:
  """A Markdown table, one row per (task, model), columns the shot counts.

  Our rows show ``mean ± std`` over trials; below each, the published figures of the models in
  ``compare_with`` for that task, where they exist, and a footnote citing their sources.
  """
  unknown = [model for model in compare_with if model not in PUBLISHED]
  if unknown:
    raise ValueError(f"compare_with must name models of PUBLISHED {sorted(PUBLISHED)}, "
                     f"got unknown {unknown}")
  summary = summarize(results)
  shots = sorted({s for cells in summary.values() for s in cells})
  lines = ["| task | model | " + " | ".join(f"{s}-shot" for s in shots) + " |",
           "|---|---|" + "---|" * len(shots)]
  sources = {}
  for task, cells in summary.items():
    title = TASK_TITLES.get(task, task)
    ours = [f"{cells[s].mean:.1f} ± {cells[s].std:.1f}" if s in cells else "—" for s in shots]
    lines.append(f"| {title} | {model_name} | " + " | ".join(ours) + " |")
    for model in compare_with:
      published = PUBLISHED[model].get(task)
      if published is None or not any(s in published for s in shots):
        continue
      marker = _footnote(sources, PUBLISHED_SOURCES[model])
      cells_text = [f"{published[s]:.1f}" if s in published else "—" for s in shots]
      lines.append(f"| {title} | {model}{marker} | " + " | ".join(cells_text) + " |")
  notes = [f"[{n}] {source}." for source, n in sources.items()]
  return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _footnote(sources: dict[str, int], source: str) -> str:
  """The mark " [n]" citing ``source``, sources numbered in order of first use."""
  sources.setdefault(source, len(sources) + 1)
  return f" [{sources[source]}]"


class PredictionLog:
  """Predictions appended to a JSONL file as they come; a rerun skips ids already written.

  Each line is one JSON object with an ``id_key`` field (a str or int id). Every ``write`` call
  is flushed and fsync'ed, so after a crash the file holds every batch written before it, and
  at worst a last line cut short mid-write, which opening the log again removes. An evaluation
  loop asks ``pending(ids)`` for what is left and writes only that.
  """

  def __init__(self, path: str | os.PathLike, *, id_key: str = "id"):
    self.path = pathlib.Path(path)
    self.id_key = id_key
    self._records: dict[Hashable, dict] = {}
    if self.path.exists():
      self._load()

  def _load(self) -> None:
    data = self.path.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
      # The last write stopped mid-line: drop the fragment so the next append starts clean.
      with open(self.path, "r+b") as f:
        f.truncate(complete)
    # Split on b"\n" only: str.splitlines would also split at separators inside JSON strings.
    for number, line in enumerate(data[:complete].split(b"\n"), start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line.decode("utf-8"))
      except json.JSONDecodeError as error:
        raise ValueError(f"{str(self.path)!r} line {number} is not JSON ({error}); a prediction "
                         "log is only ever appended to, so the file was changed by hand") from error
      self._records[self._id(record, f"line {number} of {str(self.path)!r}")] = record

  def _id(self, record: Mapping[str, Any], where: str) -> Hashable:
    if self.id_key not in record:
      raise KeyError(f"{where} has no {self.id_key!r} field (id_key); its keys: {sorted(record)}")
    key = record[self.id_key]
    if not isinstance(key, (str, int)) or isinstance(key, bool):
      raise TypeError(f"{where}: the id must be a str or int to survive JSON, got {key!r}")
    return key

  def __contains__(self, key: Hashable) -> bool:
    return key in self._records

  def __len__(self) -> int:
    return len(self._records)

  @property
  def records(self) -> dict[Hashable, dict]:
    """Every logged record by id, in the order written."""
    return dict(self._records)

  def pending(self, ids: Iterable[Hashable]) -> list:
    """The ids, in order, that have no record yet."""
    return [key for key in ids if key not in self._records]

  def write(self, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends records (one batch) and makes them durable; an id already logged is an error."""
    batch = {}
    for i, record in enumerate(records):
      key = self._id(record, f"records[{i}]")
      if key in self._records or key in batch:
        raise ValueError(f"id {key!r} is already logged in {str(self.path)!r}: filter the batch "
                         "with pending(ids) so no prediction is counted twice")
      batch[key] = dict(record)
    if not batch:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a", encoding="utf-8") as f:
      f.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in batch.values()))
      f.flush()
      os.fsync(f.fileno())
    self._records.update(batch)
