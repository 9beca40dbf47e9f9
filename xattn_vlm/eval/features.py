"""The vision tower's features of every image an evaluation shows, computed once.

Every query, trial and shot count of an evaluation shows the same pool images again as
demonstrations; the frozen tower's output for an image never changes, so ``VisionFeatureCache``
runs the tower once per image and hands its features ([P, D]) to every prompt that shows it (the
prefill then runs the resampler and the LM only). With a directory the features also persist
between evaluations, one ``.npy`` file per image, under a ``tower.json`` that names the tower's
identity: a digest of its parameters, its config and the image preprocessing. A directory written
for another identity is refused, as is an entry whose image file has changed since it was written
(stale); both errors name the directory and what differs.

Images are known by their path (with the file's size and modification time, to tell a changed
file) or, for arrays and other in-memory images, by a digest of their bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from xattn_vlm.data import images as images_lib
from xattn_vlm.inference.model import InferenceModel, StaticGraph
from xattn_vlm.inference.processor import ImageLike, Processor

TOWER_FILE = "tower.json"
ENTRIES_FILE = "entries.jsonl"


@functools.partial(jax.jit, static_argnames=("graph",))
def _tower(graph: StaticGraph, params: nnx.State, pixels: jax.Array) -> jax.Array:
  """[N, H, W, C] pixels -> the tower's features [N, P, D], as ``Flamingo.encode_media`` runs it."""
  return graph.merge(params).vision(pixels)


def tower_identity(model: InferenceModel, processor: Processor) -> dict[str, Any]:
  """What decides the features of an image: the tower's parameters (a SHA-256 digest), its config,
  the compute dtype and the processor's preprocessing."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(model.params["vision"])[0]:
    array = np.asarray(jax.device_get(leaf))
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str((array.shape, array.dtype)).encode())
    digest.update(array.tobytes())
  return {
      "parameters_sha256": digest.hexdigest(),
      "vision": json.loads(model.config.vision.to_json_best_effort()),
      "dtype": str(model.config.dtype),
      "preprocessing": {"image_size": processor.image_size, "mean": list(processor.image_mean),
                        "std": list(processor.image_std), "mode": processor.image_mode},
  }


def _image_key(source: ImageLike) -> tuple[str, str | None]:
  """(key, stamp): a file by its resolved path and (size, mtime); anything else by a digest."""
  if isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source).resolve()
    stat = path.stat()
    return f"file:{path}", f"{stat.st_size}:{stat.st_mtime_ns}"
  if isinstance(source, np.ndarray):
    data = np.ascontiguousarray(source)
    digest = hashlib.sha256(str((data.shape, data.dtype)).encode() + data.tobytes())
  elif isinstance(source, bytes):
    digest = hashlib.sha256(source)
  else:  # a PIL image
    digest = hashlib.sha256(str((source.mode, source.size)).encode() + source.tobytes())
  return f"sha256:{digest.hexdigest()}", None


@dataclasses.dataclass
class _Entry:
  features: np.ndarray | None
  stamp: str | None
  file: str | None = None


class VisionFeatureCache:
  """The tower's features of images, each computed once; a callable for ``Processor(...,
  vision_features=...)``.

  Args:
    model: the ``InferenceModel`` whose tower runs.
    processor: the model's processor (its preprocessing reads the images).
    directory: where features persist between evaluations (None: in memory only).
    batch_size: images per tower call (the last call is padded, so one program serves all).
  """

  def __init__(self, model: InferenceModel, processor: Processor,
               directory: str | os.PathLike | None = None, batch_size: int = 16):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model, self.processor, self.batch_size = model, processor, batch_size
    self.identity = tower_identity(model, processor)
    self.directory = None if directory is None else pathlib.Path(directory)
    self._entries: dict[str, _Entry] = {}
    self.computed = 0  # images run through the tower by this cache
    if self.directory is not None:
      self._open_directory()

  def _open_directory(self) -> None:
    tower_file = self.directory / TOWER_FILE
    if tower_file.exists():
      saved = json.loads(tower_file.read_text())
      different = sorted(k for k in set(saved) | set(self.identity)
                         if saved.get(k) != self.identity.get(k))
      if different:
        raise ValueError(
            f"vision feature cache {str(self.directory)!r} was built by another vision tower "
            f"(its {', '.join(different)} differ from this model's): delete it or give another "
            "directory")
    else:
      self.directory.mkdir(parents=True, exist_ok=True)
      partial = tower_file.with_suffix(".json.partial")
      partial.write_text(json.dumps(self.identity, indent=1))
      os.replace(partial, tower_file)
    entries = self.directory / ENTRIES_FILE
    if entries.exists():
      for line in entries.read_text().splitlines():
        if line.strip():
          record = json.loads(line)
          self._entries[record["key"]] = _Entry(None, record["stamp"], record["file"])

  def __call__(self, sources: Sequence[ImageLike]) -> np.ndarray:
    """Features [len(sources), P, D] float32, in order (computing the missing ones)."""
    keys = self.precompute(sources)
    return np.stack([self._features(key) for key, _ in keys]) if keys else np.zeros(
        (0,) + self.feature_shape, np.float32)

  def precompute(self, sources: Sequence[ImageLike]) -> list[tuple[str, str | None]]:
    """Computes the features of those of ``sources`` not cached yet, in full batches (call it
    with every image about to be shown: one prompt's few images would make part-empty batches);
    returns their keys."""
    keys = [_image_key(source) for source in sources]
    missing = {}
    for source, (key, stamp) in zip(sources, keys):
      entry = self._entries.get(key)
      if entry is not None and entry.stamp != stamp:
        raise ValueError(f"vision feature cache {str(self.directory)!r} is stale: image "
                         f"{key.removeprefix('file:')} changed since its features were cached "
                         f"(size:mtime {entry.stamp}, now {stamp}); delete the cache")
      if entry is None and key not in missing:
        missing[key] = (source, stamp)
    self._compute(missing)
    return keys

  @functools.cached_property
  def feature_shape(self) -> tuple[int, ...]:
    size = self.processor.image_size
    abstract = jax.eval_shape(_tower, self.model.graph, self.model.params,
                              jax.ShapeDtypeStruct((1, size, size, 3), np.float32))
    return tuple(abstract.shape[1:])

  def _features(self, key: str) -> np.ndarray:
    entry = self._entries[key]
    if entry.features is None:
      entry.features = np.load(self.directory / entry.file)
    return entry.features

  def _compute(self, missing: dict[str, tuple[ImageLike, str | None]]) -> None:
    items = list(missing.items())
    p = self.processor
    for start in range(0, len(items), self.batch_size):
      chunk = items[start:start + self.batch_size]
      pixels = np.zeros((self.batch_size, p.image_size, p.image_size, 3), np.float32)
      for i, (_, (source, _)) in enumerate(chunk):
        pixels[i] = images_lib.preprocess_image(source, size=p.image_size, mean=p.image_mean,
                                                std=p.image_std, mode=p.image_mode)
      features = np.asarray(jax.device_get(_tower(self.model.graph, self.model.params, pixels)),
                            np.float32)
      self.computed += len(chunk)
      records = []
      for i, (key, (_, stamp)) in enumerate(chunk):
        entry = _Entry(features[i], stamp)
        if self.directory is not None:
          entry.file = hashlib.sha256(key.encode()).hexdigest()[:32] + ".npy"
          np.save(self.directory / entry.file, features[i])
          records.append(json.dumps({"key": key, "stamp": stamp, "file": entry.file}))
        self._entries[key] = entry
      if records:  # entries are listed only after their files are complete
        with open(self.directory / ENTRIES_FILE, "a", encoding="utf-8") as f:
          f.write("".join(line + "\n" for line in records))
