"""Demonstration selection: seeded random draws and RICES with hand-built features."""

import numpy as np
import pytest

from xattn_vlm.eval import demos


def test_random_demonstrations_are_seeded_distinct_and_never_the_query():
  pool = [f"train{i}" for i in range(10)]
  selector = demos.RandomDemonstrations(pool, seed=0)
  for query in pool:
    for _ in range(3):
      picks = selector(query, 9)  # all but one of the pool: only the query itself is missing
      assert sorted(picks) == sorted(set(pool) - {query})
  # The same (seed, query) gives the same draw, whatever was asked before and in a new selector.
  assert selector("val3", 4) == demos.RandomDemonstrations(pool, seed=0)("val3", 4)
  # Different seeds (trials) give different draws.
  draws = {tuple(demos.RandomDemonstrations(pool, seed=s)("val3", 4)) for s in range(5)}
  assert len(draws) > 1
  with pytest.raises(ValueError, match=r"k must be in \[0, 9\]"):
    selector("train0", 10)


def test_random_demonstrations_subset():
  pool = list(range(100))
  selector = demos.RandomDemonstrations(pool, seed=1, subset_size=8)
  assert len(selector.pool_ids) == 8 and set(selector.pool_ids) <= set(pool)
  assert set(selector(1000, 8)) == set(selector.pool_ids)
  assert selector.pool_ids == demos.RandomDemonstrations(pool, seed=1, subset_size=8).pool_ids
  with pytest.raises(ValueError, match="subset_size"):
    demos.RandomDemonstrations(pool, seed=1, subset_size=101)
  with pytest.raises(ValueError, match="distinct"):
    demos.RandomDemonstrations([1, 1], seed=1)


def test_rices_picks_most_similar_and_puts_the_most_similar_last():
  query = np.array([1.0, 0.0, 0.0])
  # Cosine similarities to the query: a 1.0, b 0.8, c 0.6, d 0.0, e -1.0 (lengths do not matter).
  pool = {"d": [0.0, 5.0, 0.0], "b": [0.8, 0.6, 0.0], "e": [-2.0, 0.0, 0.0],
          "a": [3.0, 0.0, 0.0], "c": [0.6, 0.0, 0.8]}
  rices = demos.RICES(list(pool), np.array(list(pool.values())))
  assert rices(query[None], 3) == [["c", "b", "a"]]
  assert rices(query[None], 1) == [["a"]]
  # Batched: the second query is closest to d. A query that is itself in the pool (its id given)
  # never gets itself: "a" is skipped and b becomes the most similar.
  queries = np.stack([query, [0.0, 1.0, 0.1]])
  assert rices(queries, 2, query_ids=["a", "q2"]) == [["c", "b"], ["b", "d"]]
  with pytest.raises(ValueError, match=r"\[B, 3\]"):
    rices(np.ones((1, 4)), 2)
  with pytest.raises(ValueError, match="non-zero"):
    rices(np.zeros((1, 3)), 2)


def test_cached_features_computes_once_and_reloads(tmp_path):
  calls = []

  def feature_fn(batch):
    calls.append(list(batch))
    return np.array([[float(x), 1.0] for x in batch])

  items = list(range(5))
  first = demos.cached_features(items, feature_fn, name="coco_train", cache_dir=tmp_path,
                                batch_size=2)
  assert calls == [[0, 1], [2, 3], [4]]
  assert (tmp_path / "coco_train.npy").exists() and first.dtype == np.float32
  again = demos.cached_features(items, feature_fn, name="coco_train", cache_dir=tmp_path)
  assert len(calls) == 3 and np.array_equal(first, again)
  with pytest.raises(ValueError, match="5 rows but 3 items"):
    demos.cached_features(items[:3], feature_fn, name="coco_train", cache_dir=tmp_path)
