"""Choosing the in-context demonstrations of a few-shot prompt: seeded random, or RICES.

Both selectors return ids from a pool of training examples and never return the query's own id,
so a query that also sits in the pool is never shown its own answer. A selector's choice for a
query depends only on its seed and the query's id, not on which queries came before, so an
evaluation that stopped half-way and resumes builds the very prompts it would have built.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Callable, Hashable, Sequence

import numpy as np


def _stable_hash(key: Hashable) -> int:
  """A 64-bit hash of ``repr(key)`` that, unlike ``hash``, is the same in every process."""
  return int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little")


class RandomDemonstrations:
  """Seeded random demonstrations from a pool of training ids (OpenFlamingo's protocol).

  The pool is first narrowed to a seeded random subset of ``subset_size`` ids (OpenFlamingo uses
  2,048 per seed), then each query draws ``k`` distinct ids from it with a generator seeded by
  ``(seed, query id)``. Trials are selectors with different seeds.
  """

  def __init__(self, pool_ids: Sequence[Hashable], *, seed: int, subset_size: int | None = None):
    if len(set(pool_ids)) != len(pool_ids):
      raise ValueError(f"pool_ids must be distinct, got {len(pool_ids)} ids of which "
                       f"{len(set(pool_ids))} are distinct")
    if subset_size is not None and not 0 < subset_size <= len(pool_ids):
      raise ValueError(f"subset_size must be in [1, {len(pool_ids)}] (the pool size), "
                       f"got {subset_size}")
    self.seed = seed
    pool = list(pool_ids)
    if subset_size is not None:
      order = np.random.default_rng(seed).permutation(len(pool))[:subset_size]
      pool = [pool[i] for i in np.sort(order)]
    self.pool_ids = pool
    self._position = {key: i for i, key in enumerate(pool)}

  def __call__(self, query_id: Hashable, k: int) -> list:
    """``k`` distinct pool ids, none of them ``query_id``, in a seeded random order."""
    own = self._position.get(query_id)
    available = len(self.pool_ids) - (own is not None)
    if not 0 <= k <= available:
      raise ValueError(f"k must be in [0, {available}] (the pool less the query itself), got {k}")
    rng = np.random.default_rng([self.seed, _stable_hash(query_id)])
    picks = rng.choice(available, size=k, replace=False)
    if own is not None:
      picks = picks + (picks >= own)  # skip over the query's own position
    return [self.pool_ids[i] for i in picks]


def cached_features(items: Sequence, feature_fn: Callable[[Sequence], np.ndarray], *, name: str,
                    cache_dir: str | os.PathLike, batch_size: int = 64) -> np.ndarray:
  """``feature_fn`` applied to ``items`` in batches, cached as ``<cache_dir>/<name>.npy``.

  Features of a dataset split are computed once (a vision tower over tens of thousands of images)
  and reused by every shot count and trial. The name is the cache key: give each (split, feature
  model) its own. A cache holding a different number of rows than ``items`` is an error, not
  silently reused.

  Args:
    items: what ``feature_fn`` takes, e.g. images or their paths.
    feature_fn: maps a batch of items to ``[batch, D]`` features.
    name: the cache file's name, without ``.npy``.
    cache_dir: the folder of cache files, created if missing.
    batch_size: items per ``feature_fn`` call.

  Returns:
    ``[len(items), D]`` float32 features.
  """
  path = pathlib.Path(cache_dir) / f"{name}.npy"
  if path.exists():
    features = np.load(path)
    if features.shape[0] != len(items):
      raise ValueError(f"cached features {str(path)!r} have {features.shape[0]} rows but "
                       f"{len(items)} items were given: delete the file or choose another name")
    return features
  batches = [np.asarray(feature_fn(items[i:i + batch_size]), dtype=np.float32)
             for i in range(0, len(items), batch_size)]
  features = np.concatenate(batches, axis=0)
  if features.ndim != 2 or features.shape[0] != len(items):
    raise ValueError(f"feature_fn must return [batch, D] features, one row per item; got "
                     f"{features.shape} for {len(items)} items")
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(".npy.partial")
  with open(partial, "wb") as f:
    np.save(f, features)
  os.replace(partial, path)  # a crash mid-write leaves no truncated cache behind
  return features


class RICES:
  """Retrieval-based In-Context Example Selection (Yang et al. 2022; Flamingo, appendix).

  The demonstrations for a query are the pool examples whose vision features have the highest
  cosine similarity with the query's, ordered so the MOST similar comes LAST, right before the
  query, where it helps the model most (as Flamingo and OpenFlamingo order them).
  """

  def __init__(self, pool_ids: Sequence[Hashable], pool_features: np.ndarray):
    pool_features = np.asarray(pool_features, dtype=np.float32)
    if pool_features.ndim != 2 or pool_features.shape[0] != len(pool_ids):
      raise ValueError(f"pool_features must be [len(pool_ids)={len(pool_ids)}, D], "
                       f"got {pool_features.shape}")
    self.pool_ids = list(pool_ids)
    self._features = _unit_rows(pool_features, "pool_features")  # [N, D]

  def __call__(self, query_features: np.ndarray, k: int,
               query_ids: Sequence[Hashable] | None = None) -> list[list]:
    """The ``k`` demonstrations of each query, least similar first.

    Args:
      query_features: ``[B, D]`` features of the queries, from the pool's feature function.
      k: demonstrations per query.
      query_ids: the queries' ids; a pool example with the query's own id is never chosen.

    Returns:
      For each query, ``k`` pool ids ordered by increasing similarity.
    """
    queries = _unit_rows(np.asarray(query_features, dtype=np.float32), "query_features")
    if queries.shape[1] != self._features.shape[1]:
      raise ValueError(f"query_features must be [B, {self._features.shape[1]}] like the pool, "
                       f"got {queries.shape}")
    if query_ids is not None and len(query_ids) != len(queries):
      raise ValueError(f"query_ids must have one id per query row ({len(queries)}), "
                       f"got {len(query_ids)}")
    limit = len(self.pool_ids) - (query_ids is not None)
    if not 0 <= k <= limit:
      raise ValueError(f"k must be in [0, {limit}] (the pool size, less the query itself when "
                       f"query_ids are given), got {k}")
    similarity = queries @ self._features.T  # [B, N]
    if query_ids is not None:
      position = {key: i for i, key in enumerate(self.pool_ids)}
      for row, key in enumerate(query_ids):
        if key in position:
          similarity[row, position[key]] = -np.inf
    # Most similar first, ties to the lower pool index; then reversed so the best comes last.
    order = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return [[self.pool_ids[i] for i in row[::-1]] for row in order]


def _unit_rows(features: np.ndarray, name: str) -> np.ndarray:
  """Rows scaled to unit length, so dot products are cosine similarities."""
  if features.ndim != 2:
    raise ValueError(f"{name} must be [rows, D], got shape {features.shape}")
  norms = np.linalg.norm(features, axis=1, keepdims=True)
  if np.any(norms == 0) or not np.all(np.isfinite(norms)):
    raise ValueError(f"{name} has rows of zero or non-finite length: cosine similarity needs "
                     "non-zero finite features")
  return features / norms
