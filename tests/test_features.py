"""The frozen-feature cache: one encoder pass per unique image, features read back equal to
running the encoder, and cached examples equal to pixel examples but for the features."""

import pickle

import numpy as np
import pytest

from xattn_vlm.data import default_tokenizer
from xattn_vlm.data.shapes import records as shapes_records
from xattn_vlm.data import features
from xattn_vlm.data import pipeline
from xattn_vlm.data import sources

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


class PatchMeans:
  """A stand-in frozen tower: [N, H, W, C] -> [N, 4, C], the mean of each image quadrant.
  Records every batch it is called with."""

  def __init__(self):
    self.calls = []

  def __call__(self, images):
    self.calls.append(images.shape)
    n, h, w, c = images.shape
    return images.reshape(n, 2, h // 2, 2, w // 2, c).mean(axis=(2, 4)).reshape(n, 4, c)


@pytest.fixture(name="setup")
def fixture_setup(tmp_path):
  world = shapes_records.ShapesWorld("interleaved", num_records=3, image_size=8, min_images=2,
                              max_images=3)
  # Record 0 twice (its images are encoded once); documents of 3 images > max_images=2.
  records = [world[0], world[1], world[0], world[2]]
  transform = pipeline.ExampleTransform(default_tokenizer(), max_tokens=40,
                                        max_images=2, image_size=8, mean=MEAN, std=STD)
  encoder = PatchMeans()
  cache = features.build_feature_cache(
      tmp_path / "cache", features.unique_images(records, transform.preprocess), encoder,
      batch_size=3, shard_size=4)
  return records, transform, encoder, cache


def test_cache_round_trip_equals_running_the_encoder(setup):
  records, transform, encoder, cache = setup
  refs = {c.key: c for r in records for c in r["chunks"] if isinstance(c, sources.ImageRef)}

  assert len(cache) == len(refs) and cache.shape == (4, 3)
  assert sum(shape[0] for shape in encoder.calls) == 3 * -(-len(refs) // 3)
  assert all(shape == (3, 8, 8, 3) for shape in encoder.calls)  # padded: one compile
  for key, ref in refs.items():
    np.testing.assert_allclose(cache[key], PatchMeans()(transform.preprocess(ref)[None])[0],
                               rtol=1e-6, err_msg=key)
  reopened = pickle.loads(pickle.dumps(features.FeatureCache(cache.directory)))
  np.testing.assert_array_equal(reopened[next(iter(refs))], cache[next(iter(refs))])


def test_cached_examples_equal_pixel_examples_but_for_the_features(setup):
  records, transform, _, cache = setup
  cached = features.CachedFeaturesTransform(transform.tokenizer, cache, max_tokens=40,
                                            max_images=2)

  for record in records:
    pixels, swapped = transform(record), cached(record)
    assert set(swapped) == set(pixels) - {"images"} | {"features"}
    for key in ("input_ids", "attention_mask", "labels", "media_mask", "num_images"):
      np.testing.assert_array_equal(swapped[key], pixels[key], err_msg=key)
    assert swapped["features"].shape == (2, 1, 4, 3)
    count = int(pixels["num_images"])
    np.testing.assert_allclose(swapped["features"][:count, 0],
                               PatchMeans()(pixels["images"][:count, 0]), rtol=1e-6)
    assert not swapped["features"][count:].any()


def test_uncached_images_are_skipped_and_counted_in_the_pipeline(setup):
  records, transform, _, cache = setup
  stranger = shapes_records.ShapesWorld("caption", num_records=1, image_size=8, seed=9)[0]
  cached = features.CachedFeaturesTransform(transform.tokenizer, cache, max_tokens=40,
                                            max_images=2)
  iterator = pipeline.batch_iterator([stranger, *records, records[1]], cached, batch_size=2,
                                     seed=0, shuffle=False, num_epochs=1, process_index=0,
                                     process_count=1)

  batches = list(iterator)

  assert [b["features"].shape for b in batches] == [(2, 2, 1, 4, 3)] * 2
  assert dict(iterator.skipped) == {"uncached image": 1}


def test_cache_locations_are_checked(setup, tmp_path):
  records, transform, encoder, cache = setup
  with pytest.raises(FileExistsError, match="directory: expected a new cache location"):
    features.build_feature_cache(cache.directory, [], encoder)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
    features.FeatureCache(tmp_path / "nowhere")
