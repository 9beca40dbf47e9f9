"""The frozen vision tower: a CLIP-compatible Vision Transformer (Radford et al. 2021).

Images arrive channels-last ``[N, H, W, C]`` and already normalised with the tower's mean/std;
video frames are encoded one by one as images (the resampler adds their time embeddings). The
parameter layout mirrors Hugging Face's ``CLIPVisionModel`` so ``convert.load_hf_vision_weights``
is a plain rename, and the outputs match it to float32 rounding.

Which features leave the tower is set by ``cfg.feature_layer``, indexed like Hugging Face's
``hidden_states`` tuple of length ``num_layers + 1``: index 0 is the patch + class embeddings after
``pre_layrnorm``, index k (1..num_layers) is the output of block k, and negative indices count from
the end (-1: the last block, -2: the penultimate one, as LLaVA uses). Blocks after the selected one
are never run, so they are not built either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from xattn_vlm.models import remat as remat_lib
from xattn_vlm.models import scan
from xattn_vlm.models.layers import (MLP, Dense, LayerNorm, batch_axes, check_attention,
                                     constrain, dot_product_attention, param)


def resolve_feature_layer(feature_layer: int, num_layers: int) -> int:
  """Index into ``hidden_states`` (0 = embeddings, k = block k) for a possibly negative
  ``feature_layer``; it is also the number of blocks the encoder runs."""
  if not -(num_layers + 1) <= feature_layer <= num_layers:
    raise ValueError(f"feature_layer must be in [{-(num_layers + 1)}, {num_layers}] for a tower of "
                     f"{num_layers} blocks, got {feature_layer}")
  return feature_layer % (num_layers + 1)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biased q/k/v/out projections (CLIP's)."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention: str = "auto"):
    self.attention = check_attention(attention)
    head_dim = width // num_heads
    kw = dict(rngs=rngs, use_bias=True, dtype=dtype, param_dtype=param_dtype)
    self.q_proj = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.k_proj = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.v_proj = Dense(width, (num_heads, head_dim), ("embed", "heads", "kv"), **kw)
    self.out_proj = Dense((num_heads, head_dim), width, ("heads", "kv", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [N, L, D]
    out = dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), mask=None,
                                attention=self.attention)
    return self.out_proj(out)


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype, param_dtype,
               attention: str = "auto"):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
    self.self_attn = SelfAttention(cfg.width, cfg.num_heads, attention=attention, **kw)
    self.layer_norm2 = LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
    self.mlp = MLP(cfg.width, cfg.mlp_dim, act=cfg.activation, gated=False, use_bias=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x, batch_axes(x))
    x = x + self.self_attn(self.layer_norm1(x))
    x = x + self.mlp(self.layer_norm2(x))
    return constrain(x, batch_axes(x))


def _run_block(block: EncoderBlock, x: jax.Array) -> jax.Array:
  return block(x)


class VisionEncoder(nnx.Module):
  """CLIP ViT: ``pixels [N, H, W, C] -> features [N, num_patches (+1 class token), width]``.

  Patches are cut in row-major order (as CLIP's strided convolution flattens them), embedded by
  one bias-free linear map, prefixed by the class token and given learned position embeddings.
  ``remat`` (a ``models.remat`` policy name) recomputes each block's activations in the backward
  pass instead of storing them; ``attention`` is ``config.model.attention`` (``layers.attend``);
  ``scan_layers`` stacks the blocks and runs them under ``lax.scan`` (``models.scan``).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, remat: str | bool = "none", attention: str = "auto",
               scan_layers: bool = False):
    if cfg.image_size % cfg.patch_size:
      raise ValueError(f"vision image_size ({cfg.image_size}) must be a multiple of patch_size "
                       f"({cfg.patch_size})")
    if cfg.width % cfg.num_heads:
      raise ValueError(f"vision width ({cfg.width}) must be a multiple of num_heads "
                       f"({cfg.num_heads})")
    self.image_size = cfg.image_size
    self.patch_size = cfg.patch_size
    self.num_layers = cfg.num_layers
    self.num_heads = cfg.num_heads
    self.activation = cfg.activation
    self.norm_eps = cfg.norm_eps
    self.num_channels = cfg.num_channels
    self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
    self.include_class_token = cfg.include_class_token
    # The normalisation the pixels must already have; kept for processors that feed this tower.
    self.image_mean = tuple(cfg.image_mean)
    self.image_std = tuple(cfg.image_std)
    self.remat = remat_lib.policy_name(remat)
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    patch = (cfg.patch_size, cfg.patch_size, cfg.num_channels)
    self.patch_embedding = Dense(patch, cfg.width, (None, None, None, "embed"), use_bias=False,
                                 **kw)
    self.class_embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.width,), ("embed",),
                                 param_dtype)
    self.position_embedding = param(rngs, nnx.initializers.normal(0.02),
                                    (self.num_patches + 1, cfg.width), (None, "embed"),
                                    param_dtype)
    self.pre_layrnorm = LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)  # Hugging Face's spelling.
    num_blocks = resolve_feature_layer(cfg.feature_layer, cfg.num_layers)
    blocks = [EncoderBlock(cfg, attention=attention, **kw) for _ in range(num_blocks)]
    self.scan_layers = scan_layers and bool(blocks)
    self.layers = scan.stack_modules(blocks) if self.scan_layers else nnx.List(blocks)
    self.post_layernorm = (LayerNorm(cfg.width, eps=cfg.norm_eps, **kw)
                           if cfg.use_post_layernorm else None)

  def _check_pixels(self, pixels: jax.Array) -> None:
    expected = (self.image_size, self.image_size, self.num_channels)
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
      raise ValueError(f"pixels must have shape [N, {', '.join(map(str, expected))}] "
                       f"(channels-last, image_size x image_size x num_channels), got "
                       f"{tuple(pixels.shape)}")

  def embed(self, pixels: jax.Array) -> jax.Array:
    """Patch + class-token + position embeddings, before ``pre_layrnorm``: [N, 1 + P, D]."""
    n = pixels.shape[0]
    grid, p, c = self.image_size // self.patch_size, self.patch_size, self.num_channels
    patches = pixels.reshape(n, grid, p, grid, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(n, grid * grid, p, p, c)  # row-major over the patch grid
    x = self.patch_embedding(patches)  # [N, P, D]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding[...].astype(self.dtype)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    self._check_pixels(pixels)
    x = self.pre_layrnorm(self.embed(pixels))
    run_block = remat_lib.rematerialise(_run_block, self.remat)
    if self.scan_layers:
      x = scan.run(self.layers, run_block, x)
    else:
      for block in self.layers:
        x = run_block(block, x)
    if self.post_layernorm is not None:
      x = self.post_layernorm(x)
    return x if self.include_class_token else x[:, 1:]
