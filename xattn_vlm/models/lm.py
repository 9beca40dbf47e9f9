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

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from flax import struct
from jax.sharding import PartitionSpec as P

from xattn_vlm.models import layers
from xattn_vlm.models import remat as remat_lib
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


def stack_blocks(blocks: Sequence[DecoderBlock]) -> DecoderBlock:
  """One block whose parameters hold every block's, stacked along a leading ``layers`` axis
  (MaxText's scanned layout; the same values as the blocks one by one)."""
  graphdef = nnx.split(blocks[0])[0]
  return nnx.merge(graphdef, _stacked([nnx.split(block)[1] for block in blocks]))


def _is_unrolled(blocks: Mapping) -> bool:
  return all(str(key).isdigit() for key in blocks)


def _with_layers_axis(sharding, add: bool):
  """A NamedSharding with the unsharded ``layers`` dimension put first (or taken off)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return jax.sharding.NamedSharding(sharding.mesh, P(None, *spec) if add else P(*spec[1:]))


def _stack_leaves(*leaves):
  first = leaves[0]
  if isinstance(first, nnx.Variable):
    stacked = first.replace(_stack_leaves(*[leaf.get_value() for leaf in leaves]))
    axes = first.get_metadata().get("out_sharding")
    if axes:
      stacked.set_metadata(out_sharding=("layers", *axes))
    return stacked
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype,
                                sharding=_with_layers_axis(first.sharding, add=True))
  return jnp.stack(leaves)


def _slice_leaf(leaf, i: int):
  if isinstance(leaf, nnx.Variable):
    sliced = leaf.replace(_slice_leaf(leaf.get_value(), i))
    axes = leaf.get_metadata().get("out_sharding")
    if axes and axes[0] == "layers":
      sliced.set_metadata(out_sharding=tuple(axes[1:]))
    return sliced
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype,
                                sharding=_with_layers_axis(leaf.sharding, add=False))
  return leaf[i]


def _items(mapping: Mapping):
  """A mapping's items, a State's children as it holds them (plain dicts stay dicts)."""
  return (mapping.raw_mapping if isinstance(mapping, nnx.State) else mapping).items()


_IS_LEAF = lambda x: isinstance(x, (nnx.Variable, jax.ShapeDtypeStruct))


def _stacked(states: Sequence[Mapping]) -> Mapping:
  return jax.tree.map(_stack_leaves, *states, is_leaf=_IS_LEAF)


def _blocks_as(blocks: Mapping, scanned: bool) -> Mapping:
  if _is_unrolled(blocks) == (not scanned):
    return blocks
  if scanned:
    return _stacked([blocks[key] for key in sorted(blocks, key=int)])
  num_layers = jax.tree.leaves(blocks, is_leaf=_IS_LEAF)[0].shape[0]
  unrolled = {i: jax.tree.map(lambda x, i=i: _slice_leaf(x, i), blocks, is_leaf=_IS_LEAF)
              for i in range(num_layers)}
  return nnx.State(unrolled) if isinstance(blocks, nnx.State) else unrolled


def blocks_layout(tree: Any, scanned: bool) -> Any:
  """``tree`` with every ``DecoderLM``'s ``blocks`` in the scanned layout (one block, stacked
  along a leading ``layers`` axis) or the unrolled one (blocks ``0 .. n-1``): a model's state,
  a train state (optimizer moments included) or a checkpoint's restore target; arrays are
  stacked or sliced, ShapeDtypeStructs and parameter metadata get the other layout's shape and
  sharding. Both layouts hold the same numbers, so converting is exact both ways."""
  if isinstance(tree, Mapping):
    items = {key: _blocks_as(value, scanned) if key == "blocks" and isinstance(value, Mapping)
             else blocks_layout(value, scanned) for key, value in _items(tree)}
    return nnx.State(items) if isinstance(tree, nnx.State) else items
  children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(treedef):
    return tree
  return treedef.unflatten([blocks_layout(child, scanned) for child in children])


def scanned_layout(tree: Any) -> bool | None:
  """Whether the LM blocks in ``tree`` are in the scanned layout (None: it holds none)."""
  if isinstance(tree, Mapping):
    for key, value in _items(tree):
      found = (not _is_unrolled(value) if key == "blocks" and isinstance(value, Mapping)
               else scanned_layout(value))
      if found is not None:
        return found
    return None
  children, treedef = jax.tree_util.tree_flatten(tree, is_leaf=lambda x: x is not tree)
  if jax.tree_util.treedef_is_leaf(treedef):
    return None
  return next((f for f in map(scanned_layout, children) if f is not None), None)


def make_norm(cfg: ml_collections.ConfigDict, **kw) -> layers.LayerNorm | layers.RMSNorm:
  """The family's norm over ``embed_dim``: RMSNorm (LLaMA), LayerNorm without bias (MPT) or with."""
  if cfg.family == "llama":
    return layers.RMSNorm(cfg.embed_dim, eps=cfg.norm_eps, **kw)
  return layers.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, use_bias=cfg.family != "mpt", **kw)


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
    self.blocks = stack_blocks(blocks) if scan_layers else nnx.List(blocks)
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
                         cache: LMCache | None = None,
                         before_block: Callable[[int, jax.Array], jax.Array] | None = None,
                         before_layers: Sequence[int] | None = None,
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
      before_block: ``(i, h) -> h`` applied right before block i (Flamingo's gated blocks).
      before_layers: the blocks ``before_block`` acts on (None: any); a scanned LM scans the
        runs of blocks between them.
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
      return self.final_norm(self._scan(h, positions, mask, bias, before_block,
                                        before_layers, run_block)), None
    new_k, new_v = [], []
    for i, block in enumerate(self._unstacked()):
      if before_block is not None:
        h = before_block(i, layers.materialize_gradient(h))
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
    if not self.scan_layers:
      return self.blocks
    graphdef, state = nnx.split(self.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], state))
            for i in range(self.cfg.num_layers)]

  def _scan(self, h, positions, mask, bias, before_block, before_layers, run_block):
    """The stacked blocks under ``lax.scan``: one scan over all of them without
    ``before_block``, else one per run of blocks between the layers it acts on (every layer
    when ``before_layers`` is None)."""
    n = self.cfg.num_layers
    starts = [0]
    if before_block is not None:
      starts = sorted(set(range(n) if before_layers is None else before_layers) | {0})
    graphdef, state = nnx.split(self.blocks)

    def body(h, layer_state):
      block = nnx.merge(graphdef, layer_state)
      h, _ = run_block(block, layers.materialize_gradient(h), positions, mask, None, 0, bias)
      return h, None

    for start, end in zip(starts, starts[1:] + [n]):
      if before_block is not None:
        h = before_block(start, layers.materialize_gradient(h))
      segment = jax.tree.map(lambda x, a=start, b=end: x[a:b], state)
      h, _ = jax.lax.scan(body, h, segment)
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
