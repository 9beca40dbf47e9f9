"""NNX building blocks shared by every tower: dense, embedding, norms, RoPE, MLPs, attention.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``vocab``,
``latents``, ``media``) as ``out_sharding`` metadata; the trainer maps them to mesh axes with a
rules table, so nothing here knows about meshes. Variables are created unsharded
(``eager_sharding=False``): the trainer shards them through ``jax.jit(..., out_shardings=...)``.
Activations at block boundaries are named the same way (``constrain``); the trainer turns the
names into sharding constraints while it traces a step (``activation_sharding``).
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import math
import weakref
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Axes = tuple[str | None, ...]
Shape = int | Sequence[int]

# A large negative logit for masked keys: finite, so a query whose keys are all masked (a left-pad
# position) yields a finite, ignored row instead of NaN.
MASK_VALUE = -1e30


_INIT_COUNTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def init_key(rngs: nnx.Rngs) -> jax.Array:
  """The next initialisation key of ``rngs.params``: fold_in(key, n) for n = 0, 1, 2, ...

  Equivalent to ``rngs.params()`` but the counter is a Python int: nnx's own counter update costs
  time quadratic in the trace length under abstract or jitted init (docs/performance.md).
  """
  counter = _INIT_COUNTERS.setdefault(rngs, itertools.count())
  return jax.random.fold_in(rngs.params.key[...], next(counter))


def param(rngs: nnx.Rngs, init: Callable, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
  """A parameter with logical axis names, initialised from ``rngs.params``."""
  if len(axes) != len(shape):
    raise ValueError(f"axes {axes} do not match parameter shape {tuple(shape)}")
  return nnx.Param(init(init_key(rngs), tuple(shape), dtype), out_sharding=axes,
                   eager_sharding=False)


Constraint = Callable[[jax.Array, Axes], jax.Array]
_constraint: contextvars.ContextVar[Constraint | None] = contextvars.ContextVar(
    "activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(constraint: Constraint) -> Iterator[None]:
  """Within the block, ``constrain(x, axes)`` is ``constraint(x, axes)`` (the trainer's: logical
  names to a sharding constraint on its mesh); outside, activations are left to XLA."""
  token = _constraint.set(constraint)
  try:
    yield
  finally:
    _constraint.reset(token)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
  """``x`` with logical axis names ``axes`` (one per dim), for ``activation_sharding``."""
  constraint = _constraint.get()
  return x if constraint is None else constraint(x, axes)


def batch_axes(x: jax.Array, last: str | None = None) -> Axes:
  """The logical axes of an activation whose leading dim is the batch (images flattened into it
  keep the batch major) and whose trailing dim is ``last``: ``("batch", None, ..., last)``."""
  return ("batch",) + (None,) * (x.ndim - 2) + (last,)


def _as_tuple(x: Shape) -> tuple[int, ...]:
  return (x,) if isinstance(x, int) else tuple(x)


class Dense(nnx.Module):
  """``y = x . kernel (+ bias)``, contracting the trailing ``in_features`` dims of x.

  ``in_features`` / ``out_features`` may be tuples so attention projections keep their
  ``[embed, heads, kv]`` structure (and their logical axes) in the kernel itself.
  """

  def __init__(self, in_features: Shape, out_features: Shape, axes: Axes, *, rngs: nnx.Rngs,
               use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
               kernel_init: Callable | None = None):
    self.in_features = _as_tuple(in_features)
    self.out_features = _as_tuple(out_features)
    fan_in = math.prod(self.in_features)
    init = kernel_init or nnx.initializers.normal(stddev=1.0 / math.sqrt(fan_in))
    self.kernel = param(rngs, init, self.in_features + self.out_features, axes, param_dtype)
    n_out = len(self.out_features)
    self.bias = (param(rngs, nnx.initializers.zeros, self.out_features, axes[-n_out:], param_dtype)
                 if use_bias else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    n_in = len(self.in_features)
    if x.shape[x.ndim - n_in:] != self.in_features:
      raise ValueError(f"Dense expects trailing dims {self.in_features}, got input shape {x.shape}")
    # One 2-D matmul: with several leading dims XLA:CPU copies the output gradient transposed
    # before the weight-gradient matmul (docs/performance.md).
    lead = x.shape[:x.ndim - n_in]
    fan_in, fan_out = math.prod(self.in_features), math.prod(self.out_features)
    y = jnp.dot(x.astype(self.dtype).reshape(math.prod(lead), fan_in),
                self.kernel[...].astype(self.dtype).reshape(fan_in, fan_out))
    y = y.reshape(lead + self.out_features)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token (or position) embedding table ``[num_embeddings, features]``; ``attend`` is the tied head."""

  def __init__(self, num_embeddings: int, features: int, *, rngs: nnx.Rngs,
               axes: Axes = ("vocab", "embed"), dtype=jnp.float32, param_dtype=jnp.float32,
               stddev: float = 0.02):
    self.embedding = param(rngs, nnx.initializers.normal(stddev), (num_embeddings, features), axes,
                           param_dtype)
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), self.embedding[...].astype(self.dtype))


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32. ``axes`` names the normalised axis
  (``kv`` for a per-head norm)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, use_bias: bool = True,
               dtype=jnp.float32, param_dtype=jnp.float32, axes: Axes = ("embed",)):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), axes, param_dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (dim,), axes, param_dtype)
                 if use_bias else None)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis (LLaMA): statistics in float32, scale applied after the cast back.
  ``axes`` names the normalised axis (``kv`` for a per-head norm)."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, axes: Axes = ("embed",)):
    self.scale = param(rngs, nnx.initializers.ones, (dim,), axes, param_dtype)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
    return (y.astype(self.dtype) * self.scale[...].astype(self.dtype)).astype(self.dtype)


@jax.custom_vjp
def materialize_gradient(x: jax.Array) -> jax.Array:
  """The identity, whose gradient is computed once where it arrives and stored (on CPU).

  Layer loops call it on a block's input: XLA:CPU otherwise recomputes the residual stream's whole
  gradient sum inside the fusion feeding each block's matmuls (docs/performance.md). The gradient
  passes through a conditional, which fusion does not cross (XLA:CPU drops optimization
  barriers); other platforms get it as it is.
  """
  return x


def _materialize_gradient_fwd(x):
  return x, None


def _materialize_gradient_bwd(_, g):
  def through_conditional(g):
    # Both branches return g. The predicate only has to be unknown at compile time, and the
    # branches must differ, or JAX and XLA would drop the conditional.
    return jax.lax.cond(jnp.isfinite(g.reshape(-1)[0]), lambda t: t, jnp.copy, g)

  return (jax.lax.platform_dependent(g, cpu=through_conditional, default=lambda t: t),)


materialize_gradient.defvjp(_materialize_gradient_fwd, _materialize_gradient_bwd)


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU through ``erf``, as PyTorch's ``nn.GELU()``: ``jax.nn.gelu``'s ``erfc`` is
  slower on XLA:CPU and equal within 1e-6 (docs/performance.md)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * math.sqrt(0.5)))


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def squared_relu(x: jax.Array) -> jax.Array:
  return jnp.square(jax.nn.relu(x))


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": quick_gelu,
    "relu": jax.nn.relu,
    "squared_relu": squared_relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
  return ACTIVATIONS[name]


class MLP(nnx.Module):
  """Feed-forward block: ``down(act(up(x)))``, or SwiGLU-style ``down(act(gate(x)) * up(x))``."""

  def __init__(self, dim: int, hidden: int, *, act: str, gated: bool, use_bias: bool,
               rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype)
    self.gate = Dense(dim, hidden, ("embed", "mlp"), **kw) if gated else None
    self.up = Dense(dim, hidden, ("embed", "mlp"), **kw)
    self.down = Dense(hidden, dim, ("mlp", "embed"), **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.gate is not None:
      hidden = self.act(self.gate(x)) * self.up(x)
    else:
      hidden = self.act(self.up(x))
    return self.down(constrain(hidden, batch_axes(hidden, "mlp")))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float,
               rotary_dim: int | None = None) -> jax.Array:
  """Rotary embedding in the LLaMA / Hugging Face convention (rotate the two halves of the
  rotated part of head_dim).

  x: [B, L, H, Dh]; positions: [B, L] int. ``rotary_dim`` (default Dh): only the first
  ``rotary_dim`` features of each head rotate, the rest pass through (GPT-NeoX's ``rotary_pct``).
  """
  dh = x.shape[-1]
  rot = dh if rotary_dim is None else rotary_dim
  if not 0 < rot <= dh or rot % 2:
    raise ValueError(f"rotary_dim must be even and in (0, {dh}] (the head dim), got {rot}")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, rot, 2, dtype=jnp.float32) / rot))  # [rot/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, rot/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, L, 1, rot]
  x32 = x.astype(jnp.float32)
  x_rot, x_pass = x32[..., :rot], x32[..., rot:]
  x1, x2 = jnp.split(x_rot, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  x_rot = x_rot * jnp.cos(angles) + rotated * jnp.sin(angles)
  return jnp.concatenate([x_rot, x_pass], axis=-1).astype(x.dtype)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> jax.Array:
  """ALiBi's per-head slopes [H] as MPT defines them: ``m_h = 2^(-bias_max (h+1) / H)`` for a
  power-of-two H; otherwise the slopes of the next power of two P, odd-indexed ones first, then
  even-indexed, the first H of them (Hugging Face's ``build_mpt_alibi_tensor``)."""
  padded = 2 ** math.ceil(math.log2(num_heads))
  slopes = 2.0 ** (-jnp.arange(1, padded + 1, dtype=jnp.float32) * (bias_max / padded))
  if padded != num_heads:
    slopes = jnp.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes


def alibi_bias(slopes: jax.Array, query_slots: jax.Array, key_slots: jax.Array) -> jax.Array:
  """The additive ALiBi bias ``-m_h * |query_slot - key_slot|``: [H, L, S] float32.

  Slots, not token positions: left padding counts, as in MPT's and Hugging Face's code (their
  bias ``m_h * (key_slot - last_slot)`` differs from this one by a constant per query row, which
  the softmax cancels). The distance is absolute so that a bidirectional prefix (joint fusion)
  penalises later keys as it does earlier ones; under a causal mask it is MPT's bias.
  """
  distance = jnp.abs(query_slots[:, None] - key_slots[None, :]).astype(jnp.float32)  # [L, S]
  return -slopes[:, None, None] * distance[None]


def default_positions(attention_mask: jax.Array) -> jax.Array:
  """Position ids that skip padding: cumsum(mask) - 1, clipped at 0, so a left-padded prompt gets
  the same positions as the prompt alone."""
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def heads_first(x: jax.Array) -> jax.Array:
  """[B, S, H, Dh], as a projection gives keys or values, -> [B, H, S, Dh] (see ``attend``)."""
  return jnp.swapaxes(x, 1, 2)


def _explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                        bias: jax.Array | None) -> jax.Array:
  """``attend`` written out in jnp.

  Keys and values are heads first so a decode step reads the caches where they lie, and the g
  query heads that share a key/value head are stacked along the length, so both products are
  plain batched matmuls over [B, Hkv]; the queries are scaled instead of the logits and the
  softmax is normalised after the product with the values, so no full-size broadcast becomes a
  matmul operand (each measured in docs/performance.md).
  """
  b, l, h, dh = q.shape
  hkv = k.shape[1]
  g = h // hkv
  q = q * jnp.asarray(1 / math.sqrt(dh), q.dtype)
  qg = q.reshape(b, l, hkv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * l, dh)
  logits = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32)
  logits = logits.reshape(b, hkv, g, l, -1)
  if bias is not None:
    bias = bias.reshape(bias.shape[:-3] + (hkv, g) + bias.shape[-2:])  # head h = kv * g + group
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
  # The softmax's numerators; its normalisation waits until after the product with the values.
  scores = jnp.exp(logits - jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True)))
  total = scores.sum(axis=-1).reshape(b, hkv, g * l, 1)
  out = jnp.einsum("bkqs,bksd->bkqd", scores.astype(v.dtype).reshape(b, hkv, g * l, -1), v,
                   preferred_element_type=jnp.float32)
  out = (out / total).astype(v.dtype)
  return out.reshape(b, hkv, g, l, dh).transpose(0, 3, 1, 2, 4).reshape(b, l, h, dh)


def _fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                     bias: jax.Array | None) -> jax.Array:
  """``attend`` through ``jax.nn.dot_product_attention``, which picks the kernel for the platform.

  It takes keys and values length first ([B, S, Hkv, Dh]) and a mask and bias with a head axis.
  A fully masked query row (a left-pad position; text before the first image, whose output the
  cross-attention zeroes) gets a finite average of the values, as in ``_explicit_attention``.
  """
  if mask is not None:
    mask = mask.reshape((1,) * (3 - mask.ndim) + mask.shape)[:, None]  # [B or 1, 1, L, S]
  if bias is not None and bias.ndim == 3:
    bias = bias[None]
  return jax.nn.dot_product_attention(q, heads_first(k), heads_first(v), bias=bias, mask=mask)


ATTENTION = ("auto", "fused", "explicit")


def check_attention(attention: str) -> str:
  if attention not in ATTENTION:
    raise ValueError(f"config.model.attention: expected one of {ATTENTION}, got {attention!r}")
  return attention


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
           bias: jax.Array | None = None, *, attention: str = "auto") -> jax.Array:
  """Softmax attention with grouped-query heads, keys and values heads first.

  q: [B, L, H, Dh]; k, v: [B, Hkv, S, Dh] with H a multiple of Hkv; mask: bool, broadcastable to
  [B, L, S] (True = may attend); bias: float added to the logits, [H, L, S] or [B, H, L, S]
  (ALiBi). Logits and softmax in float32. Returns [B, L, H, Dh].

  ``attention`` (``config.model.attention``): ``fused`` calls ``jax.nn.dot_product_attention``
  (the kernel is JAX's choice for the platform), ``explicit`` the jnp code of
  ``_explicit_attention``, ``auto`` fused except on CPU, where explicit is the faster
  (docs/performance.md); the platform is the one the computation is lowered for, so an
  ahead-of-time compile for TPU on a CPU host gets the TPU choice.
  """
  h, hkv = q.shape[2], k.shape[1]
  if h % hkv:
    raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
  if bias is not None and (bias.ndim not in (3, 4) or bias.shape[-3] != h):
    raise ValueError(f"attention bias must be [{h}, L, S] or [B, {h}, L, S] ({h} query heads), "
                     f"got shape {bias.shape}")
  q = constrain(q, ("batch", None, "heads", None))
  k = constrain(k, ("batch", "heads", None, None))
  v = constrain(v, ("batch", "heads", None, None))
  if check_attention(attention) == "fused":
    out = _fused_attention(q, k, v, mask, bias)
  elif attention == "explicit":
    out = _explicit_attention(q, k, v, mask, bias)
  else:
    out = jax.lax.platform_dependent(q, k, v, mask, bias, cpu=_explicit_attention,
                                     default=_fused_attention)
  return constrain(out, ("batch", None, "heads", None))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, *,
                          attention: str = "auto") -> jax.Array:
  """``attend`` with keys and values as projections give them: q: [B, L, H, Dh]; k, v:
  [B, S, Hkv, Dh]; mask broadcastable to [B, L, S]. Returns [B, L, H, Dh]."""
  return attend(q, heads_first(k), heads_first(v), mask, attention=attention)
