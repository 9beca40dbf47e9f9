"""The Flamingo composition: frozen vision tower -> Perceiver resampler -> frozen LM with gated
cross-attention blocks, plus trainable rows for the added special tokens.

``config.fusion`` picks how the LM sees the latents (docs/model.md, "Fusion modes"): ``xattn``
through the gated blocks; ``prefix`` and ``joint`` as inputs: each image stands in the sequence
as ``resampler.num_latents`` consecutive ``<image>`` tokens, and the k-th of them takes the
image's latent k, projected to the LM width, as its input embedding. ``prefix`` keeps the LM
frozen and causal (Frozen, ClipCap); ``joint`` trains everything with a prefix-LM mask (SimVLM).

Three entry points share one layer loop (the LM's): the training forward ``__call__`` (logits at
all positions), ``prefill`` (the prompt, building the LM KV cache and the cross-attention keys and
values once) and ``decode_step`` (one new token per sequence, reusing both caches).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx, struct

from xattn_vlm import special_tokens
from xattn_vlm.models import layers
from xattn_vlm.models import remat as remat_lib
from xattn_vlm.models.config import fusion_mode, media_tokens_per_image
from xattn_vlm.models import scan
from xattn_vlm.models.lm import DecoderLM, Inserted, LMCache
from xattn_vlm.models.resampler import PerceiverResampler
from xattn_vlm.models.vision import VisionEncoder
from xattn_vlm.models.xattn import GatedCrossAttentionBlock, cross_attention_mask, media_locations

TRAINABLE_PARTS = ("resampler", "gated_blocks", "added_embed", "added_head")
# The parts that train in each fusion mode; ``joint`` trains every parameter.
_MODE_PARTS = {"xattn": TRAINABLE_PARTS,
               "prefix": ("resampler", "prefix_projection", "added_embed", "added_head")}


def _parts(parts: tuple[str, ...]) -> nnx.filterlib.Filter:
  return nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(p) for p in parts)))


def trainable_params(config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
  """The parameters that train for a model config: its fusion mode's parts (``xattn``: resampler,
  gated blocks, added-token rows; ``prefix``: resampler, projection, added-token rows), every
  parameter for ``joint``. Everything else is frozen."""
  mode = fusion_mode(config)
  return nnx.Param if mode == "joint" else _parts(_MODE_PARTS[mode])


def frozen_params(config: ml_collections.ConfigDict) -> nnx.filterlib.Filter:
  return nnx.All(nnx.Param, nnx.Not(trainable_params(config)))


# Cross-attention fusion's filters (the default mode).
trainable = _parts(TRAINABLE_PARTS)
frozen = nnx.All(nnx.Param, nnx.Not(trainable))


def gated_layer_indices(num_layers: int, every_n_layers: int, offset: int = 0) -> list[int]:
  """LM blocks that get a gated block before them: i with (i + 1 + offset) % every_n_layers == 0.

  Offset 0 is OpenFlamingo's placement (blocks n-1, 2n-1, ...); offset n-1 is IDEFICS's (blocks
  0, n, 2n, ...).
  """
  if every_n_layers < 1:
    raise ValueError(f"xattn.every_n_layers must be >= 1, got {every_n_layers}")
  if not 0 <= offset < every_n_layers:
    raise ValueError(f"xattn.offset must be in [0, every_n_layers={every_n_layers}), got {offset}")
  return [i for i in range(num_layers) if (i + 1 + offset) % every_n_layers == 0]


def gated_layers(config: ml_collections.ConfigDict) -> list[int]:
  """``gated_layer_indices`` of a model config: the LM blocks its gated blocks run before (none
  unless its fusion mode is ``xattn``)."""
  if fusion_mode(config) != "xattn":
    return []
  return gated_layer_indices(config.lm.num_layers, config.xattn.every_n_layers,
                             config.xattn.offset)


@struct.dataclass
class FlamingoCache:
  """Decoding state: the LM KV cache, each gated block's media keys/values ([B, H, T*n, Dh],
  computed once per prompt), the media index new tokens attend to (the prompt's last token's: its
  last image, or none after a document end) and the next position."""
  lm: LMCache
  media_kv: tuple[tuple[jax.Array, jax.Array], ...]
  media_index: jax.Array  # [B] int32
  position: jax.Array  # [B] int32


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


class Flamingo(nnx.Module):
  """Flamingo built from a model config (``xattn_vlm.models.config``).

  Token ids ``< lm.vocab_size`` use the frozen LM vocabulary; ids ``lm.vocab_size + k`` are the
  added tokens (``config.added_tokens[k]``: by default k=0 ``<image>``, k=1 ``<|endofchunk|>``)
  with their own trainable input and output rows. Logits cover both:
  ``[B, L, lm.vocab_size + len(added_tokens)]``.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    self.config = config
    self.fusion = fusion_mode(config)
    self.media_tokens = media_tokens_per_image(config)
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    lm_cfg, vis_cfg, x_cfg = config.lm, config.vision, config.xattn
    self.media_token_id, self.eoc_token_id = special_tokens.added_token_ids(
        lm_cfg.vocab_size, config.added_tokens)
    # .get: the configs saved with checkpoints before scan_layers existed lack it.
    scan_layers = config.get("scan_layers", False)
    self.vision = VisionEncoder(vis_cfg, remat=config.remat, attention=config.attention,
                                scan_layers=scan_layers, **kw)
    self.resampler = PerceiverResampler(config.resampler, input_dim=vis_cfg.width,
                                        attention=config.attention, scan_layers=scan_layers,
                                        remat=config.remat, **kw)
    self.lm = DecoderLM(lm_cfg, remat=config.remat, attention=config.attention,
                        scan_layers=scan_layers, **kw)
    dim_visual = config.resampler.width or vis_cfg.width
    self.gated_layers = tuple(gated_layers(config))
    self.gated_blocks = nnx.List([
        GatedCrossAttentionBlock(
            lm_cfg.embed_dim, dim_visual, num_heads=x_cfg.num_heads, head_dim=x_cfg.head_dim,
            ff_mult=x_cfg.ff_mult, activation=x_cfg.activation, norm_eps=x_cfg.norm_eps,
            norm=x_cfg.norm, qk_norm=x_cfg.qk_norm, ffw_dim=x_cfg.ffw_dim,
            gated_ffw=x_cfg.gated_ffw, attention=config.attention, **kw)
        for _ in self.gated_layers])
    self.prefix_projection = (
        None if self.fusion == "xattn" else
        layers.Dense(dim_visual, lm_cfg.embed_dim, (None, "embed"), use_bias=True, **kw))
    num_added = len(config.added_tokens)
    self.added_embed = layers.Embed(num_added, lm_cfg.embed_dim,
                                    axes=(None, "embed"), **kw)
    self.added_head = layers.param(rngs, nnx.initializers.normal(0.02),
                                   (num_added, lm_cfg.embed_dim), (None, "embed"),
                                   param_dtype)
    self.vocab_size = lm_cfg.vocab_size
    self.dtype = dtype

  # -- pieces -----------------------------------------------------------------------------------

  def encode_media(self, images: jax.Array | None = None,
                   vision_features: jax.Array | None = None) -> jax.Array:
    """Media -> latents [B, T, num_latents, D_visual].

    images: float [B, T, F, H, W, C] (an image is F=1; [B, T, H, W, C] is read as F=1), encoded
    frame by frame by the tower, under stop_gradient unless the tower trains (``joint``).
    vision_features: the tower's output [B, T, F, P, D] precomputed (a feature cache), which skips
    the tower.
    """
    if vision_features is None:
      images = self._check_images(images)
      b, t, f = images.shape[:3]
      features = self.vision(images.reshape((b * t * f,) + images.shape[3:]))
      if self.fusion != "joint":
        features = jax.lax.stop_gradient(features)
      vision_features = features.reshape((b, t, f) + features.shape[1:])
    elif vision_features.ndim != 5:
      raise ValueError("vision_features must be [B, T_media, F, P, D], got shape "
                       f"{tuple(vision_features.shape)}")
    return self.resampler(vision_features.astype(self.dtype))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings: the frozen LM table for its vocabulary, the trainable rows for added ids."""
    is_added = (input_ids >= self.vocab_size)[..., None]
    lm_rows = self.lm.embed_tokens(jnp.where(is_added[..., 0], 0, input_ids))
    added_rows = self.added_embed(jnp.clip(input_ids - self.vocab_size, 0,
                                           len(self.config.added_tokens) - 1))
    return jnp.where(is_added, added_rows.astype(lm_rows.dtype), lm_rows)

  def input_embeddings(self, input_ids: jax.Array, latents: jax.Array) -> jax.Array:
    """``embed``, and in the ``prefix`` and ``joint`` modes each image's projected latents in
    place of its run of ``<image>`` tokens. latents [B, T, n, D_visual] -> [B, L, D].

    Runs are exactly n tokens long, so the j-th ``<image>`` token of a sequence (0-based, counted
    over the whole sequence) takes flat latent j: latent j % n of image j // n.
    """
    x = self.embed(input_ids)
    if self.prefix_projection is None:
      return x
    b, t, n, _ = latents.shape
    soft = self.prefix_projection(latents).reshape(b, t * n, -1).astype(x.dtype)  # [B, T*n, D]
    is_media = input_ids == self.media_token_id
    j = jnp.clip(jnp.cumsum(is_media, axis=-1) - 1, 0, max(t * n - 1, 0))  # [B, L]
    return jnp.where(is_media[..., None], jnp.take_along_axis(soft, j[..., None], axis=1), x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, vocab + added]: the frozen LM head, then the added tokens' rows."""
    added = jnp.einsum("bld,kd->blk", hidden.astype(self.dtype),
                       self.added_head[...].astype(self.dtype))
    return jnp.concatenate([self.lm.logits(hidden).astype(jnp.float32),
                            added.astype(jnp.float32)], axis=-1)

  def _media_kv(self, latents: jax.Array) -> tuple[tuple[jax.Array, jax.Array], ...]:
    return tuple(block.attn.project_media(latents) for block in self.gated_blocks)

  def _run(self, x, positions, attention_mask, media_kv, xattn_mask, cache, prefix_end=None):
    """The one layer loop over input embeddings x: the LM's, with gated blocks inserted before
    the chosen LM blocks (a scanned LM scans them with the LM blocks, as groups)."""
    run_gated = remat_lib.rematerialise(lambda blk, y, kv, m: blk(y, kv, m), self.config.remat)
    apply = lambda j, h: run_gated(self.gated_blocks[j], h, media_kv[j], xattn_mask)
    stacked = apply_stacked = None
    if self.lm.scan_layers and self.gated_blocks:
      graphdef = nnx.split(self.gated_blocks[0])[0]
      # Stacked inside the step, so the gated blocks' parameters keep one layout.
      stacked = lambda: (scan.stack_states([nnx.split(b)[1] for b in self.gated_blocks]),
                         jax.tree.map(lambda *xs: jnp.stack(xs), *media_kv))
      apply_stacked = lambda inputs, h: run_gated(nnx.merge(graphdef, inputs[0]), h, inputs[1],
                                                  xattn_mask)
    inserted = Inserted(self.gated_layers, apply, stacked, apply_stacked)
    return self.lm.forward_embeddings(x, positions, attention_mask, cache=cache,
                                      inserted=inserted, prefix_end=prefix_end)

  def _media_index(self, input_ids: jax.Array) -> jax.Array:
    return media_locations(input_ids, self.media_token_id,
                           self.config.xattn.document_end_token_id)

  def _xattn_mask(self, media_index: jax.Array, num_media: int) -> jax.Array:
    return cross_attention_mask(media_index, num_media, self.config.resampler.num_latents,
                                self.config.xattn.only_attend_immediate_media)

  # -- entry points -----------------------------------------------------------------------------

  def __call__(self, images: jax.Array | None, input_ids: jax.Array,
               attention_mask: jax.Array | None = None, *, media_mask: jax.Array | None = None,
               vision_features: jax.Array | None = None,
               prefix_end: jax.Array | None = None) -> jax.Array:
    """Training forward: logits [B, L, vocab + added] at every position.

    media_mask (optional, bool [B, T]) marks which media slots are real; given concrete inputs it is
    checked against the number of images the ``<image>`` tokens of each sample stand for.
    prefix_end (int [B]): the prefix-LM boundary of ``joint`` fusion, which it requires:
    positions before it attend to each other both ways, later ones causally (training passes
    the first supervised position). The other modes' LM is causal and ignores it.
    """
    input_ids, attention_mask = self._check_text(input_ids, attention_mask)
    if self.fusion == "joint" and prefix_end is None:
      raise ValueError("prefix_end must be given (int [B], the prefix-LM boundary) when "
                       "config.model.fusion is 'joint', got None")
    latents = self.encode_media(images, vision_features)
    self._check_media_count(input_ids, latents.shape[1], media_mask)
    positions = layers.default_positions(attention_mask)
    media_index = self._media_index(input_ids)
    mask = self._xattn_mask(media_index, latents.shape[1])
    hidden, _ = self._run(self.input_embeddings(input_ids, latents), positions, attention_mask,
                          self._media_kv(latents), mask, None, self._prefix_end(prefix_end))
    return self.logits(hidden)

  def prefill(self, images: jax.Array | None, input_ids: jax.Array,
              attention_mask: jax.Array | None = None, *, max_length: int,
              vision_features: jax.Array | None = None, last_only: bool = False
              ) -> tuple[jax.Array, FlamingoCache]:
    """Runs the prompt (left padded for batched generation) and returns its logits and a cache
    with room for ``max_length`` tokens in all (prompt included).

    ``last_only`` returns the logits of the last position alone ([B, 1, V]), all that generation
    needs: the head's matmul then costs one position per prompt instead of the whole prompt.
    Under ``joint`` fusion the whole prompt is the prefix (bidirectional); new tokens are causal.
    """
    input_ids, attention_mask = self._check_text(input_ids, attention_mask)
    if input_ids.shape[1] > max_length:
      raise ValueError(f"max_length ({max_length}) must be at least the prompt length "
                       f"({input_ids.shape[1]})")
    latents = self.encode_media(images, vision_features)
    self._check_media_count(input_ids, latents.shape[1], None)
    positions = layers.default_positions(attention_mask)
    media_index = self._media_index(input_ids)
    media_kv = self._media_kv(latents)
    mask = self._xattn_mask(media_index, latents.shape[1])
    lm_cache = self.lm.init_cache(input_ids.shape[0], max_length)
    whole_prompt = jnp.full((input_ids.shape[0],), input_ids.shape[1], jnp.int32)
    hidden, lm_cache = self._run(self.input_embeddings(input_ids, latents), positions,
                                 attention_mask, media_kv, mask, lm_cache,
                                 self._prefix_end(whole_prompt))
    # New tokens see what the prompt's last token sees (left padding puts it in the last column).
    cache = FlamingoCache(lm=lm_cache, media_kv=media_kv, media_index=media_index[:, -1],
                          position=attention_mask.sum(axis=-1).astype(jnp.int32))
    return self.logits(hidden[:, -1:] if last_only else hidden), cache

  def decode_step(self, input_ids: jax.Array, cache: FlamingoCache
                  ) -> tuple[jax.Array, FlamingoCache]:
    """One new token per sequence, input_ids [B, 1]: logits [B, 1, vocab + added] and the updated
    cache. New tokens see what the prompt's last token sees: its last image (none after a
    document end)."""
    if input_ids.ndim != 2 or input_ids.shape[1] != 1:
      raise ValueError(f"decode_step takes input_ids of shape [B, 1], got {tuple(input_ids.shape)}")
    num_media = cache.media_kv[0][0].shape[2] // self.config.resampler.num_latents \
        if cache.media_kv else 0
    mask = self._xattn_mask(cache.media_index[:, None], num_media)
    hidden, lm_cache = self._run(self.embed(input_ids), cache.position[:, None],
                                 jnp.ones_like(input_ids), cache.media_kv, mask, cache.lm)
    return self.logits(hidden), cache.replace(lm=lm_cache, position=cache.position + 1)

  def _prefix_end(self, prefix_end: jax.Array | None) -> jax.Array | None:
    return prefix_end if self.fusion == "joint" else None

  # -- input checks (shape checks always; value checks only outside jit, on concrete values) -----

  def _check_images(self, images) -> jax.Array:
    if images is None:
      raise ValueError("images must be given (or vision_features), got None")
    if images.ndim == 5:
      images = images[:, :, None]
    if images.ndim != 6:
      raise ValueError("images must be float [B, T_media, F, H, W, C] (or [B, T_media, H, W, C]), "
                       f"got shape {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be a float array (normalised pixels), got dtype {images.dtype}")
    finite = jnp.isfinite(images).all()
    if _is_concrete(finite) and not bool(finite):
      raise ValueError("images contain non-finite pixel values (NaN or Inf)")
    return images

  def _check_text(self, input_ids, attention_mask):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} must equal input_ids "
                       f"shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] > self.config.lm.max_length:
      raise ValueError(f"input_ids length {input_ids.shape[1]} exceeds the LM context "
                       f"(lm.max_length={self.config.lm.max_length})")
    return input_ids, attention_mask

  def _check_media_count(self, input_ids, num_media: int, media_mask) -> None:
    is_media = input_ids == self.media_token_id
    if not _is_concrete(is_media):
      return
    is_media = np.asarray(is_media)
    n = self.media_tokens
    if n > 1:
      # Each image is one run of exactly n <image> tokens: a token that starts no run must follow
      # another <image> token.
      rank = np.cumsum(is_media, axis=-1) - 1
      follows = np.concatenate([np.zeros_like(is_media[:, :1]), is_media[:, :-1]], axis=-1)
      bad = np.nonzero((is_media & (rank % n != 0) & ~follows).any(-1)
                       | (is_media.sum(-1) % n != 0))[0]
      if bad.size:
        raise ValueError(f"sample {int(bad[0])}: <image> tokens must come in runs of exactly "
                         f"{n} (media_tokens_per_image of fusion {self.fusion!r}), got "
                         f"{int(is_media[bad[0]].sum())} tokens in runs of other lengths")
    tokens = is_media.sum(axis=-1)
    counts = tokens // n

    def found(i):
      return f"{int(tokens[i])} <image> tokens" + (f" ({int(counts[i])} images)" if n > 1 else "")

    if media_mask is not None and _is_concrete(expected := media_mask.sum(axis=-1)):
      expected = np.asarray(expected)
      bad = np.nonzero(counts != expected)[0]
      if bad.size:
        i = int(bad[0])
        raise ValueError(f"sample {i} has {found(i)} in input_ids but {int(expected[i])} images "
                         "in media_mask")
    bad = np.nonzero(counts > num_media)[0]
    if bad.size:
      i = int(bad[0])
      raise ValueError(f"sample {i} has {found(i)} in input_ids but images has only {num_media} "
                       "media slots")
