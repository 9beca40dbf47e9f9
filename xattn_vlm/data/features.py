"""A disk cache of frozen vision features, so training can skip the vision tower.

The vision encoder is frozen, so its output for an image never changes: ``build_feature_cache``
runs it once per unique image (keyed by ``ImageRef.key``) and stores the features in ``.npy``
shards with a JSON index; ``FeatureCache`` reads them back memory-mapped; and
``CachedFeaturesTransform`` makes the same examples as ``pipeline.ExampleTransform`` but with
``features`` [max_images, 1, P, D] in place of ``images``. The encoder is any callable
``images [N, H, W, C] -> features [N, P, D]``; this module never imports the model package.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from xattn_vlm.data import images as images_lib
from xattn_vlm.data import pipeline
from xattn_vlm.data import sequence
from xattn_vlm.data import sources

_INDEX = "index.json"


class FeatureCache:
  """Features by image key, read from a directory ``build_feature_cache`` wrote.

  ``cache[key]`` is the encoder's output for that image, ``[P, D]``. Shards are memory-mapped on
  first use in each process, so the cache pickles cheaply into pipeline workers.
  """

  def __init__(self, directory: str | os.PathLike):
    self.directory = sources.require_path(directory, "directory")
    index_file = self.directory / _INDEX
    if not index_file.exists():
      raise FileNotFoundError(f"directory: expected a feature cache with {_INDEX}, got "
                              f"{str(self.directory)!r} without one (build it first)")
    index = json.loads(index_file.read_text())
    self.shape = tuple(index["shape"])
    # What built the features (``build_feature_cache``'s ``encoder``); None for caches written
    # before the index recorded it.
    self.encoder: dict[str, Any] | None = index.get("encoder")
    self._shards: list[str] = index["shards"]
    self._rows: dict[str, tuple[int, int]] = {k: tuple(v) for k, v in index["rows"].items()}
    self._arrays: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._rows)

  def __contains__(self, key: str) -> bool:
    return key in self._rows

  def __getitem__(self, key: str) -> np.ndarray:
    shard, row = self._rows[key]
    if shard not in self._arrays:
      self._arrays[shard] = np.load(self.directory / self._shards[shard], mmap_mode="r")
    return np.asarray(self._arrays[shard][row])

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_arrays": {}}


def build_feature_cache(directory: str | os.PathLike, images: Iterable[tuple[str, np.ndarray]],
                        encode: Callable[[np.ndarray], Any], *, batch_size: int = 32,
                        shard_size: int = 1024, dtype: Any = np.float32,
                        encoder: dict[str, Any] | None = None) -> FeatureCache:
  """Encodes each unique image once and writes the features under ``directory``.

  Args:
    directory: where the shards and index go (created; must not hold a cache already).
    images: ``(key, pixels [H, W, C])`` pairs, already preprocessed for the tower (see
      ``unique_images``); a repeated key is encoded once.
    encode: the frozen tower, ``[N, H, W, C] -> [N, P, D]``. Every call gets exactly
      ``batch_size`` images (the last batch is padded by repeating its last image), so a jitted
      encoder compiles once.
    batch_size: images per ``encode`` call.
    shard_size: images per ``.npy`` shard.
    dtype: storage dtype of the features.
    encoder: a JSON-able description of the tower (which weights), kept in the index as
      ``FeatureCache.encoder`` so a reader can check the cache against the tower it expects.
  """
  directory = pathlib.Path(directory)
  if (directory / _INDEX).exists():
    raise FileExistsError(f"directory: expected a new cache location, got {str(directory)!r} "
                          "which already holds a feature cache")
  directory.mkdir(parents=True, exist_ok=True)
  rows: dict[str, tuple[int, int]] = {}
  shards: list[str] = []
  pending: list[np.ndarray] = []
  shape: tuple[int, ...] | None = None

  def flush():
    shards.append(f"features-{len(shards):05d}.npy")
    np.save(directory / shards[-1], np.stack(pending).astype(dtype))
    pending.clear()

  for keys, pixels in _batches(images, batch_size):
    features = np.asarray(encode(pixels))
    if features.ndim != 3 or features.shape[0] != batch_size:
      raise ValueError(f"encode: expected features [N={batch_size}, P, D], got shape "
                       f"{features.shape} for images {pixels.shape}")
    shape = features.shape[1:]
    for key, feature in zip(keys, features):
      rows[key] = (len(shards), len(pending))
      pending.append(feature)
      if len(pending) == shard_size:
        flush()
  if pending:
    flush()
  if shape is None:
    raise ValueError("images: expected at least one image to encode, got none")
  (directory / _INDEX).write_text(json.dumps({"shape": shape, "shards": shards, "rows": rows,
                                              "encoder": encoder}))
  return FeatureCache(directory)


def _batches(images: Iterable[tuple[str, np.ndarray]],
             batch_size: int) -> Iterator[tuple[list[str], np.ndarray]]:
  """Unique-key batches of exactly ``batch_size`` images; the keys list is shorter when the last
  batch is padded."""
  seen: set[str] = set()
  keys: list[str] = []
  pixels: list[np.ndarray] = []
  for key, image in images:
    if key in seen:
      continue
    seen.add(key)
    keys.append(key)
    pixels.append(image)
    if len(keys) == batch_size:
      yield keys, np.stack(pixels)
      keys, pixels = [], []
  if keys:
    yield keys, np.stack(pixels + [pixels[-1]] * (batch_size - len(pixels)))


def unique_images(source: Sequence[dict[str, Any]],
                  preprocess: Callable[[sources.ImageRef], np.ndarray], *,
                  skipped: collections.Counter | None = None
                  ) -> Iterator[tuple[str, np.ndarray]]:
  """``(key, preprocess(ref))`` for each distinct image of a training-record source, in order.

  ``preprocess`` is usually ``pipeline.ExampleTransform(...).preprocess`` so the cached features
  match what training would have encoded. Unreadable images are skipped and counted in
  ``skipped`` (reason -> count).
  """
  skipped = collections.Counter() if skipped is None else skipped
  name = f"unique_images({getattr(source, 'name', type(source).__name__)})"
  seen: set[str] = set()
  for index in range(len(source)):
    try:
      refs = [c for c in source[index]["chunks"] if isinstance(c, sources.ImageRef)]
    except (sources.BadRecordError, OSError) as e:
      sources.skip(skipped, name, getattr(e, "reason", "unreadable record"), f"record {index}: {e}")
      continue
    for ref in refs:
      if ref.key in seen:
        continue
      seen.add(ref.key)
      try:
        yield ref.key, preprocess(ref)
      except (images_lib.ImageError, OSError) as e:
        sources.skip(skipped, name, "unreadable image", f"{ref.key}: {type(e).__name__}: {e}")


class CachedFeaturesTransform:
  """A training record -> an example with cached ``features`` [max_images, 1, P, D] (float32)
  instead of ``images``; the tokens, labels and masks are ``build_example``'s, as without the
  cache. An image missing from the cache raises ``BadRecordError`` (skipped, counted)."""

  def __init__(self, tokenizer, cache: FeatureCache, *, max_tokens: int, max_images: int,
               supervise: str = "all", media_tokens: int = 1):
    self.tokenizer = tokenizer
    self.media_tokens = media_tokens
    self.cache = cache
    self.max_tokens = max_tokens
    self.max_images = max_images
    self.supervise = supervise

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    chunks: list[Any] = []
    features: list[np.ndarray] = []
    for chunk in record["chunks"]:
      if isinstance(chunk, str):
        chunks.append(chunk)
        continue
      if chunk.key not in self.cache:
        raise sources.BadRecordError(f"record {record.get('id')!r}: image {chunk.key!r} is not in "
                                     f"the feature cache {self.cache.directory}",
                                     reason="uncached image")
      features.append(self.cache[chunk.key])
      # build_example only needs to know an image sits here; the pixels are never used.
      chunks.append(np.zeros((1, 1, 1, 1), np.float32))
    pipeline.require_text(chunks, record.get("id"))
    example = sequence.build_example(chunks, self.tokenizer, max_tokens=self.max_tokens,
                                     max_images=self.max_images, image_shape=(1, 1, 1, 1),
                                     supervise=self.supervise, media_tokens=self.media_tokens)
    del example["images"]
    stacked = np.zeros((self.max_images, 1, *self.cache.shape), np.float32)
    count = int(example["num_images"])
    if count:
      stacked[:count, 0] = np.stack(features[:count])
    example["features"] = stacked
    return example
