"""The Flamingo stage's cache of frozen vision features, built from a config.

``build_features`` caches the frozen vision tower's features of every image of a Flamingo-stage
config's datasets, for ``config.data.feature_cache``: training then reads them instead of running
the tower. The tower is the one training would freeze (``config.init.vision_workdir`` or
``config.init.vision_hf_path``), loaded as the trainer loads it; each image is preprocessed as
the pipeline would for the tower and encoded once (``data.features``). One process; the CLI is
``python -m xattn_vlm.build_features``.
"""

from __future__ import annotations

import logging
import collections
import itertools
import os

import jax
import ml_collections
from flax import nnx

from xattn_vlm.data import features
from xattn_vlm.data import pipeline
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import stages
from xattn_vlm.train import trainer

_log = logging.getLogger(__name__)


def build_features(config: ml_collections.ConfigDict, output: str | os.PathLike, *,
                   batch_size: int = 32) -> features.FeatureCache:
  """Encodes the images of ``config.data.datasets`` with the config's pretrained vision tower into
  a new cache at ``output``; ``batch_size`` images per tower call."""
  if config.stage != "flamingo":
    raise ValueError(f"config.stage: cached features are for the flamingo stage (frozen vision "
                     f"tower), got {config.stage!r}")
  tower = stages.frozen_vision_tower(config)
  if tower is None:
    raise ValueError("config.init: expected vision_workdir or vision_hf_path (the pretrained "
                     "tower training freezes, whose features to cache), got neither")
  s = trainer.setup(config)
  params = trainer.load_pretrained(s, tower)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: stages.build_tower(config, "vision")), nnx.Param)
  encode = jax.jit(lambda params, pixels: nnx.merge(graphdef, params)(pixels))

  skipped = collections.Counter()
  images = itertools.chain.from_iterable(
      features.unique_images(c.source, c.transform.preprocess, skipped=skipped)
      for c in input_pipeline.components(config, input_pipeline.tokenizer_for(config)).values()
      if isinstance(c.transform, pipeline.ExampleTransform))
  cache = features.build_feature_cache(output, images, lambda pixels: encode(params, pixels),
                                       batch_size=batch_size,
                                       encoder=input_pipeline.vision_tower_identity(config))
  _log.info("cached the features %s of %d images in %s; skipped %s", cache.shape, len(cache),
               cache.directory, dict(skipped) or "none")
  return cache
