"""Evaluation that does each piece of work once: the vision tower's features of every image are
computed once and reused (``eval.features``), prompts are batched by length into a few fixed
shapes, and neither changes a single prediction; a feature cache of another tower, or a stale
one, is refused naming it."""

import json

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from test_eval_runner import tiny, write_benchmarks  # noqa: F401  (tiny is a fixture)
from xattn_vlm.eval import features as features_lib
from xattn_vlm.eval import runner
from xattn_vlm.inference import InferenceModel, Processor, decoding
from xattn_vlm.models.flamingo import Flamingo

_GENERATE = decoding.generate_tokens


def _predictions(directory):
  out = {}
  for path in sorted((directory / runner.PREDICTIONS).rglob("*.jsonl")):
    records = [json.loads(line) for line in path.open()]
    out[str(path.relative_to(directory))] = sorted(records, key=lambda r: r["id"])
  return out


def _run(model, processor, config, directory, fast: bool, monkeypatch):
  """An evaluation with or without the feature cache and length groups; also the padded
  lengths its generation batches had."""
  config = config.copy_and_resolve_references()
  config.reuse_vision_features = config.group_by_length = fast
  lengths = []

  def recording(model, batch, *args, **kwargs):
    lengths.append(batch.input_ids.shape[1])
    assert (batch.images is None) == fast and (batch.vision_features is not None) == fast
    return _GENERATE(model, batch, *args, **kwargs)

  monkeypatch.setattr(decoding, "generate_tokens", recording)
  evaluator = runner.Evaluator(model, processor, config, directory)
  results = evaluator.run()
  return results, _predictions(directory), evaluator, lengths


@pytest.mark.parametrize("tasks", ["shapes_captioning,shapes_binding",
                                   pytest.param("coco,imagenet", marks=pytest.mark.slow)])
def test_cached_features_and_length_groups_give_the_same_predictions(tiny, tmp_path, tasks,
                                                                    monkeypatch):
  model, processor = tiny
  config = runner.default_config()
  config.tasks = tasks
  config.shots = (0, 2)
  config.trials = 2
  config.batch_size = 4
  config.shapes.num_queries = 6
  config.shapes.pool_size = 16
  if "coco" in tasks:
    write_benchmarks(tmp_path / "data")
    config.data_root = str(tmp_path / "data")
  plain_results, plain, _, _ = _run(model, processor, config, tmp_path / "plain", False,
                                    monkeypatch)
  fast_results, fast, evaluator, lengths = _run(model, processor, config, tmp_path / "fast", True,
                                                monkeypatch)
  assert plain and set(fast) == set(plain)
  for name, records in plain.items():
    if "scores" not in records[0]:  # generated text: exactly the same
      assert fast[name] == records, name
      continue
    # Classification: the same ranking of the classes; the log-probs differ in the last bit where
    # a prompt's padding (a sum over more masked keys) differs.
    for ours, theirs in zip(fast[name], records):
      assert ours["id"] == theirs["id"]
      np.testing.assert_array_equal(np.argsort(ours["scores"]), np.argsort(theirs["scores"]))
      np.testing.assert_allclose(ours["scores"], theirs["scores"], rtol=1e-6)
  assert fast_results == plain_results
  # Each distinct image went through the tower once, however many prompts showed it.
  shown = {features_lib._image_key(image)[0] for cell in evaluator.cells()
           for prompt, _ in evaluator._build_prompts(cell, evaluator.queries(cell.task.name), None)
           for image in prompt.images}
  assert evaluator.vision_features.computed == len(shown)
  # Length groups: every generation batch padded to one of the few fixed lengths.
  assert lengths and set(lengths) <= set(runner.BUCKETS) | {model.config.lm.max_length - 20}


def _image_files(directory, n=3):
  directory.mkdir(parents=True, exist_ok=True)
  paths = []
  for i in range(n):
    path = directory / f"{i}.png"
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 16, 3), np.uint8)).save(
        path, format="PNG")
    paths.append(path)
  return paths


def test_a_cache_of_another_tower_or_a_stale_one_is_refused_naming_it(tiny, tmp_path):
  model, processor = tiny
  ours = InferenceModel(model)
  paths = _image_files(tmp_path / "images")
  directory = tmp_path / "cache"
  cache = features_lib.VisionFeatureCache(ours, processor, directory, batch_size=2)
  first = cache(paths)
  assert first.shape[0] == 3 and cache.computed == 3
  assert cache(paths[::-1]).shape == first.shape and cache.computed == 3  # reused, in order
  np.testing.assert_array_equal(cache(paths[::-1]), first[::-1])
  assert cache([]).shape == (0,) + first.shape[1:]

  # Reopened by the same tower: read from disk, nothing recomputed, the same features.
  again = features_lib.VisionFeatureCache(ours, processor, directory, batch_size=2)
  np.testing.assert_array_equal(again(paths), first)
  assert again.computed == 0

  other = InferenceModel(Flamingo(model.config, rngs=nnx.Rngs(7)))
  with pytest.raises(ValueError, match=rf"cache '{directory}' was built by another vision tower "
                                       r"\(its parameters_sha256 differ"):
    features_lib.VisionFeatureCache(other, processor, directory)
  cropping = Processor(processor.tokenizer, image_size=processor.image_size,
                       image_mean=processor.image_mean, image_std=processor.image_std,
                       max_length=processor.max_length, image_mode="crop")
  with pytest.raises(ValueError, match=r"another vision tower \(its preprocessing differ"):
    features_lib.VisionFeatureCache(ours, cropping, directory)

  # An image file rewritten after its features were cached: the cache is stale.
  paths[0].write_bytes(paths[1].read_bytes())
  reopened = features_lib.VisionFeatureCache(ours, processor, directory)
  with pytest.raises(ValueError, match=rf"cache '{directory}' is stale: image "
                                       rf"{paths[0].resolve()} changed"):
    reopened(paths)
