"""The three training stages of the miniature recipe, as data for the one trainer.

A stage says which model to build, which parameters train (a Flax NNX filter of the config:
gradients, optimizer state and updates exist for these only), the loss of one (micro)batch and what it is normalised
by, where pretrained parameters come from, and which model values to log.

* ``lm_pretrain``: a ``DecoderLM`` on text; everything trains.
* ``vision_pretrain``: a CLIP-style ``DualEncoder`` on image-text pairs, symmetric InfoNCE;
  everything trains.
* ``flamingo``: the full model; the LM and vision tower come from the two earlier runs, or every
  parameter from a flamingo-stage workdir (a converted published model, to fine-tune); what
  trains follows ``config.model.fusion`` (``models.flamingo.trainable_params``): by default the
  resampler, gated blocks and added-token rows, the towers frozen.

Token losses are *sums* over supervised tokens divided by the dataset batch's token count
(``normalizer``, computed before the forward pass), so accumulating microbatches gives exactly the
full batch's mean; a batch with no supervised token gives 0, not NaN (safe denominator).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from xattn_vlm.data.sequence import IGNORE_INDEX
from xattn_vlm.models import convert
from xattn_vlm.models import flamingo as flamingo_lib
from xattn_vlm.models.contrastive import MAX_LOGIT_SCALE, DualEncoder
from xattn_vlm.models.lm import DecoderLM
from xattn_vlm.models.vision import VisionEncoder
from xattn_vlm.train.configs import STAGES

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Pretrained:
  """Parameters for ``target`` (a top-level key of this model; '' = all of it) from ``path``,
  named by the config field ``setting``. Either an earlier run's workdir (``hf_loader`` None): its
  params at ``source`` ('' = the whole model); that run must be ``stage`` with the same
  ``config.model[model_key]`` ('' = every model field of the stage). Or a local Hugging Face folder, read by ``hf_loader(module,
  path)`` (``models.convert``) into an abstract ``config.model[model_key]`` tower."""
  path: str
  setting: str
  stage: str
  model_key: str
  source: str
  target: str
  hf_loader: Callable[[nnx.Module, str], None] | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage: ``trainable(config)`` is the filter of the parameters that train;
  ``loss_sum(model, batch)`` is divided by ``normalizer(batch)`` (the dataset batch's, computed
  before any microbatch); ``splits_into_microbatches`` is False for a loss that
  needs the whole batch at once; ``model_metrics(config, params)`` are logged every step."""
  name: str
  build_model: Callable[[ml_collections.ConfigDict, nnx.Rngs], nnx.Module]
  trainable: Callable[[ml_collections.ConfigDict], nnx.filterlib.Filter]
  loss_sum: Callable[[nnx.Module, Batch], jax.Array]
  normalizer: Callable[[Batch], jax.Array]
  splits_into_microbatches: bool
  pretrained: Callable[[ml_collections.ConfigDict], list[Pretrained]]
  model_metrics: Callable[[ml_collections.ConfigDict, nnx.State], dict[str, jax.Array]]


def next_token_loss_sum(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Summed cross-entropy of predicting ``labels[t+1]`` from position t, over supervised targets
  (``labels != IGNORE_INDEX``). logits [B, L, V] (float32), labels [B, L] aligned with inputs.

  The targets are shifted instead of the logits (the last position gets an ignored target): a
  slice of the logits copied the whole [B, L-1, V] tensor, and its gradient padded it back.
  """
  ignored = jnp.full((labels.shape[0], 1), IGNORE_INDEX, labels.dtype)
  targets = jnp.concatenate([labels[:, 1:], ignored], axis=1)
  supervised = targets != IGNORE_INDEX
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                        jnp.where(supervised, targets, 0))
  return jnp.sum(jnp.where(supervised, nll, 0.0))


def first_supervised(labels: jax.Array) -> jax.Array:
  """int32 [B]: each row's first supervised position (its length when it has none), the
  boundary of a prefix LM trained on these labels."""
  supervised = labels != IGNORE_INDEX
  return jnp.where(supervised.any(axis=1), jnp.argmax(supervised, axis=1),
                   labels.shape[1]).astype(jnp.int32)


def _every_param(config) -> nnx.filterlib.Filter:
  del config
  return nnx.Param


def supervised_tokens(batch: Batch) -> jax.Array:
  return jnp.sum(batch["labels"][:, 1:] != IGNORE_INDEX).astype(jnp.float32)


def info_nce(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array) -> jax.Array:
  """CLIP's symmetric InfoNCE, mean over the batch: matching pairs are the diagonal."""
  logits = scale * image_emb @ text_emb.T  # [B, B]
  labels = jnp.arange(logits.shape[0])
  image_to_text = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  text_to_image = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  return jnp.mean(image_to_text + text_to_image) / 2


def _dtypes(config):
  return dict(dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype),
              remat=config.model.remat, attention=config.model.attention)


def _first_image(batch: Batch) -> jax.Array:
  """[B, T, F, H, W, C] pipeline images -> the first frame of the first medium, [B, H, W, C]."""
  return batch["images"][:, 0, 0]


def _no_pretrained(config) -> list[Pretrained]:
  del config
  return []


def _no_metrics(config, params) -> dict[str, jax.Array]:
  del config, params
  return {}


# -- lm_pretrain ----------------------------------------------------------------------------------

def _lm_loss(model: DecoderLM, batch: Batch) -> jax.Array:
  return next_token_loss_sum(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


LM_PRETRAIN = Stage(
    name="lm_pretrain",
    build_model=lambda config, rngs: DecoderLM(config.model.lm, rngs=rngs, **_dtypes(config)),
    trainable=_every_param,
    loss_sum=_lm_loss,
    normalizer=supervised_tokens,
    splits_into_microbatches=True,
    pretrained=_no_pretrained,
    model_metrics=_no_metrics,
)


# -- vision_pretrain ------------------------------------------------------------------------------

def _build_dual_encoder(config, rngs) -> DualEncoder:
  c = config.contrastive
  return DualEncoder(config.model.vision, c.text, embed_dim=c.embed_dim,
                     init_temperature=c.init_temperature, rngs=rngs, **_dtypes(config))


def _contrastive_loss(model: DualEncoder, batch: Batch) -> jax.Array:
  image_emb, text_emb = model(_first_image(batch), batch["input_ids"], batch["attention_mask"])
  return info_nce(image_emb, text_emb, model.scale())


def _contrastive_metrics(config, params) -> dict[str, jax.Array]:
  del config
  return {"temperature": 1 / jnp.minimum(jnp.exp(params["logit_scale"][...]), MAX_LOGIT_SCALE)}


VISION_PRETRAIN = Stage(
    name="vision_pretrain",
    build_model=_build_dual_encoder,
    trainable=_every_param,
    loss_sum=_contrastive_loss,
    normalizer=lambda batch: jnp.ones((), jnp.float32),
    splits_into_microbatches=False,
    pretrained=_no_pretrained,
    model_metrics=_contrastive_metrics,
)


# -- flamingo -------------------------------------------------------------------------------------

def _flamingo_loss(model: flamingo_lib.Flamingo, batch: Batch) -> jax.Array:
  prefix_end = first_supervised(batch["labels"])  # read by joint fusion's prefix-LM mask only
  if "features" in batch:  # a cache of the frozen tower's outputs (``data.features``)
    logits = model(None, batch["input_ids"], batch["attention_mask"],
                   vision_features=batch["features"], prefix_end=prefix_end)
  else:
    logits = model(batch["images"], batch["input_ids"], batch["attention_mask"],
                   media_mask=batch["media_mask"], prefix_end=prefix_end)
  return next_token_loss_sum(logits, batch["labels"])


def _flamingo_pretrained(config) -> list[Pretrained]:
  init = config.init
  if init.flamingo_workdir:
    towers = [k for k in ("lm_workdir", "vision_workdir", "lm_hf_path", "vision_hf_path")
              if init[k]]
    if towers:
      raise ValueError(f"config.init: flamingo_workdir sets every parameter; clear {towers}")
    return [Pretrained(init.flamingo_workdir, "config.init.flamingo_workdir", "flamingo", "",
                       source="", target="")]
  for tower, workdir, hf_path in (("lm", init.lm_workdir, init.lm_hf_path),
                                  ("vision", init.vision_workdir, init.vision_hf_path)):
    if workdir and hf_path:
      raise ValueError(f"config.init: set {tower}_workdir or {tower}_hf_path, not both")
  towers = []
  if init.lm_workdir:
    towers.append(Pretrained(init.lm_workdir, "config.init.lm_workdir", "lm_pretrain", "lm",
                             source="", target="lm"))
  if init.lm_hf_path:
    towers.append(Pretrained(init.lm_hf_path, "config.init.lm_hf_path", "", "lm", source="",
                             target="lm", hf_loader=convert.load_hf_lm_weights))
  if init.vision_workdir:
    towers.append(Pretrained(init.vision_workdir, "config.init.vision_workdir", "vision_pretrain",
                             "vision", source="vision", target="vision"))
  if init.vision_hf_path:
    towers.append(Pretrained(init.vision_hf_path, "config.init.vision_hf_path", "", "vision",
                             source="", target="vision",
                             hf_loader=convert.load_hf_vision_weights))
  return towers


def build_tower(config: ml_collections.ConfigDict, model_key: str) -> nnx.Module:
  """The Flamingo stage's frozen ``lm`` or ``vision`` tower on its own (for loading weights)."""
  rngs = nnx.Rngs(config.seed)
  if model_key == "lm":
    return DecoderLM(config.model.lm, rngs=rngs, **_dtypes(config))
  return VisionEncoder(config.model.vision, rngs=rngs, **_dtypes(config))


def vision_feature_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The frozen vision tower's output for one image, ``(P, D)``: what a feature cache for this
  config must hold (traced, so it follows every ``config.model.vision`` field)."""
  vision = config.model.vision
  tower = nnx.eval_shape(lambda: build_tower(config, "vision"))
  pixels = jax.ShapeDtypeStruct((1, vision.image_size, vision.image_size, vision.num_channels),
                                jnp.float32)
  return tuple(nnx.eval_shape(lambda module, x: module(x), tower, pixels).shape[1:])


def _gate_metrics(config, params) -> dict[str, jax.Array]:
  """tanh of both gates of every gated block, keyed by the LM layer it precedes."""
  metrics = {}
  for slot, layer in enumerate(flamingo_lib.gated_layers(config.model)):
    block = params["gated_blocks"][slot]
    metrics[f"gate/attn/layer_{layer:02d}"] = jnp.tanh(block["attn_gate"][...])
    metrics[f"gate/ffw/layer_{layer:02d}"] = jnp.tanh(block["ffw_gate"][...])
  return metrics


FLAMINGO = Stage(
    name="flamingo",
    build_model=lambda config, rngs: flamingo_lib.Flamingo(config.model, rngs=rngs),
    trainable=lambda config: flamingo_lib.trainable_params(config.model),
    loss_sum=_flamingo_loss,
    normalizer=supervised_tokens,
    splits_into_microbatches=True,
    pretrained=_flamingo_pretrained,
    model_metrics=_gate_metrics,
)

_STAGES = {stage.name: stage for stage in (LM_PRETRAIN, VISION_PRETRAIN, FLAMINGO)}


def frozen_vision_tower(config: ml_collections.ConfigDict) -> Pretrained | None:
  """The pretrained vision tower the Flamingo stage of ``config`` loads and freezes
  (``config.init.vision_workdir``, ``vision_hf_path`` or the tower of ``flamingo_workdir``), or
  None when it sets none."""
  if config.init.flamingo_workdir:
    return Pretrained(config.init.flamingo_workdir, "config.init.flamingo_workdir", "flamingo",
                      "vision", source="vision", target="vision")
  return next((t for t in FLAMINGO.pretrained(config) if t.target == "vision"), None)


def get_stage(name: str) -> Stage:
  if name not in _STAGES:
    raise ValueError(f"config.stage: expected one of {STAGES}, got {name!r}")
  return _STAGES[name]
