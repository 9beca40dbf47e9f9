"""``config.data`` -> the ``data.pipeline`` mixture iterator this process reads its batches from.

Each entry of ``config.data.datasets`` names a ``source``:
  ``shapes``: the synthetic shapes world (``kind``: caption, pair, vqa, interleaved, binding;
    ``num_records``; further keys go to the generator, e.g. ``max_images``).
  ``shapes_text``: the shapes world's text-only stream (``num_records``; ``texts_per_record``
    texts joined into one, to pretrain the LM's positions up to a long context), every real
    token supervised: the ``lm_pretrain`` data.
  ``image_text_folder`` (``path``), ``webdataset`` (``path``), ``mmc4`` (``path``,
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

from typing import Any

import ml_collections
import numpy as np
from absl import logging

from xattn_vlm.data import features
from xattn_vlm.data import pipeline
from xattn_vlm.data import sequence
from xattn_vlm.data import shapes_world
from xattn_vlm.data import sources
from xattn_vlm.data.sequence import IGNORE_INDEX
from xattn_vlm.data.tokenizer import Tokenizer, default_tokenizer
from xattn_vlm.train import checkpoint
from xattn_vlm.train import stages

SOURCES = ("shapes", "shapes_text", "image_text_folder", "webdataset", "mmc4")
_COMPONENT_KEYS = ("source", "batch_size", "weight", "max_tokens", "media_slots", "supervise")


class ShapesText:
  """The shapes world's text-only records ``{"id", "text"}`` (random access, for grain); record
  i joins texts ``i * texts_per_record, ...`` with spaces, so the LM sees long sequences."""

  def __init__(self, *, num_records: int, split: str = "train", seed: int = 0,
               texts_per_record: int = 1):
    for name, value in (("num_records", num_records), ("texts_per_record", texts_per_record)):
      if value < 1:
        raise ValueError(f"{name}: expected >= 1, got {value}")
    self.name = f"ShapesText({split}, seed={seed})"
    self._split, self._seed, self._len = split, seed, num_records
    self._per_record = texts_per_record

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    first = int(index) * self._per_record
    text = " ".join(shapes_world.text_example(self._split, self._seed, i)["text"]
                    for i in range(first, first + self._per_record))
    return {"id": f"shapes/text/{self._split}/{self._seed}/{index}", "text": text}


class TextTransform:
  """A text record -> ``input_ids``, ``attention_mask`` and ``labels`` (every real token
  supervised; the loss shifts by one), int32 [max_tokens]; BOS (if any) and EOS added."""

  def __init__(self, tokenizer: Tokenizer, *, max_tokens: int):
    self.tokenizer = tokenizer
    self.max_tokens = max_tokens

  def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    tok = self.tokenizer
    ids = [] if tok.bos_token_id is None else [tok.bos_token_id]
    ids = (ids + tok.encode(record["text"]) + [tok.eos_token_id])[:self.max_tokens]
    pad = self.max_tokens - len(ids)
    input_ids = np.array(ids + [tok.pad_token_id] * pad, np.int32)
    attention_mask = np.array([1] * len(ids) + [0] * pad, np.int32)
    labels = np.where(attention_mask == 1, input_ids, IGNORE_INDEX).astype(np.int32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _source(name: str, component: ml_collections.ConfigDict, config: ml_collections.ConfigDict):
  args = {k: v for k, v in component.items() if k not in _COMPONENT_KEYS}
  kind = component.source
  if kind == "shapes":
    return sources.ShapesWorld(image_size=config.model.vision.image_size, seed=config.data.seed,
                               **args)
  if kind == "shapes_text":
    return ShapesText(seed=config.data.seed, **args)
  if kind == "image_text_folder":
    return sources.ImageTextFolder(args.pop("path"), **args)
  if kind == "webdataset":
    return sources.WebDatasetTars(args.pop("path"), **args)
  if kind == "mmc4":
    return sources.MMC4Documents(args.pop("path"), **args)
  raise ValueError(f"config.data.datasets.{name}.source: expected one of {SOURCES}, got {kind!r}")


def tokenizer_for(config: ml_collections.ConfigDict) -> Tokenizer:
  """``config.data.tokenizer`` (a local Hugging Face folder) or the shapes-world BPE, checked
  against the vocabularies it feeds."""
  if config.data.tokenizer:
    tokenizer = Tokenizer.from_pretrained(config.data.tokenizer,
                                          lm_vocab_size=config.model.lm.vocab_size)
  else:
    tokenizer = default_tokenizer()
  vocabularies = [("config.model.lm.vocab_size", config.model.lm.vocab_size)]
  if config.stage == "vision_pretrain":
    vocabularies = [("config.contrastive.text.vocab_size", config.contrastive.text.vocab_size)]
  for setting, size in vocabularies:
    if size < tokenizer.lm_vocab_size:
      raise ValueError(f"{setting}={size} is smaller than the tokenizer's vocabulary "
                       f"({tokenizer.lm_vocab_size}); set it to at least {tokenizer.lm_vocab_size}")
  if config.stage == "flamingo":
    tokenizer.require_model_vocab(config.model.lm.vocab_size, "config.model.lm.vocab_size",
                                  "in the flamingo stage")
  return tokenizer


def components(config: ml_collections.ConfigDict, tokenizer: Tokenizer,
               cache: features.FeatureCache | None = None) -> dict[str, pipeline.Component]:
  """The datasets of ``config.data``: records and transform of each. Image datasets give pixels
  (``pipeline.ExampleTransform``), or with ``cache`` the cached features of their images."""
  if not config.data.datasets:
    raise ValueError("config.data.datasets: expected at least one dataset, got none")
  vision = config.model.vision
  result = {}
  for name, component in config.data.datasets.items():
    source = _source(name, component, config)
    max_tokens = component.get("max_tokens", config.data.max_tokens)
    max_images = component.get("media_slots", config.data.max_images)
    supervise = component.get("supervise", "all")
    if supervise not in sequence.SUPERVISE:
      raise ValueError(f"config.data.datasets.{name}.supervise: expected one of "
                       f"{sequence.SUPERVISE}, got {supervise!r}")
    if component.source == "shapes_text":
      if supervise != "all":
        raise ValueError(f"config.data.datasets.{name}.supervise={supervise!r}: text-only "
                         "datasets supervise every token; leave it 'all'")
      transform = TextTransform(tokenizer, max_tokens=max_tokens)
    elif cache is not None:
      _check_cached(name, source, cache)
      transform = features.CachedFeaturesTransform(tokenizer, cache, max_tokens=max_tokens,
                                                   max_images=max_images, supervise=supervise)
    else:
      transform = pipeline.ExampleTransform(
          tokenizer, max_tokens=max_tokens, max_images=max_images, image_size=vision.image_size,
          mean=vision.image_mean, std=vision.image_std, mode=config.data.image_mode,
          supervise=supervise)
    result[name] = pipeline.Component(source, transform, batch_size=component.batch_size,
                                      weight=component.weight)
  return result


_REBUILD = "build it for this config with `python -m xattn_vlm.train.build_features`"


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
    logging.warning("config.data.feature_cache=%r does not record which vision tower built it "
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
