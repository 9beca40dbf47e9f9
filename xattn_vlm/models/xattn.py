"""Masked cross-attention from text to media latents, and the gated cross-attention dense block.

The masking rule lives in ``media_locations`` and ``cross_attention_mask`` and nowhere else:
``media_index[t] = cumsum(token == <image>)[t]``; with ``only_attend_immediate_media`` token t sees
only the latents of image ``media_index[t]``, otherwise all images ``1..media_index[t]``. Tokens before
the first image (``media_index == 0``) see nothing and get exactly zero cross-attention output.
A model with a document-end token (IDEFICS's ``</s>``) also sets ``media_index`` to 0 for the tokens
after that token up to the next ``<image>``: a new document starts there and has no image yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from xattn_vlm.models import layers


def media_locations(input_ids: jax.Array, media_token_id: int,
                    document_end_token_id: int | None = None) -> jax.Array:
  """``media_index`` [B, L]: how many ``<image>`` tokens occur at or before each position, or 0
  where a ``document_end_token_id`` token stands after the latest ``<image>`` (strictly before
  the position: the document-end token itself still sees its document's image)."""
  media_index = jnp.cumsum(input_ids == media_token_id, axis=-1, dtype=jnp.int32)
  if document_end_token_id is None:
    return media_index
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  last_media = jax.lax.cummax(jnp.where(input_ids == media_token_id, positions, -1),
                              axis=input_ids.ndim - 1)
  last_end = jax.lax.cummax(jnp.where(input_ids == document_end_token_id, positions, -1),
                            axis=input_ids.ndim - 1)
  end_before = jnp.concatenate([jnp.full_like(last_end[..., :1], -1), last_end[..., :-1]], axis=-1)
  return jnp.where(end_before > last_media, 0, media_index)


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


def make_norm(kind: str, dim: int, *, eps: float, axes=("embed",), **kw):
  """``layernorm`` (with bias) or ``rmsnorm`` over ``dim``."""
  if kind == "rmsnorm":
    return layers.RMSNorm(dim, eps=eps, axes=axes, **kw)
  if kind == "layernorm":
    return layers.LayerNorm(dim, eps=eps, axes=axes, **kw)
  raise ValueError(f"xattn norm must be 'layernorm' or 'rmsnorm', got {kind!r}")


class MaskedCrossAttention(nnx.Module):
  """Text queries (normed) attend to media latents; keys/values are projected from the latents
  once per prompt (``project_media``) so decoding reuses them. ``qk_norm`` norms each head of the
  queries and keys (IDEFICS)."""

  def __init__(self, dim: int, dim_visual: int, *, num_heads: int, head_dim: int, norm_eps: float,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
               norm: str = "layernorm", qk_norm: bool = False, attention: str = "auto"):
    self.attention = layers.check_attention(attention)
    kw = dict(rngs=rngs, use_bias=False, dtype=dtype, param_dtype=param_dtype)
    norm_kw = dict(eps=norm_eps, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = make_norm(norm, dim, **norm_kw)
    self.query = layers.Dense(dim, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.key = layers.Dense(dim_visual, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.value = layers.Dense(dim_visual, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.out = layers.Dense((num_heads, head_dim), dim, ("heads", "kv", "embed"), **kw)
    self.q_norm = make_norm(norm, head_dim, axes=("kv",), **norm_kw) if qk_norm else None
    self.k_norm = make_norm(norm, head_dim, axes=("kv",), **norm_kw) if qk_norm else None

  def project_media(self, latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """latents [B, T, n, Dv] -> keys, values [B, H, T*n, Dh] (heads first, as decoding keeps
    them: ``layers.attend``)."""
    b, t, n, dv = latents.shape
    flat = latents.reshape(b, t * n, dv)
    keys = self.key(flat)
    if self.k_norm is not None:
      keys = self.k_norm(keys)
    return layers.heads_first(keys), layers.heads_first(self.value(flat))

  def __call__(self, x: jax.Array, media_kv: tuple[jax.Array, jax.Array],
               mask: jax.Array) -> jax.Array:
    """x [B, L, D]; media_kv from ``project_media``; mask [B, L, T*n] -> [B, L, D]."""
    keys, values = media_kv
    q = self.query(self.norm(x))
    if self.q_norm is not None:
      q = self.q_norm(q)
    attended = layers.attend(q, keys, values, mask, attention=self.attention)
    out = self.out(attended)
    sees_media = mask.any(axis=-1, keepdims=True)  # [B, L, 1]
    return jnp.where(sees_media, out, jnp.zeros_like(out))


class GatedCrossAttentionBlock(nnx.Module):
  """``y += tanh(a_attn) * xattn(y, latents)``, then ``y += tanh(a_ffw) * ffw(norm(y))``; both
  gates start at 0, so at initialisation the block is the identity, bit for bit.

  The feed-forward is ``ffw_dim`` wide (default ``ff_mult * dim``), SwiGLU-style when ``gated_ffw``
  (IDEFICS), without biases; ``norm`` is the kind of both norms (and of the q/k norms);
  ``attention`` is ``config.model.attention`` (``layers.attend``).
  """

  def __init__(self, dim: int, dim_visual: int, *, num_heads: int, head_dim: int, ff_mult: int,
               activation: str, norm_eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, norm: str = "layernorm", qk_norm: bool = False,
               ffw_dim: int | None = None, gated_ffw: bool = False, attention: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attn = MaskedCrossAttention(dim, dim_visual, num_heads=num_heads, head_dim=head_dim,
                                     norm_eps=norm_eps, norm=norm, qk_norm=qk_norm,
                                     attention=attention, **kw)
    self.attn_gate = layers.param(rngs, nnx.initializers.zeros, (), (), param_dtype)
    self.ffw_norm = make_norm(norm, dim, eps=norm_eps, **kw)
    self.ffw = layers.MLP(dim, ffw_dim or dim * ff_mult, act=activation, gated=gated_ffw,
                          use_bias=False, **kw)
    self.ffw_gate = layers.param(rngs, nnx.initializers.zeros, (), (), param_dtype)

  def __call__(self, y: jax.Array, media_kv: tuple[jax.Array, jax.Array],
               mask: jax.Array) -> jax.Array:
    y = layers.constrain(y, layers.batch_axes(y))
    y = y + jnp.tanh(self.attn_gate[...]).astype(y.dtype) * self.attn(y, media_kv, mask)
    y = y + jnp.tanh(self.ffw_gate[...]).astype(y.dtype) * self.ffw(self.ffw_norm(y))
    return layers.constrain(y, layers.batch_axes(y))
