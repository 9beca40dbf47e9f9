"""Decoder-only language models (GPT-2, the LLaMA family, MPT, GPT-NeoX) with an explicit KV cache.

The Flamingo composition freezes one of these and inserts gated cross-attention blocks between its
layers, so the forward pass is split into pieces it can drive: ``embed_tokens`` (token table only),
``forward_embeddings`` (the single layer loop, with a ``before_block`` hook) and ``logits``.

Decoding state lives in ``LMCache``, a pytree passed in and returned, never stored on a module.
Attention is causal over cache *slot order*: the query written at slot ``t`` sees the slots ``<= t``
that hold real tokens. Positions (for RoPE or GPT-2's table) are always given by the caller, so a
left-padded prompt keeps the positions it would have unpadded. MPT has no positions: its ALiBi bias
is a function of the slots, padding included, exactly as in its reference code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax import struct

from xattn_vlm.models import layers
from xattn_vlm.models import remat as remat_lib
from xattn_vlm.models import scan
from xattn_vlm.models.config import LM_FAMILIES

ROPE_FAMILIES = ("llama", "gpt_neox")


@struct.dataclass
class LMCache:
  """Keys and values of every self-attention layer, for prefill and step-by-step decoding.

  k, v: one array per layer, each [B, Hkv, S_max, Dh] (after RoPE): heads first, the layout
    ``layers.attend`` reads without a transpose.
  key_valid: bool [B, S_max], which slots hold a real (non-padding) token.
  index: int32 scalar, the next slot to write; a call with L tokens writes [index, index + L).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  key_valid: jax.Array
  index: jax.Array

  @property
  def max_length(self) -> int:
    return self.key_valid.shape[1]


def causal_mask(key_valid: jax.Array, index: jax.Array | int, length: int,
                prefix_end: jax.Array | None = None) -> jax.Array:
  """Which keys each of ``length`` new queries may attend to. bool [B, L, S].

  Query j sits at slot ``index + j`` and sees slot s iff ``s <= index + j`` and ``key_valid[:, s]``.
  Without a cache the slots are the input positions (``index`` 0, ``key_valid`` the attention mask).
  With ``prefix_end`` (int [B], a prefix LM) the slots before it also see each other both ways:
  query slot q sees s iff ``s <= max(q, prefix_end - 1)``.
  """
  query_slots = index + jnp.arange(length)  # [L]
  key_slots = jnp.arange(key_valid.shape[1])  # [S]
  if prefix_end is None:
    return key_valid[:, None, :] & (key_slots[None, :] <= query_slots[:, None])[None]
  limit = jnp.maximum(query_slots[None, :], jnp.asarray(prefix_end)[:, None] - 1)  # [B, L]
  return key_valid[:, None, :] & (key_slots[None, None, :] <= limit[..., None])


class SelfAttention(nnx.Module):
  """Causal multi-head self-attention with grouped-query heads (``num_kv_heads``) and a KV cache.

  Biases on q, k, v when ``attention_bias``; on the output too for GPT-2 and GPT-NeoX (the LLaMA
  family puts them on q, k, v only, as Qwen2). The LLaMA family and GPT-NeoX rotate q and k with
  RoPE (GPT-NeoX over the first ``rotary_fraction`` of each head); MPT adds its ALiBi bias and,
  with ``qk_norm``, LayerNorms q and k over their full width before the heads are split
  (MosaicGPT's ``attn_qk_ln``).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention: str = "auto"):
    d, h, hkv, dh = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.attention = layers.check_attention(attention)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    qkv_axes = ("embed", "heads", "kv")
    self.query = layers.Dense(d, (h, dh), qkv_axes, use_bias=cfg.attention_bias, **kw)
    self.key = layers.Dense(d, (hkv, dh), qkv_axes, use_bias=cfg.attention_bias, **kw)
    self.value = layers.Dense(d, (hkv, dh), qkv_axes, use_bias=cfg.attention_bias, **kw)
    self.out = layers.Dense((h, dh), d, ("heads", "kv", "embed"),
                            use_bias=cfg.attention_bias and cfg.family in ("gpt2", "gpt_neox"),
                            **kw)
    self.rope_theta = cfg.rope_theta if cfg.family in ROPE_FAMILIES else None
    self.rotary_dim = int(dh * cfg.rotary_fraction)
    norm = dict(eps=cfg.norm_eps, use_bias=False, **kw)
    self.q_norm = layers.LayerNorm(h * dh, **norm) if cfg.qk_norm else None
    self.k_norm = layers.LayerNorm(hkv * dh, **norm) if cfg.qk_norm else None

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | int = 0,
               bias: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """x: [B, L, D]; mask: bool [B, L, S]; kv: this layer's cache (k, v), each [B, Hkv, S, Dh];
    bias: ALiBi's [H, L, S] or None.

    Returns the attention output [B, L, D] and the cache with the L new keys/values written at
    slots [index, index + L) (None without a cache).
    """
    q, k, v = self.query(x), self.key(x), self.value(x)  # [B, L, H or Hkv, Dh]
    if self.q_norm is not None:
      q = self.q_norm(q.reshape(q.shape[:2] + (-1,))).reshape(q.shape)
      k = self.k_norm(k.reshape(k.shape[:2] + (-1,))).reshape(k.shape)
    if self.rope_theta is not None:
      q = layers.apply_rope(q, positions, self.rope_theta, self.rotary_dim)
      k = layers.apply_rope(k, positions, self.rope_theta, self.rotary_dim)
    k, v = layers.heads_first(k), layers.heads_first(v)
    if kv is not None:
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, index, 0))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
      kv = (k, v)
    return self.out(layers.attend(q, k, v, mask, bias, attention=self.attention)), kv


class DecoderBlock(nnx.Module):
  """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``; with
  ``parallel_residual`` (GPT-NeoX's switch) both read x: ``x + attn(norm1(x)) + mlp(norm2(x))``.

  Norms: LayerNorm (GPT-2, GPT-NeoX; MPT's without bias) or RMSNorm (LLaMA). MLP: SwiGLU without
  biases (LLaMA); GELU with biases (GPT-2, GPT-NeoX) or without (MPT).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = make_norm(cfg, **kw)
    self.attn = SelfAttention(cfg, attention=attention, **kw)
    self.mlp_norm = make_norm(cfg, **kw)
    self.mlp = layers.MLP(cfg.embed_dim, cfg.mlp_dim, act=cfg.activation,
                          gated=cfg.family == "llama", use_bias=cfg.family in ("gpt2", "gpt_neox"),
                          **kw)
    self.parallel_residual = cfg.parallel_residual

  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               kv: tuple[jax.Array, jax.Array] | None = None, index: jax.Array | int = 0,
               bias: jax.Array | None = None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    x = layers.constrain(x, layers.batch_axes(x))
    h, kv = self.attn(self.attn_norm(x), positions, mask, kv, index, bias)
    if self.parallel_residual:
      x = x + h + self.mlp(self.mlp_norm(x))
    else:
      x = x + h
      x = x + self.mlp(self.mlp_norm(x))
    return layers.constrain(x, layers.batch_axes(x)), kv


def make_norm(cfg: ml_collections.ConfigDict, **kw) -> layers.LayerNorm | layers.RMSNorm:
  """The family's norm over ``embed_dim``: RMSNorm (LLaMA), LayerNorm without bias (MPT) or with."""
  if cfg.family == "llama":
    return layers.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, **kw)
  return layers.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, use_bias=cfg.family != "mpt", **kw)


@dataclasses.dataclass(frozen=True)
class Inserted:
  """Blocks a caller runs before some of the LM's blocks (Flamingo's gated blocks).

  layers: the LM blocks they run before, ascending.
  apply: ``(j, h) -> h`` runs the j-th of them.
  stacked, apply_stacked: optional; ``stacked()`` gives their per-block inputs (parameters,
    media keys and values) stacked along a leading axis, and ``apply_stacked(inputs_j, h)`` runs
    one from its slice. With them a scanned LM scans whole groups (an inserted block and the LM
    blocks up to the next one) instead of scanning each run of LM blocks on its own.
  """
  layers: Sequence[int]
  apply: Callable[[int, jax.Array], jax.Array]
  stacked: Callable[[], Any] | None = None
  apply_stacked: Callable[[Any, jax.Array], jax.Array] | None = None


class DecoderLM(nnx.Module):
  """A decoder-only LM selected by ``cfg.family`` (an ``lm_config``).

  ``gpt2``: learned position table, LayerNorm, tanh-GELU MLP, biases, tied head by default.
  ``llama`` (also Mistral and Qwen2): RoPE, RMSNorm, SwiGLU, grouped-query attention, optional
  q/k/v biases, optional tied head.
  ``mpt``: ALiBi, no positions, no biases (LayerNorm included), exact GELU, tied head, optional
  full-width q/k LayerNorm.
  ``gpt_neox``: rotary over ``rotary_fraction`` of each head, LayerNorm and biases everywhere,
  GELU, optional parallel residual, untied head.

  ``scan_layers``: the blocks' parameters are stacked along a leading ``layers`` axis (the same
  initial values) and the forward without a cache runs them under ``lax.scan``, so a deep LM
  traces and compiles one block instead of all; decoding with a cache slices them one by one.
  Hugging Face, OpenFlamingo and IDEFICS imports fill the unrolled layout only.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str | bool = "none", attention: str = "auto",
               scan_layers: bool = False):
    if cfg.family not in LM_FAMILIES:
      raise ValueError(f"cfg.family must be one of {LM_FAMILIES}, got {cfg.family!r}")
    if cfg.num_heads % cfg.num_kv_heads:
      raise ValueError(f"cfg.num_heads ({cfg.num_heads}) must be a multiple of cfg.num_kv_heads "
                       f"({cfg.num_kv_heads})")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cfg = cfg
    self.dtype = dtype
    self.remat = remat_lib.policy_name(remat)
    self.token_embed = layers.Embed(cfg.vocab_size, cfg.embed_dim, **kw)
    self.position_embed = (layers.Embed(cfg.max_length, cfg.embed_dim, axes=(None, "embed"), **kw)
                           if cfg.family == "gpt2" else None)
    blocks = [DecoderBlock(cfg, attention=attention, **kw) for _ in range(cfg.num_layers)]
    self.scan_layers = scan_layers
    self.blocks = scan.stack_modules(blocks) if scan_layers else nnx.List(blocks)
    self.final_norm = make_norm(cfg, **kw)
    self.alibi_bias_max = cfg.alibi_bias_max if cfg.family == "mpt" else None
    self.lm_head = (None if cfg.tie_word_embeddings else
                    layers.Dense(cfg.embed_dim, cfg.vocab_size, ("embed", "vocab"),
                                 use_bias=False, **kw))

  def embed_tokens(self, input_ids: jax.Array) -> jax.Array:
    """Token-table lookup only (GPT-2's positions are added in ``forward_embeddings``). [B, L, D].

    Ids must be < ``vocab_size``; that cannot be checked under jit.
    """
    return self.token_embed(input_ids)

  def forward_embeddings(self, x: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                         cache: LMCache | None = None, inserted: Inserted | None = None,
                         prefix_end: jax.Array | None = None,
                         ) -> tuple[jax.Array, LMCache | None]:
    """Runs the layers over token embeddings.

    Args:
      x: token embeddings [B, L, D]: ``embed_tokens``, with Flamingo's added-token rows swapped in.
      positions: int [B, L]; RoPE angles or GPT-2 position-table rows (MPT ignores them).
      attention_mask: [B, L], 1 for real tokens and 0 for padding.
      cache: if given, the L tokens are written at slots [cache.index, cache.index + L) and attend
        to everything valid cached before them (prefill: a fresh cache; decode: L = 1). The caller
        keeps ``cache.index + L <= cache.max_length``: under jit it cannot be checked, and a write
        past the end would be clamped onto the last slots.
      inserted: blocks run before some of these (Flamingo's gated blocks; ``Inserted``).
      prefix_end: int [B] or None; a prefix LM's boundary in slots (``causal_mask``).

    Returns:
      The hidden states after the final norm [B, L, D] and the updated cache (None without one).
    """
    if x.ndim != 3 or x.shape[-1] != self.cfg.embed_dim:
      raise ValueError(f"x must be [batch, length, {self.cfg.embed_dim}], got shape {x.shape}")
    b, l, _ = x.shape
    for name, arg in (("positions", positions), ("attention_mask", attention_mask)):
      if arg.shape != (b, l):
        raise ValueError(f"{name} must have shape {(b, l)} (batch, length of x), got {arg.shape}")
    if l > self.cfg.max_length:
      raise ValueError(f"input length {l} exceeds the model's max_length {self.cfg.max_length}")
    valid = attention_mask.astype(bool)
    if cache is None:
      key_valid, index = valid, 0
    else:
      if cache.key_valid.shape[0] != b:
        raise ValueError(f"cache was built for batch size {cache.key_valid.shape[0]}, but x has "
                         f"batch size {b}")
      if l > cache.max_length:
        raise ValueError(f"input length {l} exceeds the cache's max_length {cache.max_length}")
      index = cache.index
      key_valid = jax.lax.dynamic_update_slice(cache.key_valid, valid, (0, index))
    mask = causal_mask(key_valid, index, l, prefix_end)  # [B, L, S]
    bias = None
    if self.alibi_bias_max is not None:
      slopes = layers.alibi_slopes(self.cfg.num_heads, self.alibi_bias_max)
      bias = layers.alibi_bias(slopes, index + jnp.arange(l),
                               jnp.arange(key_valid.shape[1]))  # [H, L, S]

    h = x.astype(self.dtype)
    if self.position_embed is not None:
      h = h + self.position_embed(positions)
    run_block = remat_lib.rematerialise(DecoderBlock.__call__, self.remat)
    if self.scan_layers and cache is None:
      return self.final_norm(self._scan(h, positions, mask, bias, inserted, run_block)), None
    slot = {layer: j for j, layer in enumerate(inserted.layers)} if inserted else {}
    new_k, new_v = [], []
    for i, block in enumerate(self._unstacked()):
      if i in slot:
        h = inserted.apply(slot[i], layers.materialize_gradient(h))
      kv = None if cache is None else (cache.k[i], cache.v[i])
      h, kv = run_block(block, layers.materialize_gradient(h), positions, mask, kv, index, bias)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    h = self.final_norm(h)
    if cache is None:
      return h, None
    return h, LMCache(k=tuple(new_k), v=tuple(new_v), key_valid=key_valid, index=index + l)

  def _unstacked(self) -> Sequence[DecoderBlock]:
    """The blocks one by one (a scanned LM's sliced from the stack: decoding with a cache)."""
    return scan.unstack(self.blocks) if self.scan_layers else self.blocks

  def _scan(self, h, positions, mask, bias, inserted, run_block):
    """The stacked blocks under ``lax.scan``. With inserted blocks: the LM blocks before the
    first one, then one scan over the groups of equal length (an inserted block and the LM
    blocks up to the next, themselves scanned), then the shorter last group if any; without
    ``inserted.stacked``, each run of LM blocks between two inserted blocks is scanned apart."""
    n = self.cfg.num_layers
    graphdef, state = nnx.split(self.blocks)

    def body(h, layer_state):
      block = nnx.merge(graphdef, layer_state)
      h, _ = run_block(block, layers.materialize_gradient(h), positions, mask, None, 0, bias)
      return h, None

    def scan_blocks(h, start, end):
      if end > start:
        h, _ = jax.lax.scan(body, h, jax.tree.map(lambda x: x[start:end], state))
      return h

    if not inserted or not inserted.layers:
      return scan_blocks(h, 0, n)
    starts = list(inserted.layers)
    spans = list(zip(starts, starts[1:] + [n]))
    h = scan_blocks(h, 0, starts[0])
    size = spans[0][1] - spans[0][0]
    groups = next((j for j, (a, b) in enumerate(spans) if b - a != size), len(spans))
    if inserted.stacked is None or groups < 2:
      groups = 0
    else:
      first = starts[0]
      lm_states = jax.tree.map(
          lambda x: x[first:first + groups * size].reshape(groups, size, *x.shape[1:]), state)
      inputs = jax.tree.map(lambda x: x[:groups], inserted.stacked())

      def group(h, xs):
        block_inputs, group_states = xs
        h = inserted.apply_stacked(block_inputs, layers.materialize_gradient(h))
        h, _ = jax.lax.scan(body, h, group_states)
        return h, None

      h, _ = jax.lax.scan(group, h, (inputs, lm_states))
    for j in range(groups, len(spans)):
      h = inserted.apply(j, layers.materialize_gradient(h))
      h = scan_blocks(h, *spans[j])
    return h

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Next-token logits [B, L, vocab_size] in float32, through the tied table or ``lm_head``."""
    if self.lm_head is None:
      return self.token_embed.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Full causal forward without a cache: input_ids [B, L] -> logits [B, L, vocab_size].

    ``attention_mask`` defaults to all ones; ``positions`` to ``layers.default_positions``, so both
    left and right padding work.
    """
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
      positions = layers.default_positions(attention_mask)
    hidden, _ = self.forward_embeddings(self.embed_tokens(input_ids), positions, attention_mask)
    return self.logits(hidden)

  def init_cache(self, batch_size: int, max_length: int) -> LMCache:
    """An empty cache of ``max_length`` slots, in the compute dtype."""
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= max_length <= self.cfg.max_length:
      raise ValueError(f"cache max_length must be in [1, {self.cfg.max_length}] (the model's "
                       f"max_length), got {max_length}")
    shape = (batch_size, self.cfg.num_kv_heads, max_length, self.cfg.head_dim)
    n = self.cfg.num_layers
    return LMCache(k=tuple(jnp.zeros(shape, self.dtype) for _ in range(n)),
                   v=tuple(jnp.zeros(shape, self.dtype) for _ in range(n)),
                   key_valid=jnp.zeros((batch_size, max_length), bool),
                   index=jnp.zeros((), jnp.int32))
