"""``config.data`` -> the ``data.pipeline`` mixture iterator this process reads its batches from.

Each entry of ``config.data.datasets`` names a ``source`` of ``data.catalog`` and gives its
reader's arguments:
  ``shapes``: the synthetic shapes world (``kind``: caption, pair, vqa, interleaved, binding;
    ``num_records``; further keys go to the generator, e.g. ``max_images``), rendered at the
    model's image size from ``config.data.seed``.
  ``shapes_text``: the shapes world's text-only stream (``num_records``; ``texts_per_record``
    texts joined into one, to pretrain the LM's positions up to a long context), every real
    token supervised: the ``lm_pretrain`` data.
  ``image_text_folder``, ``webdataset``, ``array_record`` (``path``), ``mmc4`` (``path``,
    ``image_root``): real image-text pairs and interleaved documents.
An entry may set its own ``max_tokens`` and ``media_slots`` (image slots per example) instead of
``config.data.max_tokens`` / ``max_images``, so short image-text pairs are not padded to the
shapes of long interleaved documents, and ``supervise``: ``"all"`` (the default: Flamingo's LM
loss on every text token) or ``"answer"`` (question-answer records such as the shapes world's
``vqa``: the loss on the answer alone, ``sequence.build_example``). Every step yields
``{name: batch}`` with one batch per dataset; the iterator's state is saved with each checkpoint,
so a resumed run reads exactly the batches an uninterrupted one would.

With ``config.data.feature_cache`` set (the Flamingo stage), the image datasets read the frozen
tower's features from that cache (``data.features``) instead of pixels, so the tower never runs.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from xattn_vlm import checkpoint
from xattn_vlm.data import catalog
from xattn_vlm.data import features
from xattn_vlm.data import pipeline
from xattn_vlm.data import sequence
from xattn_vlm.data import sources
from xattn_vlm.data.shapes.tokenizer import default_tokenizer
from xattn_vlm.data.tokenizer import Tokenizer
from xattn_vlm.models import config as model_config
from xattn_vlm.train import sharding as sharding_lib
from xattn_vlm.train import stages

_log = logging.getLogger(__name__)

_COMPONENT_KEYS = ("source", "batch_size", "weight", "max_tokens", "media_slots", "supervise")


def _source(name: str, component: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
  args = {k: v for k, v in component.items() if k not in _COMPONENT_KEYS}
  # The shapes world renders at the model's image size, from the data seed.
  if component.source in ("shapes", "shapes_text"):
    args["seed"] = config.data.seed
  if component.source == "shapes":
    args["image_size"] = config.model.vision.image_size
  return catalog.open_source(component.source, args, setting=f"config.data.datasets.{name}")


def tokenizer_for(config: ml_collections.ConfigDict) -> Tokenizer:
  """``config.data.tokenizer`` (a local Hugging Face folder) or the shapes-world BPE, checked
  against the vocabularies it feeds; for the flamingo stage it gives the model's special-token
  ids (``Tokenizer.require_model``)."""
  flamingo = config.stage == "flamingo"
  if config.data.tokenizer:
    tokenizer = Tokenizer.from_pretrained(config.data.tokenizer,
                                          model_config=config.model if flamingo else None,
                                          lm_vocab_size=None if flamingo else
                                          config.model.lm.vocab_size)
  else:
    tokenizer = default_tokenizer()
  vocabularies = [("config.model.lm.vocab_size", config.model.lm.vocab_size)]
  if config.stage == "vision_pretrain":
    vocabularies = [("config.contrastive.text.vocab_size", config.contrastive.text.vocab_size)]
  for setting, size in vocabularies:
    if size < tokenizer.lm_vocab_size:
      raise ValueError(f"{setting}={size} is smaller than the tokenizer's vocabulary "
                       f"({tokenizer.lm_vocab_size}); set it to at least {tokenizer.lm_vocab_size}")
  if flamingo:
    tokenizer.require_model(config.model, "in the flamingo stage", setting_prefix="config.model.")
  return tokenizer


def components(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               cache: features.FeatureCache | None = None) -> dict[str, pipeline.Component]:
  """The datasets of ``config.data``: records and transform of each. Image datasets give pixels
  (``pipeline.ExampleTransform``), or with ``cache`` the cached features of their images."""
  if not config.data.datasets:
    raise ValueError("config.data.datasets: expected at least one dataset, got none")
  vision = config.model.vision
  media_tokens = model_config.media_tokens_per_image(config.model)
  result = {}
  for name, component in config.data.datasets.items():
    source = _source(name, component, config)
    max_tokens = component.get("max_tokens", config.data.max_tokens)
    max_images = component.get("media_slots", config.data.max_images)
    supervise = component.get("supervise", "all")
    if supervise not in sequence.SUPERVISE:
      raise ValueError(f"config.data.datasets.{name}.supervise: expected one of "
                       f"{sequence.SUPERVISE}, got {supervise!r}")
    if catalog.source_type(component.source, f"config.data.datasets.{name}").text_only:
      if supervise != "all":
        raise ValueError(f"config.data.datasets.{name}.supervise={supervise!r}: text-only "
                         "datasets supervise every token; leave it 'all'")
      transform = pipeline.TextTransform(tokenizer, max_tokens=max_tokens)
    elif cache is not None:
      _check_cached(name, source, cache)
      transform = features.CachedFeaturesTransform(tokenizer, cache, max_tokens=max_tokens,
                                                   max_images=max_images, supervise=supervise,
                                                   media_tokens=media_tokens)
    else:
      transform = pipeline.ExampleTransform(
          tokenizer, max_tokens=max_tokens, max_images=max_images, image_size=vision.image_size,
          mean=vision.image_mean, std=vision.image_std, mode=config.data.image_mode,
          supervise=supervise, media_tokens=media_tokens)
    result[name] = pipeline.Component(source, transform, batch_size=component.batch_size,
                                      weight=component.weight)
  return result


_REBUILD = "build it for this config with `python -m xattn_vlm.build_features`"


def vision_tower_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Which weights the Flamingo stage of ``config`` freezes as its vision tower, as a feature
  cache records it: the config field and absolute path, plus the newest checkpoint step of a
  workdir or the weight files (name and size) of a Hugging Face folder. A tower retrained in the
  same workdir, or a folder whose weights were replaced, thus no longer matches."""
  tower = stages.frozen_vision_tower(config)
  if tower is None:
    return {"setting": None}
  identity = {"setting": tower.setting, "path": str(checkpoint.run_path(tower.path))}
  if tower.hf_loader is None:
    identity["step"] = checkpoint.latest_step(tower.path)
  else:
    folder = sources.require_path(tower.path, tower.setting)
    identity["weights"] = {f.name: f.stat().st_size for f in sorted(folder.iterdir())
                           if f.name.endswith((".safetensors", ".bin"))}
  return identity


def open_feature_cache(config: ml_collections.ConfigDict) -> features.FeatureCache | None:
  """``config.data.feature_cache`` opened and checked against the model's vision tower: its
  feature shape, and the tower that built it (``vision_tower_identity``; None when unset)."""
  path = config.data.feature_cache
  if not path:
    return None
  if config.stage != "flamingo":
    raise ValueError(f"config.data.feature_cache={path!r}: only the flamingo stage, whose vision "
                     f"tower is frozen, can read cached features; got stage {config.stage!r}")
  if model_config.fusion_mode(config.model) == "joint":
    raise ValueError(f"config.data.feature_cache={path!r}: joint fusion trains the vision tower, "
                     "so it cannot read cached features; set config.data.feature_cache=''")
  try:
    cache = features.FeatureCache(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.data.feature_cache={path!r}: {e}; {_REBUILD}") from e
  expected = stages.vision_feature_shape(config)
  if cache.shape != expected:
    raise ValueError(f"config.data.feature_cache={path!r} holds features of shape {cache.shape} "
                     f"per image, but config.model.vision's tower outputs {expected}; {_REBUILD}")
  tower = vision_tower_identity(config)
  if cache.encoder is None:
    _log.warning("config.data.feature_cache=%r does not record which vision tower built it "
                    "(an older cache), so it cannot be checked against %s", path, tower)
  elif cache.encoder != tower:
    raise ValueError(f"config.data.feature_cache={path!r} was built by the vision tower "
                     f"{cache.encoder}, but this config freezes {tower}; {_REBUILD}")
  return cache


def _check_cached(name: str, source, cache: features.FeatureCache) -> None:
  """Raises unless the images of the dataset's first readable record with images are in
  ``cache`` (a cache built for other data would otherwise skip every record, one at a time)."""
  for index in range(len(source)):
    try:
      record = source[index]
    except pipeline.SKIPPED_ERRORS:
      continue
    keys = [c.key for c in record["chunks"] if isinstance(c, sources.ImageRef)]
    missing = [key for key in keys if key not in cache]
    if missing:
      raise ValueError(f"config.data.feature_cache={str(cache.directory)!r} has no features for "
                       f"image {missing[0]!r} of config.data.datasets.{name} (record {index}); "
                       f"{_REBUILD}")
    if keys:
      return


def create_iterator(config: ml_collections.ConfigDict, *, process_index: int | None = None,
                    process_count: int | None = None) -> pipeline.MixtureIterator:
  """This process's mixture iterator for ``config.data``."""
  cache = open_feature_cache(config)
  return pipeline.mixture_iterator(components(config, tokenizer_for(config), cache),
                                   seed=config.data.seed,
                                   process_index=process_index, process_count=process_count,
                                   num_workers=config.data.num_workers,
                                   prefetch_batches=config.data.prefetch_batches)


def example_spec(config: ml_collections.ConfigDict, name: str) -> dict[str, tuple]:
  """``{key: (shape, dtype)}`` of one example of dataset ``name`` as its transform makes it
  (``sequence.example_spec``): tokens only for text sources; images, or with
  ``config.data.feature_cache`` the frozen tower's cached features, for the others."""
  component = config.data.datasets[name]
  max_tokens = component.get("max_tokens", config.data.max_tokens)
  if catalog.source_type(component.source, f"config.data.datasets.{name}").text_only:
    return sequence.example_spec(max_tokens)
  max_images = component.get("media_slots", config.data.max_images)
  size = config.model.vision.image_size
  if config.data.feature_cache:
    return sequence.example_spec(max_tokens, max_images, (1, *stages.vision_feature_shape(config)),
                                 media_key="features")
  return sequence.example_spec(max_tokens, max_images, (1, size, size, 3))


def abstract_batches(config: ml_collections.ConfigDict, mesh, rules) -> dict[str, dict[str, Any]]:
  """``{dataset: {key: ShapeDtypeStruct}}`` of one step's global batches, sharded along the batch
  as the trainer shards them: what the mixture iterator yields, without reading any data."""
  spec = sharding_lib.batch_spec(rules, mesh)
  batches = {}
  for name, dataset in config.data.datasets.items():
    batches[name] = {
        key: jax.ShapeDtypeStruct((dataset.batch_size, *shape), dtype, sharding=NamedSharding(
            mesh, P(*spec, *([None] * len(shape)))))
        for key, (shape, dtype) in example_spec(config, name).items()}
  return batches
