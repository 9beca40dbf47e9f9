"""Masked cross-attention from text to media latents, and the gated cross-attention dense block.

The masking rule lives in ``cross_attention_mask`` and nowhere else:
``media_index[t] = cumsum(token == <image>)[t]``; with ``only_attend_immediate_media`` token t sees
only the latents of image ``media_index[t]``, otherwise all images ``1..media_index[t]``. Tokens before
the first image (``media_index == 0``) see nothing and get exactly zero cross-attention output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xattn_vlm.models import layers


def media_locations(input_ids: jax.Array, media_token_id: int) -> jax.Array:
  """``media_index`` [B, L]: how many ``<image>`` tokens occur at or before each position."""
  return jnp.cumsum(input_ids == media_token_id, axis=-1, dtype=jnp.int32)


def cross_attention_mask(media_index: jax.Array, num_media: int, num_latents: int,
                         only_attend_immediate_media: bool) -> jax.Array:
  """Which media latents each text token may attend to: bool [B, L, num_media * num_latents].

  Keys are the latents of media 1..num_media in order (num_latents each); media_index is 1-based,
  so a token with media_index 0 attends to nothing.
  """
  key_media = jnp.repeat(jnp.arange(1, num_media + 1, dtype=jnp.int32), num_latents)  # [T*n]
  query_media = media_index[..., None]  # [B, L, 1]
  if only_attend_immediate_media:
    return key_media == query_media
  return key_media <= query_media


class MaskedCrossAttention(nnx.Module):
  """Text queries (LayerNorm'd) attend to media latents; keys/values are projected from the
  latents once per prompt (``project_media``) so decoding reuses them."""

  def __init__(self, dim: int, dim_visual: int, *, num_heads: int, head_dim: int, norm_eps: float,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    self.norm = layers.LayerNorm(dim, eps=norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.query = layers.Dense(dim, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.key = layers.Dense(dim_visual, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.value = layers.Dense(dim_visual, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.out = layers.Dense((num_heads, head_dim), dim, ("heads", "kv", "embed"), **kw)

  def project_media(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """latents [B, T, n, Dv] -> keys, values [B, H, T*n, Dh] (heads first, as decoding keeps
    them: ``layers.attend``)."""
    b, t, n, dv = latents.shape
    flat = latents.reshape(b, t * n, dv)
    return layers.heads_first(self.key(flat)), layers.heads_first(self.value(flat))

  def __call__(self, x: jax.Array, media_kv: tuple[jax.Array, jax.Array],
               mask: jax.Array) -> jax.Array:
    """x [B, L, D]; media_kv from ``project_media``; mask [B, L, T*n] -> [B, L, D]."""
    keys, values = media_kv
    q = self.query(self.norm(x))
    attended = layers.attend(q, keys, values, mask)
    out = self.out(attended)
    sees_media = mask.any(axis=-1, keepdims=True)  # [B, L, 1]
    return jnp.where(sees_media, out, jnp.zeros_like(out))


class GatedCrossAttentionBlock(nnx.Module):
  """``y += tanh(a_attn) * xattn(y, latents)``, then ``y += tanh(a_ffw) * ffw(y)``; both gates start
  at 0, so at initialisation the block is the identity, bit for bit."""

  def __init__(self, dim: int, dim_visual: int, *, num_heads: int, head_dim: int, ff_mult: int,
               activation: str, norm_eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    self.attn = MaskedCrossAttention(dim, dim_visual, num_heads=num_heads, head_dim=head_dim,
                                     norm_eps=norm_eps, rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype)
    self.attn_gate = layers.param(rngs, nnx.initializers.zeros, (), (), param_dtype)
    self.ffw_norm = layers.LayerNorm(dim, eps=norm_eps, rngs=rngs, dtype=dtype,
                                     param_dtype=param_dtype)
    self.ffw = layers.MLP(dim, dim * ff_mult, act=activation, gated=False, use_bias=False,
                          rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.ffw_gate = layers.param(rngs, nnx.initializers.zeros, (), (), param_dtype)

  def __call__(self, y: jax.Array, media_kv: tuple[jax.Array, jax.Array],
               mask: jax.Array) -> jax.Array:
    y = y + jnp.tanh(self.attn_gate[...]).astype(y.dtype) * self.attn(y, media_kv, mask)
    y = y + jnp.tanh(self.ffw_gate[...]).astype(y.dtype) * self.ffw(self.ffw_norm(y))
    return y
