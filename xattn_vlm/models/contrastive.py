"""A CLIP-style dual encoder: the vision tower that Flamingo later freezes, pretrained
contrastively against a small causal text transformer (the paper pretrains its NFNet this way).

Images: the ViT's patch features, mean-pooled, projected. Text: a ``DecoderLM`` read at the last
real token (a causal model has seen the whole caption there), projected. Both embeddings are
L2-normalised; ``logit_scale`` is CLIP's learned inverse temperature (stored as a log).
The ``vision`` submodule has exactly ``Flamingo.vision``'s structure, so its parameters load
into the Flamingo stage unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from xattn_vlm.models import layers
from xattn_vlm.models.lm import DecoderLM
from xattn_vlm.models.vision import VisionEncoder

MAX_LOGIT_SCALE = 100.0  # CLIP clips exp(logit_scale) here for stability


def _normalise(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class DualEncoder(nnx.Module):
  """``(pixels [B, H, W, C], input_ids [B, L], attention_mask [B, L]) -> (image_emb, text_emb)``,
  each [B, embed_dim], unit norm, float32.

  Token ids at or above the text tower's vocabulary (Flamingo's ``<image>`` and
  ``<|endofchunk|>``, present in pipeline examples) are treated as padding.
  """

  def __init__(self, vision: ml_collections.ConfigDict, text: ml_collections.ConfigDict, *,
               embed_dim: int, init_temperature: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str | bool = "none", attention: str = "auto"):
    if not 0 < init_temperature < 1:
      raise ValueError(f"init_temperature must be in (0, 1), got {init_temperature}")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.vision = VisionEncoder(vision, remat=remat, attention=attention, **kw)
    self.text = DecoderLM(text, remat=remat, attention=attention, **kw)
    self.image_projection = layers.Dense(vision.width, embed_dim, ("embed", None), use_bias=False,
                                         **kw)
    self.text_projection = layers.Dense(text.embed_dim, embed_dim, ("embed", None),
                                        use_bias=False, **kw)
    self.logit_scale = layers.param(rngs, nnx.initializers.constant(math.log(1 / init_temperature)),
                                    (), (), param_dtype)
    self.text_vocab_size = text.vocab_size

  def encode_image(self, pixels: jax.Array) -> jax.Array:
    features = self.vision(pixels)  # [B, P, D]
    return _normalise(self.image_projection(features.mean(axis=1)))

  def encode_text(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    valid = attention_mask.astype(bool) & (input_ids < self.text_vocab_size)
    ids = jnp.where(valid, input_ids, 0)
    hidden, _ = self.text.forward_embeddings(
        self.text.embed_tokens(ids), layers.default_positions(valid), valid.astype(jnp.int32))
    last = jnp.max(jnp.where(valid, jnp.arange(ids.shape[1]), 0), axis=1)  # [B]
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    return _normalise(self.text_projection(pooled))

  def scale(self) -> jax.Array:
    """exp(logit_scale), clipped at ``MAX_LOGIT_SCALE``."""
    return jnp.minimum(jnp.exp(self.logit_scale[...].astype(jnp.float32)), MAX_LOGIT_SCALE)

  def __call__(self, pixels: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.encode_image(pixels), self.encode_text(input_ids, attention_mask)
