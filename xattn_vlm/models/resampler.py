"""The Perceiver resampler (Flamingo, Alayrac et al. 2022, section 2.1 and appendix A.1.1).

It turns the variable number of vision features of one medium (an image, or all frames of a video)
into a fixed set of ``num_latents`` tokens that the gated cross-attention blocks read. Learned
latents attend to ``concat(media tokens, latents)``; learned frame-time and media-time embeddings,
when the config has them, are the only position information (no spatial encoding, as in the
paper). Each medium is resampled on its own: no attention crosses media.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from xattn_vlm.models import remat as remat_lib
from xattn_vlm.models import scan
from xattn_vlm.models.layers import (MLP, Dense, LayerNorm, batch_axes, check_attention,
                                     constrain, dot_product_attention, materialize_gradient,
                                     param)

NORM_EPS = 1e-5  # torch's LayerNorm default, which the reference implementations use


def interpolate_frame_embeddings(table: jax.Array, num_frames: int) -> jax.Array:
  """``num_frames`` frame-time embeddings from a learned ``[max_num_frames, D]`` table.

  Up to ``max_num_frames`` frames use the first rows. More frames (inference on longer clips than
  training, as Flamingo does with 30 frames after training on 8) get the table linearly
  interpolated to ``num_frames`` evenly spaced points, so the first and last frames get exactly
  the first and last learned rows.
  """
  max_frames = table.shape[0]
  if num_frames <= max_frames:
    return table[:num_frames]
  position = jnp.linspace(0.0, max_frames - 1, num_frames)  # [F] in table coordinates
  lower = jnp.clip(jnp.floor(position).astype(jnp.int32), 0, max_frames - 1)
  upper = jnp.minimum(lower + 1, max_frames - 1)
  frac = (position - lower)[:, None].astype(table.dtype)
  return table[lower] * (1 - frac) + table[upper] * frac


class PerceiverAttention(nnx.Module):
  """Latents attend to ``concat(media tokens, latents)``; q/k/v/out projections have no bias.
  ``qk_norm`` LayerNorms each head of the queries and keys (IDEFICS)."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *, rngs: nnx.Rngs, dtype,
               param_dtype, qk_norm: bool = False, attention: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attention = check_attention(attention)
    self.norm_media = LayerNorm(width, eps=NORM_EPS, **kw)
    self.norm_latents = LayerNorm(width, eps=NORM_EPS, **kw)
    heads = (num_heads, head_dim)
    self.to_q = Dense(width, heads, ("embed", "heads", "kv"), use_bias=False, **kw)
    self.to_k = Dense(width, heads, ("embed", "heads", "kv"), use_bias=False, **kw)
    self.to_v = Dense(width, heads, ("embed", "heads", "kv"), use_bias=False, **kw)
    self.to_out = Dense(heads, width, ("heads", "kv", "embed"), use_bias=False, **kw)
    self.q_norm = LayerNorm(head_dim, eps=NORM_EPS, axes=("kv",), **kw) if qk_norm else None
    self.k_norm = LayerNorm(head_dim, eps=NORM_EPS, axes=("kv",), **kw) if qk_norm else None

  def _keys(self, x: jax.Array) -> jax.Array:
    k = self.to_k(x)
    return k if self.k_norm is None else self.k_norm(k)

  def _queries(self, x: jax.Array) -> jax.Array:
    q = self.to_q(x)
    return q if self.q_norm is None else self.q_norm(q)

  def __call__(self, media: jax.Array, latents: jax.Array,
               media_mask: jax.Array | None) -> jax.Array:
    """media: [M, S, D]; latents: [M, n, D], or [n, D] when every medium has the same latents (the
    learned ones, at the first layer: their norm and projections then run once instead of M
    times); media_mask: bool [M, S] or None. Returns [M, n, D]."""
    m = media.shape[0]
    per_medium = lambda x: jnp.broadcast_to(x, (m,) + x.shape[-3:])  # [(M,) n, H, Dh] -> [M, ...]
    media = self.norm_media(media)
    latents = self.norm_latents(latents)
    # Keys and values over concat(media, latents), each part projected on its own.
    keys = jnp.concatenate([self._keys(media), per_medium(self._keys(latents))], axis=1)
    values = jnp.concatenate([self.to_v(media), per_medium(self.to_v(latents))], axis=1)
    mask = None
    if media_mask is not None:
      # The latents are always valid keys, so no query row is ever fully masked.
      latent_keys = jnp.ones((m, latents.shape[-2]), bool)
      mask = jnp.concatenate([media_mask, latent_keys], axis=1)[:, None, :]  # [M, 1, S + n]
    out = dot_product_attention(per_medium(self._queries(latents)), keys, values, mask,
                                attention=self.attention)
    return self.to_out(out)


class FeedForward(nnx.Module):
  """``mlp(norm(x))`` with bias-free projections, as in the Flamingo resampler."""

  def __init__(self, width: int, ff_mult: int, act: str, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = LayerNorm(width, eps=NORM_EPS, **kw)
    self.mlp = MLP(width, ff_mult * width, act=act, gated=False, use_bias=False, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.mlp(self.norm(x))


class PerceiverResamplerLayer(nnx.Module):
  """``latents += attn(media, latents)``; ``latents += ff(latents)``."""

  def __init__(self, cfg: ml_collections.ConfigDict, width: int, *, rngs: nnx.Rngs, dtype,
               param_dtype, attention: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attn = PerceiverAttention(width, cfg.num_heads, cfg.head_dim, qk_norm=cfg.qk_norm,
                                   attention=attention, **kw)
    self.ff = FeedForward(width, cfg.ff_mult, cfg.activation, **kw)

  def __call__(self, media: jax.Array, latents: jax.Array,
               media_mask: jax.Array | None) -> jax.Array:
    latents = constrain(latents, batch_axes(latents))
    latents = latents + self.attn(media, latents, media_mask)
    latents = latents + self.ff(latents)
    return constrain(latents, batch_axes(latents))


class PerceiverResampler(nnx.Module):
  """``features [B, T, F, P, input_dim] -> latents [B, T, num_latents, width]``.

  B samples, T media per sample, F frames per medium (1 for images), P vision tokens per frame.
  The width is ``cfg.width`` or, when that is None, ``input_dim``. When the two differ a bias-free
  input projection maps the features to the width first: the latents, the attention residual
  stream and the keys/values all live at one width (Flamingo runs its resampler at 1536 wide over
  wider vision features). ``attention`` is ``config.model.attention`` (``layers.attend``);
  ``scan_layers`` stacks the layers and runs them under ``lax.scan`` (``models.scan``), each
  under the ``remat`` policy (``models.remat``).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, input_dim: int, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32, attention: str = "auto",
               scan_layers: bool = False, remat: str | bool = "none"):
    width = cfg.width or input_dim
    self.input_dim = input_dim
    self.width = width
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.input_proj = (Dense(input_dim, width, (None, "embed"), use_bias=False, **kw)
                       if width != input_dim else None)
    # Latents start at unit scale as in the reference implementations; the time embeddings start
    # small so that at initialisation they barely move the (LayerNorm-scale) vision features.
    self.latents = param(rngs, nnx.initializers.normal(1.0), (cfg.num_latents, width),
                         ("latents", "embed"), param_dtype)
    # Without ``max_num_frames`` (OpenFlamingo, IDEFICS) nothing tells a video's frames apart:
    # their tokens form one unordered set of keys.
    self.frame_embs = (param(rngs, nnx.initializers.normal(0.02), (cfg.max_num_frames, width),
                             (None, "embed"), param_dtype) if cfg.max_num_frames else None)
    # Without ``max_num_media`` (OpenFlamingo's default) an image's latents do not depend on its
    # slot in the sequence, so prompts may hold more images than training documents did.
    self.media_time_embs = (
        param(rngs, nnx.initializers.normal(0.02), (cfg.max_num_media, width),
              ("media", "embed"), param_dtype) if cfg.max_num_media else None)
    resampler_layers = [PerceiverResamplerLayer(cfg, width, attention=attention, **kw)
                        for _ in range(cfg.depth)]
    self.scan_layers = scan_layers and bool(resampler_layers)
    self.remat = remat_lib.policy_name(remat)
    self.layers = (scan.stack_modules(resampler_layers) if self.scan_layers
                   else nnx.List(resampler_layers))
    self.norm = LayerNorm(width, eps=NORM_EPS, **kw)

  def __call__(self, features: jax.Array, media_mask: jax.Array | None = None) -> jax.Array:
    """features: [B, T, F, P, input_dim], or [B, T, P, input_dim] for images (one frame each:
    an image is exactly a 1-frame video, frame-time embedding 0 included when there is one).

    media_mask: optional bool ``[B, T, F]`` (or ``[B, T]``, broadcast over frames), True where a
    frame is real. Tokens of masked frames (padding of shorter videos, or padded media slots) are
    not attended to; a fully masked medium's latents are computed from the latents alone and stay
    finite. Frame-time embeddings are indexed by position in the padded F axis.
    """
    if features.ndim not in (4, 5) or features.shape[-1] != self.input_dim:
      raise ValueError(f"features must have shape [B, T, F, P, {self.input_dim}] (or "
                       f"[B, T, P, {self.input_dim}] for images; input_dim={self.input_dim}), got "
                       f"{tuple(features.shape)}")
    if features.ndim == 4:
      features = features[:, :, None]
    b, t, f, p, _ = features.shape
    if self.media_time_embs is not None and t > self.media_time_embs.shape[0]:
      raise ValueError(f"features hold {t} media per sample (axis 1 of shape "
                       f"{tuple(features.shape)}), more than "
                       f"max_num_media={self.media_time_embs.shape[0]}")
    if media_mask is not None:
      if media_mask.shape == (b, t):
        media_mask = media_mask[:, :, None]
      if media_mask.shape not in ((b, t, f), (b, t, 1)):
        raise ValueError(f"media_mask must have shape [B, T, F]={(b, t, f)} or [B, T]={(b, t)} "
                         f"for features of shape {tuple(features.shape)}, got "
                         f"{tuple(media_mask.shape)}")
      # Every token of a frame shares the frame's flag.
      media_mask = jnp.broadcast_to(media_mask.astype(bool)[..., None], (b, t, f, p))
      media_mask = media_mask.reshape(b * t, f * p)

    x = features.astype(self.dtype)
    if self.input_proj is not None:
      x = self.input_proj(x)
    if self.frame_embs is not None:
      frame_embs = interpolate_frame_embeddings(self.frame_embs[...], f).astype(self.dtype)
      x = x + frame_embs[:, None, :]  # [F, 1, D] over [B, T, F, P, D]
    x = x.reshape(b, t, f * p, self.width)  # all frames of one medium form one key sequence
    if self.media_time_embs is not None:
      x = x + self.media_time_embs[:t].astype(self.dtype)[:, None, :]  # [T, 1, D]

    media = x.reshape(b * t, f * p, self.width)  # media resampled independently
    latents = self.latents[...].astype(self.dtype)  # [n, D], the same for every medium
    step = lambda layer, latents: layer(media, materialize_gradient(latents), media_mask)
    if self.scan_layers:
      # A scan keeps each layer's residuals (the normalised media and their keys and values,
      # [M, S, D] each) for the backward pass, where the unrolled layers leave XLA free to
      # recompute them; remat bounds that. The carry keeps one shape: every medium's latents.
      latents = scan.run(self.layers, remat_lib.rematerialise(step, self.remat),
                         jnp.broadcast_to(latents, (media.shape[0], *latents.shape)))
    else:
      for layer in self.layers:
        latents = step(layer, latents)  # [B*T, n, D]
    return self.norm(latents).reshape(b, t, -1, self.width)
