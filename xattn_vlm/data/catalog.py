"""Every record source by name: what a training dataset's ``source`` and a benchmark split's
``source`` name (``config.data.datasets.<name>.source``, ``--eval.data.<task>.<split>.source``).

A source entry is the reader and which of its arguments are paths: ``open_source`` resolves those
under a root (an evaluation's ``data_root``) and turns a wrong argument into an error naming the
setting. Training records come from the first group, benchmark records from the second
(``data.sources`` describes both record shapes).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any, Callable, Mapping, Sequence

from xattn_vlm.data import sources
from xattn_vlm.data.shapes import records


@dataclasses.dataclass(frozen=True)
class SourceType:
  """A reader (``reader(**arguments)`` -> a random-access sequence of records) and its path
  arguments; ``text_only`` sources yield ``{"id", "text"}`` records (language-model data)."""
  reader: Callable[..., Sequence]
  paths: tuple[str, ...] = ()
  text_only: bool = False


SOURCES: dict[str, SourceType] = {
    # Training records: image-text pairs and interleaved documents, or text.
    "shapes": SourceType(records.ShapesWorld),
    "shapes_text": SourceType(records.ShapesText, text_only=True),
    "image_text_folder": SourceType(sources.ImageTextFolder, ("path",)),
    "webdataset": SourceType(sources.WebDatasetTars, ("path",)),
    "mmc4": SourceType(sources.MMC4Documents, ("path", "image_root")),
    "array_record": SourceType(sources.ArrayRecordRecords, ("path",)),
    # Benchmark records, from the official files.
    "karpathy": SourceType(sources.KarpathyCaptions, ("annotation_file", "image_root")),
    "vqa": SourceType(sources.VqaQuestions, ("questions_file", "image_root", "annotations_file")),
    "textvqa": SourceType(sources.TextVqa, ("annotation_file", "image_root")),
    "vizwiz": SourceType(sources.VizWiz, ("annotation_file", "image_root")),
    "hateful_memes": SourceType(sources.HatefulMemes, ("jsonl_file", "image_root")),
    "image_class_folders": SourceType(sources.ImageClassFolders, ("root", "synset_mapping")),
}


def source_type(name: str, setting: str) -> SourceType:
  if name not in SOURCES:
    raise ValueError(f"{setting}.source: expected one of {sorted(SOURCES)}, got {name!r}")
  return SOURCES[name]


def open_source(name: str, arguments: Mapping[str, Any], *, setting: str,
                root: str = "") -> Sequence:
  """The records of source ``name`` read with ``arguments``, its path arguments taken relative
  to ``root`` when given. ``setting`` names where the arguments come from, in errors."""
  entry = source_type(name, setting)
  arguments = dict(arguments)
  for key in entry.paths:
    if root and arguments.get(key):
      arguments[key] = os.path.join(root, arguments[key])
  try:
    inspect.signature(entry.reader).bind(**arguments)
  except TypeError as error:  # an argument the reader does not take, or a missing one
    raise ValueError(f"{setting}: the {name} source's arguments {sorted(arguments)} do not fit "
                     f"its reader {entry.reader.__name__}: {error}") from error
  return entry.reader(**arguments)
