"""grain pipelines: resumable in a fresh process, per-host slices of the global batch, per-epoch
shuffling, whole batches prefetched, bad records skipped and counted, worker-count independence,
mixture composition."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import grain
import numpy as np
import PIL.Image
import pytest

from xattn_vlm.data import default_tokenizer
from xattn_vlm.data.shapes import records as shapes_records
from xattn_vlm.data import pipeline
from xattn_vlm.data import sources

from helpers import CLIP_MEAN, CLIP_STD, REPO, folder_pipeline, write_pairs

def index_example(record):
  return {"index": np.asarray(record["index"], np.int32)}


def index_source(size: int, offset: int = 0) -> list:
  return [{"index": offset + i} for i in range(size)]


_RESUME_SCRIPT = """
import sys
import grain, numpy as np, orbax.checkpoint as ocp
sys.path.insert(0, {tests!r})
import helpers
folder, checkpoints, out, steps = sys.argv[1:]
iterator = helpers.folder_pipeline(folder)
manager = ocp.CheckpointManager(checkpoints)
manager.restore(manager.latest_step(),
                args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(iterator)))
batches = [next(iterator) for _ in range(int(steps))]
np.savez(out, skipped=repr(sorted(iterator.skipped.items())),
         **{{f"{{i}}/{{k}}": v for i, b in enumerate(batches) for k, v in b.items()}})
"""


def test_resume_in_a_fresh_process_yields_the_uninterrupted_batches(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  write_pairs(tmp_path / "pairs", 9)  # 9 good records: epochs end mid-batch
  iterator = folder_pipeline(tmp_path / "pairs")
  for _ in range(3):
    next(iterator)
  manager = ocp.CheckpointManager(tmp_path / "checkpoints")
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = [next(iterator) for _ in range(4)]

  env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, "-c", _RESUME_SCRIPT.format(tests=str(REPO / "tests")),
                  str(tmp_path / "pairs"), str(tmp_path / "checkpoints"),
                  str(tmp_path / "resumed.npz"), "4"], check=True, env=env, timeout=120)

  resumed = np.load(tmp_path / "resumed.npz")
  assert str(resumed["skipped"]) == repr(sorted(iterator.skipped.items()))
  assert set(iterator.skipped) == {"corrupt image", "missing text"}
  assert expected[0]["images"].shape == (4, 1, 1, 8, 8, 3)
  for i, batch in enumerate(expected):
    assert batch["input_ids"].shape == (4, 12) and batch["media_mask"].all()
    for key, value in batch.items():
      np.testing.assert_array_equal(resumed[f"{i}/{key}"], value, err_msg=f"batch {i} {key}")


def test_host_slices_are_disjoint_and_concatenate_to_the_global_batch():
  source = index_source(10)  # 10 records, global batch 4: batches straddle epochs
  one = pipeline.batch_iterator(source, index_example, batch_size=4, seed=3, process_index=0,
                                process_count=1)
  hosts = [pipeline.batch_iterator(source, index_example, batch_size=4, seed=3,
                                   process_index=p, process_count=2) for p in range(2)]

  for _ in range(6):
    global_batch = next(one)["index"]
    host0, host1 = (next(h)["index"] for h in hosts)
    assert host0.shape == host1.shape == (2,)
    assert not set(host0) & set(host1)
    np.testing.assert_array_equal(np.concatenate([host0, host1]), global_batch)


def test_each_epoch_is_a_fresh_seeded_permutation():
  def epochs(seed):
    iterator = pipeline.batch_iterator(index_source(8), index_example, batch_size=4, seed=seed,
                                       process_index=0, process_count=1)
    return [np.concatenate([next(iterator)["index"] for _ in range(2)]) for _ in range(2)]

  first, second = epochs(seed=0)
  assert sorted(first) == sorted(second) == list(range(8))
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(np.concatenate(epochs(seed=0)), np.concatenate([first, second]))
  assert not np.array_equal(np.concatenate(epochs(seed=1)), np.concatenate([first, second]))


def test_bad_records_are_skipped_counted_and_never_batched(tmp_path):
  write_pairs(tmp_path / "pairs", 5)
  (tmp_path / "pairs" / "005.jpg").write_bytes((tmp_path / "pairs" / "000.jpg").read_bytes())
  (tmp_path / "pairs" / "005.txt").write_text("an <image> inside a caption")
  (tmp_path / "pairs" / "006.jpg").write_bytes((tmp_path / "pairs" / "000.jpg").read_bytes())
  (tmp_path / "pairs" / "006.txt").write_text("deleted after indexing")
  iterator = folder_pipeline(tmp_path / "pairs", batch_size=3, shuffle=False, num_epochs=1)
  (tmp_path / "pairs" / "006.jpg").unlink()
  tok = default_tokenizer()

  batches = list(iterator)  # 9 records, 4 bad: one full batch of 3, then 2 left over

  assert len(batches) == 1 and batches[0]["input_ids"].shape == (3, 12)
  assert dict(iterator.skipped) == {"corrupt image": 1, "missing text": 1,
                                    "special token in text": 1, "missing file": 1}
  texts = [tok.decode([t for t in ids if t < tok.media_token_id]) for ids in
           np.where(batches[0]["attention_mask"] == 1, batches[0]["input_ids"], 0)]
  assert all("red circle number" in t for t in texts)


def test_worker_processes_give_the_same_batches_and_share_the_state():
  source = shapes_records.ShapesWorld("interleaved", num_records=12, image_size=8, max_images=2)
  transform = pipeline.ExampleTransform(default_tokenizer(), max_tokens=24,
                                        max_images=2, image_size=8, mean=CLIP_MEAN, std=CLIP_STD)
  kwargs = dict(batch_size=4, seed=1, process_index=0, process_count=1)
  in_process = pipeline.batch_iterator(source, transform, **kwargs)
  next(in_process)
  state = in_process.get_state()
  expected = [next(in_process) for _ in range(3)]

  workers = pipeline.batch_iterator(source, transform, num_workers=2, **kwargs)
  try:
    workers.set_state(state)
    got = [next(workers) for _ in range(3)]
  finally:
    workers.close()

  for want, have in zip(expected, got):
    for key in want:
      np.testing.assert_array_equal(have[key], want[key], err_msg=key)


def test_mixture_yields_one_batch_per_dataset_with_its_size_and_weight():
  components = {
      "mmc4": pipeline.Component(index_source(20), index_example, batch_size=2, weight=1.0),
      "laion": pipeline.Component(index_source(30, offset=1000), index_example, batch_size=4,
                                  weight=0.2)}
  mixture = pipeline.mixture_iterator(components, seed=0, process_index=0, process_count=1)

  assert mixture.weights == {"mmc4": 1.0, "laion": 0.2}
  steps = [next(mixture) for _ in range(3)]
  for step in steps:
    assert set(step) == {"mmc4", "laion"}
    assert step["mmc4"]["index"].shape == (2,) and step["laion"]["index"].shape == (4,)
    assert (step["mmc4"]["index"] < 1000).all() and (step["laion"]["index"] >= 1000).all()
  # Each component keeps its own order: the same as a lone pipeline with the component's seed.
  alone = pipeline.batch_iterator(index_source(20), index_example, batch_size=2,
                                  seed=pipeline.component_seed(0, "mmc4"), process_index=0,
                                  process_count=1)
  for step in steps:
    np.testing.assert_array_equal(step["mmc4"]["index"], next(alone)["index"])

  state = json.loads(json.dumps(mixture.get_state()))
  expected = next(mixture)
  resumed = pipeline.mixture_iterator(components, seed=0, process_index=0, process_count=1)
  resumed.set_state(state)
  got = next(resumed)
  for name in components:
    np.testing.assert_array_equal(got[name]["index"], expected[name]["index"])
  assert mixture.skipped == {"mmc4": {}, "laion": {}}


class CountingTransform:
  """``index_example`` that counts its calls (from grain's read threads)."""

  def __init__(self):
    self.calls = 0
    self._lock = threading.Lock()

  def __call__(self, record):
    with self._lock:
      self.calls += 1
    return index_example(record)


@pytest.mark.parametrize("prefetch_batches", [0, 2])
def test_read_threads_work_whole_batches_ahead_and_no_further(prefetch_batches):
  transform = CountingTransform()
  iterator = pipeline.batch_iterator(index_source(1000), transform, batch_size=16, seed=0,
                                     process_index=0, process_count=1,
                                     prefetch_batches=prefetch_batches)
  next(iterator)
  expected = 16 * (1 + prefetch_batches)
  deadline = time.monotonic() + 30
  while transform.calls < expected and time.monotonic() < deadline:
    time.sleep(0.01)
  time.sleep(0.2)  # time to overshoot, were the buffer unbounded
  assert transform.calls == expected
  iterator.close()


def test_a_state_is_refused_by_a_pipeline_with_another_order():
  state = pipeline.batch_iterator(index_source(8), index_example, batch_size=4, seed=0,
                                  process_index=0, process_count=1).get_state()
  other = pipeline.batch_iterator(index_source(8), index_example, batch_size=4, seed=1,
                                  process_index=0, process_count=1)
  with pytest.raises(ValueError, match="state: saved by the pipeline .*'seed': 0"):
    other.set_state(state)


def test_arguments_are_checked_with_their_names():
  with pytest.raises(ValueError, match="batch_size: expected a positive multiple of "
                                       "process_count=2, got 3"):
    pipeline.batch_iterator(index_source(4), index_example, batch_size=3, seed=0,
                            process_index=0, process_count=2)
  with pytest.raises(ValueError, match=r"components\['a'\].weight: expected > 0, got 0"):
    pipeline.mixture_iterator({"a": pipeline.Component(index_source(4), index_example, 2, 0.0)},
                              seed=0)
  with pytest.raises(ValueError, match="prefetch_batches: expected >= 0, got -1"):
    pipeline.batch_iterator(index_source(4), index_example, batch_size=2, seed=0,
                            process_index=0, process_count=1, prefetch_batches=-1)
  with pytest.raises(ValueError, match="source: expected at least one record"):
    pipeline.batch_iterator([], index_example, batch_size=2, seed=0, process_index=0,
                            process_count=1)
