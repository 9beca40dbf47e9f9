"""Data sources: deterministic, random-access readers of raw records.

Every source here has ``__len__`` and ``__getitem__`` (grain's ``RandomAccessDataSource`` protocol),
so a pipeline can shuffle indices and read records in worker processes. Sources do no pixel work:
they return text and *undecoded* images, and decoding happens in the pipeline's per-record map,
where workers parallelise it.

Two record shapes:

* **Training records** (image-text pairs, interleaved documents): ``{"id": str, "chunks": [...]}``,
  the document in reading order, where a ``str`` is text and an ``ImageRef`` is an image. An
  image-text pair is ``[ImageRef, caption]``. ``pipeline.ExampleTransform`` turns one into a model
  example.
* **Benchmark records** (what the evaluation harness consumes): ``{"id", "image": <path>, ...}``
  plus the task's fields, ``"captions"``, ``"question"`` + ``"answers"``, ``"label"``, ``"text"``.

``write_array_record`` converts any training-record source, images embedded, into one
``array_record`` file that ``ArrayRecordRecords`` reads with grain (no TensorFlow): the way to
pay the local formats' small-file and parsing costs once.

Bad input never crashes a run and never yields a silently wrong record. What can be checked
cheaply at construction (missing files, malformed JSON lines, records with no text) is dropped
there and counted in the source's ``skipped`` counter (reason -> count, with a logged warning);
what only shows when a record is read (an empty caption file, a corrupt image) raises
``BadRecordError`` / ``images.ImageError``, which the pipeline skips and counts. A dataset path
that does not exist fails at construction with the path in the message.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import logging
import os
import pathlib
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from array_record.python import array_record_module
import grain
import numpy as np
import PIL.Image
import scipy.optimize

from xattn_vlm.data import images

_log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# How many skipped records of one reason are logged one by one before only the count grows.
_LOG_FIRST_N = 5


class BadRecordError(ValueError):
  """A record that cannot become an example (e.g. no text): skipped and counted by pipelines
  under ``reason``."""

  def __init__(self, message: str, *, reason: str = "bad record"):
    super().__init__(message)
    self.reason = reason


def skip(skipped: collections.Counter, source: str, reason: str, detail: str) -> None:
  """Counts one skipped record under ``reason`` and logs the first few of each reason.

  The one place that turns bad input into a counted warning, shared by sources (at construction)
  and pipelines (at read time), so every skip is both visible in the logs and countable.
  """
  skipped[reason] += 1
  if skipped[reason] <= _LOG_FIRST_N:
    _log.warning("%s: skipped a record (%s, #%d): %s", source, reason, skipped[reason], detail)
  elif skipped[reason] == _LOG_FIRST_N + 1:
    _log.warning("%s: more records skipped for %r; only counting from now on", source, reason)


def require_path(path: str | os.PathLike, argument: str) -> pathlib.Path:
  """Returns ``path`` as a Path, failing at once if it does not exist (naming argument and path)."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{argument}: expected an existing file or directory, got {str(path)!r}"
                            " (no such path)")
  return path


@dataclasses.dataclass(frozen=True, eq=False)
class ImageRef:
  """An image not yet decoded: exactly one of a file ``path``, encoded ``data`` or a decoded uint8
  ``array``.

  ``key`` identifies the image stably across runs (the file path, ``shard::member`` for tar
  members); the frozen-feature cache is keyed by it.
  """
  key: str
  path: str | None = None
  data: bytes | None = None
  array: np.ndarray | None = None

  def __post_init__(self):
    given = [name for name in ("path", "data", "array") if getattr(self, name) is not None]
    if len(given) != 1:
      raise ValueError(f"ImageRef {self.key!r}: expected exactly one of path, data or array, "
                       f"got {given or 'none'}")

  def load(self) -> PIL.Image.Image:
    """Decodes the image to RGB; raises ``images.ImageError`` (corrupt) or ``OSError`` (missing)."""
    if self.array is not None:
      return PIL.Image.fromarray(np.asarray(self.array, np.uint8)).convert("RGB")
    return images.load_image(self.path if self.path is not None else self.data, name=self.key)


class RecordSource(Sequence):
  """Base of the sources: a list-like of records with a ``skipped`` counter (reason -> count).

  Subclasses fill ``self._entries`` at construction (cheap handles: paths, offsets, parsed
  records) and turn one entry into a record in ``_read``.
  """

  def __init__(self, name: str):
    self.name = name
    self.skipped: collections.Counter = collections.Counter()
    self._entries: list[Any] = []

  def _skip(self, reason: str, detail: str) -> None:
    skip(self.skipped, self.name, reason, detail)

  def _log_summary(self) -> None:
    if self.skipped:
      _log.warning("%s: %d records, %d skipped at construction: %s", self.name, len(self),
                   sum(self.skipped.values()), dict(self.skipped))

  def __len__(self) -> int:
    return len(self._entries)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self.name}: index {index} out of range for {len(self)} records")
    return self._read(self._entries[index])

  def _read(self, entry: Any) -> dict[str, Any]:
    return dict(entry)

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, records={len(self)})"


def _caption_from(payload: bytes, suffix: str, caption_key: str, where: str) -> str:
  """The caption in a ``.txt`` payload or under ``caption_key`` of a ``.json`` payload."""
  if suffix == ".txt":
    caption = payload.decode("utf-8", errors="replace")
  else:
    try:
      caption = json.loads(payload).get(caption_key)
    except (ValueError, AttributeError) as e:
      raise BadRecordError(f"{where}: malformed caption JSON ({e})",
                           reason="malformed json") from e
  if not isinstance(caption, str) or not caption.strip():
    raise BadRecordError(f"{where}: no caption text (expected a non-empty string"
                         f"{'' if suffix == '.txt' else f' under {caption_key!r}'})",
                         reason="missing text")
  return caption.strip()


def _pair_key(name: str) -> tuple[str, str]:
  """Splits a file name into (key, suffix) the WebDataset way: the key ends at the first dot."""
  directory, base = os.path.split(name)
  stem, dot, rest = base.partition(".")
  return os.path.join(directory, stem), (dot + rest).lower()


class ImageTextFolder(RecordSource):
  """Image-text pairs in a folder tree: ``x.jpg`` next to ``x.txt`` or ``x.json`` (img2dataset's
  "files" layout, as for LAION / Conceptual Captions).
  Yields ``{"id", "chunks": [image, caption]}``.

  Pairs are ordered by path, so the same folder always gives the same records. An image with no
  caption file is skipped at construction; an empty caption raises ``BadRecordError`` on read.
  """

  def __init__(self, path: str | os.PathLike, *, caption_key: str = "caption"):
    super().__init__(f"ImageTextFolder({path})")
    self._root = require_path(path, "path")
    self._caption_key = caption_key
    groups: dict[str, dict[str, str]] = collections.defaultdict(dict)
    for directory, subdirs, files in os.walk(self._root):
      subdirs.sort()
      for file in files:
        key, suffix = _pair_key(os.path.relpath(os.path.join(directory, file), self._root))
        groups[key][suffix] = os.path.join(directory, file)
    for key in sorted(groups):
      files = groups[key]
      image = next((files[s] for s in IMAGE_EXTENSIONS if s in files), None)
      text_suffix = next((s for s in (".txt", ".json") if s in files), None)
      if image is None:
        if text_suffix is not None:
          self._skip("missing image", f"{key}: caption file without an image")
      elif text_suffix is None:
        self._skip("missing text", f"{image}: no {key}.txt or {key}.json next to it")
      else:
        self._entries.append((key, image, files[text_suffix], text_suffix))
    self._log_summary()

  def _read(self, entry) -> dict[str, Any]:
    key, image, text_file, suffix = entry
    caption = _caption_from(pathlib.Path(text_file).read_bytes(), suffix, self._caption_key,
                            text_file)
    return {"id": key, "chunks": [ImageRef(key=image, path=image), caption]}


class WebDatasetTars(RecordSource):
  """Image-text pairs in WebDataset tar shards (``key.jpg`` + ``key.txt``/``key.json`` members),
  the layout img2dataset writes for LAION / Conceptual Captions.

  The shards' member headers are indexed once at construction (offsets only, no payloads), so
  records are random access: a read seeks to the member in its shard. ``path`` is a shard
  path, a directory (all its ``*.tar``, sorted) or a list of those.
  """

  def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], *,
               caption_key: str = "caption"):
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
      raise ValueError("path: expected a tar path, a directory of tars or a list, got none")
    super().__init__(f"WebDatasetTars({paths[0]}{', ...' if len(paths) > 1 else ''})")
    self._caption_key = caption_key
    self._shards: list[str] = []
    for path in paths:
      path = require_path(path, "path")
      self._shards.extend(sorted(map(str, path.glob("*.tar"))) if path.is_dir() else [str(path)])
    for shard_index, shard in enumerate(self._shards):
      self._index_shard(shard_index, shard)
    self._log_summary()

  def _index_shard(self, shard_index: int, shard: str) -> None:
    groups: dict[str, dict[str, tuple[int, int, str]]] = collections.OrderedDict()
    cut: dict[str, str] = {}  # key -> its member that ends past the end of the shard
    shard_size = os.path.getsize(shard)
    try:
      with tarfile.open(shard, mode="r:") as tar:
        for member in tar:
          if member.isfile():
            key, suffix = _pair_key(member.name)
            groups.setdefault(key, {})[suffix] = (member.offset_data, member.size, member.name)
            if member.offset_data + member.size > shard_size:
              cut[key] = member.name
    except tarfile.TarError as e:
      self._skip("corrupt shard", f"{shard}: {e} (records indexed before the damage are kept)")
    for key, members in groups.items():
      image = next((members[s] for s in IMAGE_EXTENSIONS if s in members), None)
      text_suffix = next((s for s in (".txt", ".json") if s in members), None)
      if key in cut:  # a shard cut short (a copy or a writer that died): reads return a prefix
        self._skip("truncated member", f"{shard}::{cut[key]} ends past the end of the shard")
      elif image is None:
        self._skip("missing image", f"{shard}: {key} has no image member")
      elif text_suffix is None:
        self._skip("missing text", f"{shard}: {key} has no .txt or .json member")
      else:
        self._entries.append((shard_index, key, image, members[text_suffix], text_suffix))

  def _read(self, entry) -> dict[str, Any]:
    shard_index, key, (image_offset, image_size, image_name), text, suffix = entry
    shard = self._shards[shard_index]
    with open(shard, "rb") as f:
      f.seek(image_offset)
      data = f.read(image_size)
      f.seek(text[0])
      caption = _caption_from(f.read(text[1]), suffix, self._caption_key, f"{shard}::{text[2]}")
    return {"id": f"{os.path.basename(shard)}::{key}",
            "chunks": [ImageRef(key=f"{shard}::{image_name}", data=data), caption]}


def mmc4_chunks(doc: Mapping[str, Any], image_root: str | os.PathLike, *,
                similarity_threshold: float | None = None,
                present: Iterable[int] | None = None) -> list[str | ImageRef]:
  """An MMC4 document as an ordered chunk list: each kept image right before its sentence.

  As OpenFlamingo: images (those in ``present``, default all) are matched one-to-one to sentences
  by maximising CLIP similarity over ``similarity_matrix`` [images, sentences] (a linear
  assignment); an image whose matched similarity is below ``similarity_threshold`` is dropped.
  Documents without a similarity matrix fall back to their ``matched_text_index`` /
  ``matched_sim``. Sentences between two images are joined with spaces into one text chunk.
  """
  sentences = doc["text_list"]
  info = doc["image_info"]
  present = list(range(len(info)) if present is None else present)
  if "similarity_matrix" in doc and present:
    similarity = np.asarray(doc["similarity_matrix"], np.float64)[present]
    rows, cols = scipy.optimize.linear_sum_assignment(-similarity)
    matches = [(present[r], int(c), float(similarity[r, c])) for r, c in zip(rows, cols)]
  else:
    matches = [(i, int(info[i]["matched_text_index"]), float(info[i]["matched_sim"]))
               for i in present]
  image_at: dict[int, int] = {}
  for image, sentence, sim in sorted(matches):
    if (similarity_threshold is None or sim >= similarity_threshold) and sentence not in image_at:
      image_at[sentence] = image
  chunks: list[str | ImageRef] = []
  text: list[str] = []
  for index, sentence in enumerate(sentences):
    if index in image_at:
      if text:
        chunks.append(" ".join(text))
        text = []
      path = os.path.join(image_root, info[image_at[index]]["image_name"])
      chunks.append(ImageRef(key=path, path=path))
    text.append(sentence.strip())
  if text:
    chunks.append(" ".join(text))
  return chunks


class MMC4Documents(RecordSource):
  """Interleaved documents in MMC4's JSONL layout, images from a local folder.

  Each line holds ``text_list``, ``image_info`` (``image_name``, ``matched_text_index``,
  ``matched_sim``, ...) and ``similarity_matrix``. At construction every line is parsed once to
  validate it; images missing from ``image_root`` are dropped from their document, and a
  document left without text or without a matched image is skipped (all counted). The index keeps
  only file offsets, and a read re-parses its line and calls ``mmc4_chunks``.
  """

  def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike],
               image_root: str | os.PathLike, *, similarity_threshold: float | None = None):
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
      raise ValueError("path: expected a JSONL path, a directory of them or a list, got none")
    super().__init__(f"MMC4Documents({paths[0]}{', ...' if len(paths) > 1 else ''})")
    self._image_root = str(require_path(image_root, "image_root"))
    self._threshold = similarity_threshold
    self._files: list[str] = []
    for path in paths:
      path = require_path(path, "path")
      self._files.extend(sorted(map(str, path.glob("*.jsonl"))) if path.is_dir() else [str(path)])
    for file_index, file in enumerate(self._files):
      self._index_file(file_index, file)
    self._log_summary()

  def _index_file(self, file_index: int, file: str) -> None:
    offset = 0
    with open(file, "rb") as f:
      for line_number, line in enumerate(f, start=1):
        where = f"{file}:{line_number}"
        start, offset = offset, offset + len(line)
        if not line.strip():
          continue
        try:
          doc = json.loads(line)
          if not isinstance(doc["text_list"], list):
            raise TypeError("text_list is not a list")
          names = [entry["image_name"] for entry in doc["image_info"]]
          present = [i for i, name in enumerate(names)
                     if os.path.exists(os.path.join(self._image_root, name))]
          chunks = mmc4_chunks(doc, self._image_root, similarity_threshold=self._threshold,
                               present=present)
        except (ValueError, KeyError, TypeError, IndexError) as e:
          self._skip("malformed json", f"{where}: {type(e).__name__}: {e}")
          continue
        for name in sorted(set(names) - {names[i] for i in present}):
          self._skip("missing image", f"{where}: {name} not in {self._image_root}")
        if not any(isinstance(c, str) and c.strip() for c in chunks):
          self._skip("missing text", f"{where}: document has no text")
        elif not any(isinstance(c, ImageRef) for c in chunks):
          self._skip("no matched image", f"{where}: no image left (missing or below threshold)")
        else:
          self._entries.append((file_index, start, tuple(present)))

  def _read(self, entry) -> dict[str, Any]:
    file_index, offset, present = entry
    file = self._files[file_index]
    with open(file, "rb") as f:
      f.seek(offset)
      doc = json.loads(f.readline())
    chunks = mmc4_chunks(doc, self._image_root, similarity_threshold=self._threshold,
                         present=present)
    return {"id": f"{os.path.basename(file)}@{offset}", "chunks": chunks}


class CaptionPairs(RecordSource):
  """Training pairs from a captions benchmark source: record ``i`` is image ``i // n`` with its
  caption ``i % n`` (wrapping when an image has fewer), ``n = captions_per_image``.

  Lets COCO (Karpathy JSON or TFDS, five captions per image) train like LAION pairs without
  reading every record up front to count captions.
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], *, captions_per_image: int = 5):
    if captions_per_image < 1:
      raise ValueError(f"captions_per_image: expected >= 1, got {captions_per_image}")
    super().__init__(f"CaptionPairs({getattr(source, 'name', type(source).__name__)})")
    self._source = source
    self._n = captions_per_image
    self._entries = range(len(source) * captions_per_image)

  def _read(self, entry) -> dict[str, Any]:
    record = self._source[entry // self._n]
    captions = record["captions"]
    if not captions:
      raise BadRecordError(f"{self.name}: image {record['id']} has no captions",
                           reason="missing text")
    image = record["image"]
    ref = (ImageRef(key=f"{self.name}::{record['id']}", array=image)
           if isinstance(image, np.ndarray) else ImageRef(key=str(image), path=str(image)))
    return {"id": f"{record['id']}#{entry % self._n}",
            "chunks": [ref, captions[entry % self._n % len(captions)]]}


def _load_json(path: pathlib.Path, argument: str) -> Any:
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"{argument}: {str(path)!r} is not valid JSON ({e})") from e


class _BenchmarkSource(RecordSource):
  """A benchmark whose records are all parsed at construction; a record is kept when its image
  exists and its header is an image (``images.check_image_file``, no pixels read), else skipped
  and counted with the file's name."""

  def _add(self, record: dict[str, Any]) -> None:
    try:
      images.check_image_file(record["image"])
    except FileNotFoundError:
      self._skip("missing image", f"record {record['id']}: {record['image']} does not exist")
    except images.ImageError as e:
      self._skip("corrupt image", f"record {record['id']}: {e}")
    else:
      self._entries.append(record)


class KarpathyCaptions(_BenchmarkSource):
  """COCO or Flickr30K captions from the Karpathy split JSON (``dataset_coco.json`` /
  ``dataset_flickr30k.json``). Yields ``{"id", "image", "captions"}``.

  ``split``: one of the file's splits (``train``, ``restval``, ``val``, ``test``) or several.
  Image paths are ``image_root/filepath/filename`` (COCO) or ``image_root/filename`` (Flickr30K);
  ``id`` is ``cocoid`` for COCO and ``imgid`` otherwise.
  """

  SPLITS = ("train", "restval", "val", "test")

  def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike, *,
               split: str | Sequence[str]):
    super().__init__(f"KarpathyCaptions({annotation_file}, {split})")
    annotation = _load_json(require_path(annotation_file, "annotation_file"), "annotation_file")
    root = require_path(image_root, "image_root")
    splits = {split} if isinstance(split, str) else set(split)
    if not splits <= set(self.SPLITS):
      raise ValueError(f"split: expected some of {self.SPLITS}, got {sorted(splits)}")
    for entry in annotation["images"]:
      if entry["split"] not in splits:
        continue
      captions = [s["raw"].strip() for s in entry.get("sentences", []) if s.get("raw", "").strip()]
      record_id = entry.get("cocoid", entry.get("imgid"))
      if not captions:
        self._skip("missing text", f"image {record_id}: no sentences")
        continue
      image = root / entry.get("filepath", "") / entry["filename"]
      self._add({"id": record_id, "image": str(image), "captions": captions})
    self._log_summary()


class VqaQuestions(_BenchmarkSource):
  """VQAv2 or OK-VQA: the official questions JSON, optionally with its annotations JSON.

  Yields ``{"id": question_id, "image", "image_id", "question"}`` plus, with annotations,
  ``"answers"`` (the 10 human answers), ``"multiple_choice_answer"``, ``"question_type"`` and
  ``"answer_type"``. Images are COCO files ``image_root/COCO_<data_subtype>_<image_id:012d>.jpg``,
  ``data_subtype`` (e.g. ``val2014``) read from the questions file.
  """

  def __init__(self, questions_file: str | os.PathLike, image_root: str | os.PathLike,
               annotations_file: str | os.PathLike | None = None):
    super().__init__(f"VqaQuestions({questions_file})")
    questions = _load_json(require_path(questions_file, "questions_file"), "questions_file")
    root = require_path(image_root, "image_root")
    answers = {}
    if annotations_file is not None:
      annotations = _load_json(require_path(annotations_file, "annotations_file"),
                               "annotations_file")
      answers = {a["question_id"]: a for a in annotations["annotations"]}
    subtype = questions["data_subtype"]
    for q in questions["questions"]:
      record = {"id": q["question_id"], "image_id": q["image_id"], "question": q["question"],
                "image": str(root / f"COCO_{subtype}_{q['image_id']:012d}.jpg")}
      if annotations_file is not None:
        annotation = answers.get(q["question_id"])
        if annotation is None:
          self._skip("missing answers", f"question {q['question_id']} has no annotation")
          continue
        record.update(answers=[a["answer"] for a in annotation["answers"]],
                      multiple_choice_answer=annotation["multiple_choice_answer"],
                      question_type=annotation["question_type"],
                      answer_type=annotation["answer_type"])
      self._add(record)
    self._log_summary()


class TextVqa(_BenchmarkSource):
  """TextVQA's single JSON (``data[]``). Yields ``{"id": question_id, "image", "question",
  "answers"?}``; images are ``image_root/<image_id>.jpg``; the test split has no answers."""

  def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike):
    super().__init__(f"TextVqa({annotation_file})")
    annotation = _load_json(require_path(annotation_file, "annotation_file"), "annotation_file")
    root = require_path(image_root, "image_root")
    for entry in annotation["data"]:
      record = {"id": entry["question_id"], "image": str(root / f"{entry['image_id']}.jpg"),
                "question": entry["question"]}
      if "answers" in entry:
        record["answers"] = list(entry["answers"])
      self._add(record)
    self._log_summary()


class VizWiz(_BenchmarkSource):
  """VizWiz VQA: a JSON list of ``{image, question, answers[{answer, answer_confidence}],
  answerable}``. Yields ``{"id": image name, "image", "question", "answers"?, "answerable"?}``."""

  def __init__(self, annotation_file: str | os.PathLike, image_root: str | os.PathLike):
    super().__init__(f"VizWiz({annotation_file})")
    annotation = _load_json(require_path(annotation_file, "annotation_file"), "annotation_file")
    root = require_path(image_root, "image_root")
    for entry in annotation:
      record = {"id": entry["image"], "image": str(root / entry["image"]),
                "question": entry["question"]}
      if "answers" in entry:
        record["answers"] = [a["answer"] for a in entry["answers"]]
      if "answerable" in entry:
        record["answerable"] = int(entry["answerable"])
      self._add(record)
    self._log_summary()


class HatefulMemes(_BenchmarkSource):
  """Hateful Memes JSONL (``{id, img, label?, text}`` per line). Yields ``{"id", "image", "text",
  "label"?}``; ``img`` is relative to ``image_root`` (default: the JSONL's folder). Malformed
  lines are skipped and counted."""

  def __init__(self, jsonl_file: str | os.PathLike, image_root: str | os.PathLike | None = None):
    super().__init__(f"HatefulMemes({jsonl_file})")
    path = require_path(jsonl_file, "jsonl_file")
    root = path.parent if image_root is None else require_path(image_root, "image_root")
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
        record = {"id": entry["id"], "image": str(root / entry["img"]), "text": entry["text"]}
      except (ValueError, KeyError, TypeError) as e:
        self._skip("malformed json", f"{path}:{line_number}: {type(e).__name__}: {e}")
        continue
      if "label" in entry:
        record["label"] = int(entry["label"])
      self._add(record)
    self._log_summary()


def read_synset_mapping(path: str | os.PathLike) -> dict[str, str]:
  """ImageNet's ``LOC_synset_mapping.txt`` (``n01440764 tench, Tinca tinca`` per line) as an
  ordered ``{wnid: first name}``; its order is the standard class index."""
  mapping = {}
  for line in require_path(path, "path").read_text().splitlines():
    if line.strip():
      wnid, _, names = line.strip().partition(" ")
      mapping[wnid] = names.split(",")[0].strip()
  return mapping


class ImageClassFolders(_BenchmarkSource):
  """ImageNet-style classification: ``root/<class folder>/*.JPEG``. Yields ``{"id", "image",
  "label", "class_name"}``.

  ``class_names`` (folder -> readable name), or the ``synset_mapping`` file it is read from
  (``read_synset_mapping``), fixes the label index by its order; without it labels follow the
  sorted folder names. ``self.class_names`` is
  the list of readable names by label, what zero-shot classification scores.
  """

  def __init__(self, root: str | os.PathLike, *, class_names: Mapping[str, str] | None = None,
               synset_mapping: str | os.PathLike = ""):
    super().__init__(f"ImageClassFolders({root})")
    root = require_path(root, "root")
    if synset_mapping:
      if class_names is not None:
        raise ValueError("class_names and synset_mapping: give one, not both")
      class_names = read_synset_mapping(synset_mapping)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if class_names is None:
      class_names = {folder: folder for folder in folders}
    unknown = [folder for folder in folders if folder not in class_names]
    if unknown:
      raise ValueError(f"class_names: expected an entry for every class folder, missing "
                       f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    label_of = {folder: label for label, folder in enumerate(class_names)}
    self.class_names = list(class_names.values())
    for folder in folders:
      for file in sorted((root / folder).iterdir()):
        if file.suffix.lower() in IMAGE_EXTENSIONS:
          self._add({"id": f"{folder}/{file.name}", "image": str(file),
                     "label": label_of[folder], "class_name": class_names[folder]})
    self._log_summary()


class TfdsCocoCaptions(RecordSource):
  """COCO captions through TFDS (``coco_captions``, Karpathy splits ``train``/``val``/``test``/
  ``restval``), random access via ``tfds.data_source`` (array_record; no tf.data pipeline).

  Yields ``{"id": image/id, "image": uint8 [H, W, 3] (TFDS decodes), "captions"}``; wrap it in
  ``CaptionPairs`` to train on it. Building ``coco_captions`` needs TensorFlow installed.
  """

  def __init__(self, split: str, *, data_dir: str | os.PathLike | None = None,
               name: str = "coco_captions"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    super().__init__(f"TfdsCocoCaptions({name}, {split})")
    self._data = tfds.data_source(name, split=split,
                                  data_dir=None if data_dir is None else str(data_dir))
    self._entries = range(len(self._data))

  def _read(self, entry) -> dict[str, Any]:
    example = self._data[entry]
    captions = [t.decode() if isinstance(t, bytes) else str(t)
                for t in np.asarray(example["captions"]["text"]).tolist()]
    return {"id": int(example["image/id"]), "image": np.asarray(example["image"]),
            "captions": [c.strip() for c in captions if c.strip()]}


def _encode_record(record: Mapping[str, Any]) -> bytes:
  """A training record as bytes: an 8-byte header length, a JSON header (text chunks inline,
  images as ``{"image": key, "size": n}``), then the images' encoded bytes in order."""
  header, blobs = [], []
  for chunk in record["chunks"]:
    if isinstance(chunk, str):
      header.append(chunk)
      continue
    if chunk.array is not None:
      buffer = io.BytesIO()
      PIL.Image.fromarray(np.asarray(chunk.array, np.uint8)).save(buffer, format="PNG")
      blob = buffer.getvalue()
    else:
      blob = chunk.data if chunk.data is not None else pathlib.Path(chunk.path).read_bytes()
    header.append({"image": chunk.key, "size": len(blob)})
    blobs.append(blob)
  head = json.dumps({"id": record["id"], "chunks": header}).encode()
  return b"".join([len(head).to_bytes(8, "little"), head, *blobs])


def _decode_record(payload: bytes) -> dict[str, Any]:
  length = int.from_bytes(payload[:8], "little")
  header = json.loads(payload[8:8 + length])
  offset, chunks = 8 + length, []
  for chunk in header["chunks"]:
    if isinstance(chunk, str):
      chunks.append(chunk)
    else:
      chunks.append(ImageRef(key=chunk["image"], data=payload[offset:offset + chunk["size"]]))
      offset += chunk["size"]
  return {"id": header["id"], "chunks": chunks}


def write_array_record(source: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> int:
  """Writes a training-record source (images embedded) to one ``array_record`` file.

  Converting once pays the per-record cost of the local formats (small files, JSON parsing at
  construction) up front: ``ArrayRecordRecords`` then opens millions of records instantly and
  reads each with one seek. Records that fail to read are skipped and counted in a warning.
  Returns the number of records written.
  """
  skipped: collections.Counter = collections.Counter()
  name = f"write_array_record({path})"
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  written = 0
  try:
    for index in range(len(source)):
      try:
        payload = _encode_record(source[index])
      except (BadRecordError, OSError) as e:
        skip(skipped, name, getattr(e, "reason", "unreadable record"), f"record {index}: {e}")
        continue
      writer.write(payload)
      written += 1
  finally:
    writer.close()
  if skipped:
    _log.warning("%s: wrote %d records, skipped %s", name, written, dict(skipped))
  return written


class ArrayRecordRecords(RecordSource):
  """Training records from ``array_record`` files that ``write_array_record`` wrote, read with
  grain's ``ArrayRecordDataSource`` (random access, no TensorFlow). Images come back as encoded
  bytes with their original keys, so a feature cache built from the original source still
  applies."""

  def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike]):
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    super().__init__(f"ArrayRecordRecords({paths[0] if paths else None}"
                     f"{', ...' if len(paths) > 1 else ''})")
    if not paths:
      raise ValueError("path: expected an array_record path or a list of them, got none")
    self._data = grain.sources.ArrayRecordDataSource(
        [str(require_path(p, "path")) for p in paths])
    self._entries = range(len(self._data))

  def _read(self, entry) -> dict[str, Any]:
    return _decode_record(self._data[entry])
