"""The Flamingo stage on cached frozen vision features (``config.data.feature_cache``): a cache
built for a config trains to the same losses as running the tower, and a cache that does not fit
the config (feature shape, images, or the tower that built it) fails at start, naming the
setting. Tiny config (experiments/tiny_test.py)."""

import os

import numpy as np
import pytest

from helpers import tiny
from xattn_vlm.data import features
from xattn_vlm.train import feature_cache
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import metrics as metrics_lib
from xattn_vlm.train import trainer

SMALL = {"data.datasets.docs.num_records": 32, "data.datasets.pairs.num_records": 32}


@pytest.fixture(scope="module")
def vision_workdir(tmp_path_factory):
  """A one-step vision_pretrain run: the tower the Flamingo stage loads and freezes."""
  workdir = tmp_path_factory.mktemp("vision")
  trainer.train(tiny("vision_pretrain", total_steps=1), str(workdir))
  return str(workdir)


def _losses(workdir) -> list[dict[str, float]]:
  return [{k: v for k, v in row.items() if k.startswith("loss")}
          for row in metrics_lib.read_metrics(str(workdir))]


def _cache_of(directory, shape, key="elsewhere/0"):
  """A one-image cache of zero features of ``shape`` under an unrelated key."""
  return features.build_feature_cache(directory, [(key, np.zeros((16, 16, 3), np.float32))],
                                      lambda pixels: np.zeros((len(pixels), *shape)),
                                      batch_size=1)


@pytest.mark.slow
def test_training_on_cached_features_equals_running_the_tower(vision_workdir, tmp_path):
  config = tiny(**SMALL, **{"init.vision_workdir": vision_workdir})
  cache = feature_cache.build_features(config, tmp_path / "cache", batch_size=16)
  assert cache.shape == (4, 24) and len(cache) > 32
  assert cache.encoder == {"setting": "config.init.vision_workdir",
                           "path": os.path.abspath(vision_workdir), "step": 1}
  trainer.train(config, str(tmp_path / "pixels"))

  cached = tiny(**SMALL, **{"init.vision_workdir": vision_workdir,
                            "data.feature_cache": str(tmp_path / "cache")})
  iterator = input_pipeline.create_iterator(cached)
  batch = next(iterator)["docs"]
  iterator.close()
  assert "features" in batch and "images" not in batch
  trainer.train(cached, str(tmp_path / "cached"))

  want, got = _losses(tmp_path / "pixels"), _losses(tmp_path / "cached")
  assert len(want) == 3 and [r.keys() for r in got] == [r.keys() for r in want]
  for row_got, row_want in zip(got, want):
    for key in row_want:
      np.testing.assert_allclose(row_got[key], row_want[key], rtol=1e-5, atol=1e-5, err_msg=key)

  # The tower trains on: the cache holds the old tower's features and no longer fits.
  trainer.train(tiny("vision_pretrain", total_steps=2), vision_workdir)
  with pytest.raises(ValueError, match=r"config\.data\.feature_cache=.* was built by the vision "
                                       r"tower .*'step': 1\}, but this config freezes .*'step': 2\}"):
    input_pipeline.create_iterator(cached)


def test_a_cache_that_does_not_fit_the_config_fails_at_start(tmp_path):
  wrong_shape = _cache_of(tmp_path / "wrong_shape", (3, 5))
  with pytest.raises(ValueError, match=r"config\.data\.feature_cache=.* holds features of shape "
                                       r"\(3, 5\) per image, .* outputs \(4, 24\)"):
    input_pipeline.create_iterator(tiny(**{"data.feature_cache": str(wrong_shape.directory)}))

  other_tower = features.build_feature_cache(
      tmp_path / "other_tower", [("elsewhere/0", np.zeros((16, 16, 3), np.float32))],
      lambda pixels: np.zeros((len(pixels), 4, 24)), batch_size=1,
      encoder={"setting": "config.init.vision_workdir", "path": "/runs/other", "step": 3})
  with pytest.raises(ValueError, match=r"config\.data\.feature_cache=.* was built by the vision "
                                       r"tower .*/runs/other.*, but this config freezes "
                                       r"\{'setting': None\}; build it"):
    input_pipeline.create_iterator(tiny(**{"data.feature_cache": str(other_tower.directory)}))

  other_data = str(_cache_of(tmp_path / "other_data", (4, 24)).directory)
  with pytest.raises(ValueError, match=r"config\.data\.feature_cache=.* has no features for image "
                                       r"'shapes/interleaved/.* of config\.data\.datasets\.docs"):
    input_pipeline.create_iterator(tiny(**{"data.feature_cache": other_data}))
  with pytest.raises(ValueError, match=r"only the flamingo stage"):
    input_pipeline.create_iterator(tiny("vision_pretrain", **{"data.feature_cache": other_data}))
  with pytest.raises(FileNotFoundError, match=r"config\.data\.feature_cache=.*build_features"):
    input_pipeline.create_iterator(tiny(**{"data.feature_cache": str(tmp_path)}))
  with pytest.raises(ValueError, match=r"config\.init: expected vision_workdir or vision_hf_path"):
    feature_cache.build_features(tiny(), tmp_path / "no_tower")


def test_the_tower_of_a_hugging_face_folder_is_named_by_its_weight_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "model.safetensors").write_bytes(b"0123456789")
  tower = input_pipeline.vision_tower_identity(tiny(**{"init.vision_hf_path": str(tmp_path)}))
  assert tower == {"setting": "config.init.vision_hf_path", "path": str(tmp_path),
                   "weights": {"model.safetensors": 10}}
  (tmp_path / "model.safetensors").write_bytes(b"0123456789abc")
  assert input_pipeline.vision_tower_identity(
      tiny(**{"init.vision_hf_path": str(tmp_path)}))["weights"] == {"model.safetensors": 13}
  with pytest.raises(FileNotFoundError, match=r"config\.init\.vision_hf_path: expected an existing"):
    input_pipeline.vision_tower_identity(tiny(**{"init.vision_hf_path": str(tmp_path / "gone")}))
