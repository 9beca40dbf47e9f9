"""Model configurations (ml_collections): the tiny test model, OpenFlamingo, IDEFICS and Flamingo
shapes.

A Flamingo config has four parts: ``lm`` (the frozen decoder), ``vision`` (the frozen ViT),
``resampler`` and ``xattn`` (the trained parts), plus dtypes and the special tokens added after
the LM's vocabulary (``added_tokens``, in id order). ``get_model_config(name)`` returns a fresh
copy of a named preset; experiments start from one and override what they need.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from xattn_vlm import special_tokens

LM_FAMILIES = ("gpt2", "llama", "mpt", "gpt_neox")
# Each family's defaults: tied head, q/k/v biases, MLP activation.
_FAMILY_DEFAULTS = {
    "gpt2": (True, True, "gelu_new"),
    "llama": (False, False, "silu"),
    "mpt": (True, False, "gelu"),
    "gpt_neox": (False, True, "gelu"),
}
XATTN_NORMS = ("layernorm", "rmsnorm")
# How the LM sees images (docs/model.md "Fusion modes"): gated cross-attention blocks (Flamingo),
# projected latents in place of the <image> tokens of a frozen LM (Frozen, ClipCap), or the same
# inputs to an LM that trains with a prefix-LM mask (SimVLM).
FUSION_MODES = ("xattn", "prefix", "joint")


def lm_config(*, family: str, vocab_size: int, num_layers: int, embed_dim: int, num_heads: int,
              mlp_dim: int, max_length: int, num_kv_heads: int | None = None,
              head_dim: int | None = None, norm_eps: float = 1e-5, rope_theta: float = 10000.0,
              tie_word_embeddings: bool | None = None, attention_bias: bool | None = None,
              activation: str | None = None, rotary_fraction: float = 1.0,
              parallel_residual: bool = False, alibi_bias_max: float = 8.0,
              qk_norm: bool = False) -> ml_collections.ConfigDict:
  """A decoder LM config. ``gpt2``: learned positions, LayerNorm, GELU (tanh), biases, tied head.
  ``llama``: RoPE, RMSNorm, SwiGLU, grouped-query attention, optional q/k/v bias (Qwen2).
  ``mpt``: ALiBi (slopes ``2^(-alibi_bias_max (h+1) / H)``), no biases, LayerNorm without bias,
  exact GELU, tied head, ``qk_norm``: LayerNorm of q and k over their full width (MosaicGPT).
  ``gpt_neox``: RoPE over ``rotary_fraction`` of each head, LayerNorm, biases everywhere, GELU,
  ``parallel_residual`` (attention and MLP both read the block input), untied head."""
  if family not in LM_FAMILIES:
    raise ValueError(f"lm family must be one of {LM_FAMILIES}, got {family!r}")
  if qk_norm and family != "mpt":
    raise ValueError(f"lm qk_norm is MPT's (family 'mpt'), got it with family {family!r}")
  if parallel_residual and family != "gpt_neox":
    raise ValueError(f"lm parallel_residual is GPT-NeoX's (family 'gpt_neox'), got it with "
                     f"family {family!r}")
  if not 0 < rotary_fraction <= 1:
    raise ValueError(f"lm rotary_fraction must be in (0, 1], got {rotary_fraction}")
  tied, biased, act = _FAMILY_DEFAULTS[family]
  return ml_collections.ConfigDict(dict(
      family=family,
      vocab_size=vocab_size,
      num_layers=num_layers,
      embed_dim=embed_dim,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads or num_heads,
      head_dim=head_dim or embed_dim // num_heads,
      mlp_dim=mlp_dim,
      max_length=max_length,
      norm_eps=norm_eps,
      rope_theta=rope_theta,
      tie_word_embeddings=tied if tie_word_embeddings is None else tie_word_embeddings,
      attention_bias=biased if attention_bias is None else attention_bias,
      activation=activation or act,
      rotary_fraction=rotary_fraction,
      parallel_residual=parallel_residual,
      alibi_bias_max=alibi_bias_max,
      qk_norm=qk_norm,
  ))


def swiglu_width(ffw_width: int, multiple_of: int = 256) -> int:
  """The SwiGLU hidden width standing in for a plain MLP of ``ffw_width``: two thirds of it (so
  the three SwiGLU matrices hold as many weights as the two plain ones), rounded up to a multiple
  of ``multiple_of`` as LLaMA does (4 x 4096 -> 11008), so that a tensor-parallel axis of any
  power of two up to ``multiple_of`` divides it and the MLP kernels can be sharded over it."""
  return -(-2 * ffw_width // (3 * multiple_of)) * multiple_of  # the ceiling, in integers


def vision_config(*, image_size: int, patch_size: int, width: int, num_layers: int, num_heads: int,
                  mlp_dim: int, activation: str = "quick_gelu", norm_eps: float = 1e-5,
                  feature_layer: int = -1, use_post_layernorm: bool = False,
                  include_class_token: bool = False, num_channels: int = 3,
                  image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073),
                  image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711),
                  ) -> ml_collections.ConfigDict:
  """A CLIP-style ViT config. ``feature_layer`` picks which block's output feeds the resampler
  (-1: the last); ``use_post_layernorm`` applies CLIP's final LayerNorm to those features (the
  published Flamingo-family checkpoints take them before it: open_clip <= 2.22's token output,
  Hugging Face's ``last_hidden_state``); the class token is dropped unless
  ``include_class_token``. Mean/std are the tower's pixel normalisation (CLIP's by default)."""
  return ml_collections.ConfigDict(dict(
      image_size=image_size, patch_size=patch_size, width=width, num_layers=num_layers,
      num_heads=num_heads, mlp_dim=mlp_dim, activation=activation, norm_eps=norm_eps,
      feature_layer=feature_layer, use_post_layernorm=use_post_layernorm,
      include_class_token=include_class_token, num_channels=num_channels,
      image_mean=tuple(image_mean), image_std=tuple(image_std),
  ))


def resampler_config(*, depth: int = 6, num_latents: int = 64, num_heads: int = 8,
                     head_dim: int = 64, ff_mult: int = 4, activation: str = "gelu",
                     width: int | None = None, max_num_media: int | None = 32,
                     max_num_frames: int | None = 1, qk_norm: bool = False
                     ) -> ml_collections.ConfigDict:
  """Perceiver resampler. ``width`` defaults to the vision width (None); ``max_num_frames`` is the
  number of frame-time embeddings learned (more frames at inference are interpolated), or None
  for none (OpenFlamingo, IDEFICS); ``max_num_media`` the number of media-time embeddings (one
  per image slot of a sequence), or None for none: each image then resamples the same wherever
  it stands, so a prompt may hold more images than any training sequence did. ``qk_norm``
  LayerNorms (with bias) each head of the queries and keys (IDEFICS)."""
  return ml_collections.ConfigDict(dict(
      depth=depth, num_latents=num_latents, num_heads=num_heads, head_dim=head_dim,
      ff_mult=ff_mult, activation=activation, width=width, max_num_media=max_num_media,
      max_num_frames=max_num_frames, qk_norm=qk_norm,
  ), type_safe=False)


def xattn_config(*, every_n_layers: int = 1, num_heads: int = 8, head_dim: int = 64,
                 ff_mult: int = 4, activation: str = "gelu",
                 only_attend_immediate_media: bool = True, offset: int = 0,
                 norm: str = "layernorm", norm_eps: float = 1e-5, qk_norm: bool = False,
                 ffw_dim: int | None = None, gated_ffw: bool = False,
                 document_end_token_id: int | None = None) -> ml_collections.ConfigDict:
  """Gated cross-attention dense blocks: one before LM block i when
  ``(i + 1 + offset) % every_n_layers == 0`` (offset 0: OpenFlamingo's blocks n-1, 2n-1, ...;
  offset n-1: IDEFICS's blocks 0, n, 2n, ...).

  ``norm`` (``layernorm`` or ``rmsnorm``, eps ``norm_eps``) is the norm before the attention and
  before the feed-forward; ``qk_norm`` adds one of that kind to each head of the queries and keys
  (IDEFICS). The feed-forward is ``ffw_dim`` wide (None: ``ff_mult`` x the LM width), gated
  (SwiGLU with ``activation`` silu) when ``gated_ffw``. ``document_end_token_id``: tokens after
  it see no image until the next one (IDEFICS's ``</s>`` rule); None: no such token.
  """
  if norm not in XATTN_NORMS:
    raise ValueError(f"xattn norm must be one of {XATTN_NORMS}, got {norm!r}")
  return ml_collections.ConfigDict(dict(
      every_n_layers=every_n_layers, num_heads=num_heads, head_dim=head_dim, ff_mult=ff_mult,
      activation=activation, only_attend_immediate_media=only_attend_immediate_media,
      offset=offset, norm=norm, norm_eps=norm_eps, qk_norm=qk_norm, ffw_dim=ffw_dim,
      gated_ffw=gated_ffw, document_end_token_id=document_end_token_id,
  ), type_safe=False)


def flamingo_config(*, lm, vision, resampler, xattn,
                    added_tokens: Sequence[str] = special_tokens.DEFAULT_ADDED_TOKENS,
                    dtype: str = "float32", param_dtype: str = "float32",
                    remat: str = "none", attention: str = "auto", fusion: str = "xattn",
                    scan_layers: bool = False) -> ml_collections.ConfigDict:
  """The whole model. ``added_tokens`` are the special tokens after the LM vocabulary, in id
  order: token k has id ``lm.vocab_size + k`` (new models: ``<image>``, ``<|endofchunk|>``;
  OpenFlamingo's checkpoints the reverse; IDEFICS ``<fake_token_around_image>``, ``<image>``).
  Their input and output rows train, the LM vocabulary stays frozen. ``remat`` names what each
  block keeps for the backward pass (``models.remat.NAMES``); ``attention`` which attention code
  every tower runs (``auto``, ``fused`` or ``explicit``: ``models.layers.attend``); ``fusion``
  how the LM sees the images (``FUSION_MODES``); ``scan_layers`` stacks the layers of the LM,
  the vision tower and the resampler and runs them under ``lax.scan``, the gated blocks with
  the LM blocks they precede (``models.scan``, ``lm.DecoderLM``)."""
  added_tokens = tuple(added_tokens)
  special_tokens.added_token_ids(lm.vocab_size, added_tokens)  # checks the list
  config = ml_collections.ConfigDict(dict(
      lm=lm, vision=vision, resampler=resampler, xattn=xattn, added_tokens=added_tokens,
      dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention, fusion=fusion,
      scan_layers=scan_layers,
  ))
  fusion_mode(config)
  return config


def fusion_mode(config: ml_collections.ConfigDict) -> str:
  """``config.fusion`` of a model config, checked against ``FUSION_MODES``."""
  mode = config.get("fusion", "xattn")  # configs saved before fusion modes existed are xattn
  if mode not in FUSION_MODES:
    raise ValueError(f"config.model.fusion must be one of {FUSION_MODES}, got {mode!r}")
  return mode


def media_tokens_per_image(config: ml_collections.ConfigDict) -> int:
  """How many consecutive ``<image>`` tokens stand for one image in this model's sequences: one
  under cross-attention, ``resampler.num_latents`` when the latents are the LM's inputs (each
  placeholder's embedding is replaced by one latent)."""
  return 1 if fusion_mode(config) == "xattn" else config.resampler.num_latents


# OpenAI's CLIP ViT-L/14 (quick GELU). The published checkpoints read its features before the
# final LayerNorm: open_clip <= 2.22 returned the patch tokens before ln_post, and Hugging Face's
# last_hidden_state precedes post_layernorm.
CLIP_VIT_L14 = dict(image_size=224, patch_size=14, width=1024, num_layers=24, num_heads=16,
                    mlp_dim=4096, use_post_layernorm=False)
# OpenCLIP ViT-H/14 as IDEFICS uses it (exact GELU, class token kept, no post LayerNorm).
OPENCLIP_VIT_H14 = dict(image_size=224, patch_size=14, width=1280, num_layers=32, num_heads=16,
                        mlp_dim=5120, activation="gelu", use_post_layernorm=False,
                        include_class_token=True)


def tiny() -> ml_collections.ConfigDict:
  """A few-thousand-parameter model for tests: every code path, tiny shapes."""
  return flamingo_config(
      lm=lm_config(family="gpt2", vocab_size=96, num_layers=2, embed_dim=32, num_heads=4,
                   mlp_dim=64, max_length=64),
      vision=vision_config(image_size=16, patch_size=8, width=24, num_layers=2, num_heads=2,
                           mlp_dim=48),
      resampler=resampler_config(depth=2, num_latents=4, num_heads=2, head_dim=8, ff_mult=2,
                                 max_num_media=8, max_num_frames=2),
      xattn=xattn_config(every_n_layers=1, num_heads=2, head_dim=8, ff_mult=2),
  )


def tiny_llama() -> ml_collections.ConfigDict:
  """``tiny`` with a LLaMA-family LM (RoPE, RMSNorm, SwiGLU, GQA) and a block every 2nd layer."""
  config = tiny()
  config.lm = lm_config(family="llama", vocab_size=96, num_layers=4, embed_dim=32, num_heads=4,
                        num_kv_heads=2, mlp_dim=64, max_length=64)
  config.xattn.every_n_layers = 2
  return config


def bench_small() -> ml_collections.ConfigDict:
  """The "bench-small" shapes of benchmarks/: GPT-2 4x256 (vocab 4096), ViT 64px/8 4x256,
  resampler 6 x 64 latents x 8x64 heads, a gated block before every LM layer."""
  return flamingo_config(
      lm=lm_config(family="gpt2", vocab_size=4096, num_layers=4, embed_dim=256, num_heads=4,
                   mlp_dim=1024, max_length=256),
      vision=vision_config(image_size=64, patch_size=8, width=256, num_layers=4, num_heads=4,
                           mlp_dim=1024),
      resampler=resampler_config(depth=6, num_latents=64, num_heads=8, head_dim=64),
      xattn=xattn_config(every_n_layers=1, num_heads=8, head_dim=64),
  )


# OpenFlamingo's GPT-NeoX-20B tokenizer has 50277 ids, to which it adds <|endofchunk|> (50277) and
# <image> (50278); MPT's and RedPajama's tables are padded to 50432 rows, cut to the tokenizer's.
NEOX_TOKENIZER_VOCAB = 50277


def _openflamingo(lm, every_n_layers: int, *, class_token: bool = False
                  ) -> ml_collections.ConfigDict:
  """OpenFlamingo (both versions): CLIP ViT-L/14 features before the final LayerNorm (v2: the
  256 patch tokens; v1: the class token too); a resampler of 6 x 64 latents, 8 x 64 heads, GELU,
  without media-time or frame embeddings (its checkpoints hold neither table); gated blocks of
  8 x 64 heads, LayerNorm, GELU x4; ``<|endofchunk|>`` then ``<image>`` after the vocabulary."""
  return flamingo_config(
      lm=lm, vision=vision_config(**CLIP_VIT_L14, include_class_token=class_token),
      resampler=resampler_config(depth=6, num_latents=64, num_heads=8, head_dim=64, ff_mult=4,
                                 activation="gelu", max_num_media=None, max_num_frames=None),
      xattn=xattn_config(every_n_layers=every_n_layers, num_heads=8, head_dim=64, ff_mult=4),
      added_tokens=special_tokens.OPENFLAMINGO_ADDED_TOKENS, dtype="bfloat16")


def openflamingo_3b() -> ml_collections.ConfigDict:
  """OpenFlamingo-3B (v2): MPT-1B (MosaicGPT: 24 x 2048, 16 heads, ALiBi, full-width q/k
  LayerNorm), a gated block before every layer."""
  return _openflamingo(lm_config(family="mpt", vocab_size=NEOX_TOKENIZER_VOCAB, num_layers=24,
                                 embed_dim=2048, num_heads=16, mlp_dim=8192, max_length=2048,
                                 qk_norm=True), every_n_layers=1)


def openflamingo_4b() -> ml_collections.ConfigDict:
  """OpenFlamingo-4B (v2): RedPajama-INCITE-3B (GPT-NeoX: 32 x 2560, 32 heads, MLP 10240, full
  rotary, sequential residual, untied head), a gated block every 2nd layer."""
  return _openflamingo(lm_config(family="gpt_neox", vocab_size=NEOX_TOKENIZER_VOCAB,
                                 num_layers=32, embed_dim=2560, num_heads=32, mlp_dim=10240,
                                 max_length=2048), every_n_layers=2)


def openflamingo_9b() -> ml_collections.ConfigDict:
  """OpenFlamingo-9B (v2): MPT-7B (32 x 4096, 32 heads, ALiBi, MLP 16384), a gated block every
  4th layer."""
  return _openflamingo(lm_config(family="mpt", vocab_size=NEOX_TOKENIZER_VOCAB, num_layers=32,
                                 embed_dim=4096, num_heads=32, mlp_dim=16384, max_length=2048),
                       every_n_layers=4)


def openflamingo_9b_v1() -> ml_collections.ConfigDict:
  """OpenFlamingo-9B v1 (deprecated; also Med-Flamingo): LLaMA-7B (32 x 4096, 32 heads, SwiGLU
  11008, vocabulary 32000), the class token kept, a gated block every 4th layer."""
  return _openflamingo(lm_config(family="llama", vocab_size=32000, num_layers=32, embed_dim=4096,
                                 num_heads=32, mlp_dim=11008, max_length=2048, norm_eps=1e-6),
                       every_n_layers=4, class_token=True)


def _idefics(lm, norm_eps: float) -> ml_collections.ConfigDict:
  """IDEFICS: OpenCLIP ViT-H/14 (class token kept, no post LayerNorm); a resampler of 6 x 64
  latents at width 1280, 16 x 96 heads with per-head q/k LayerNorm, ReLU x4; gated blocks before
  LM blocks 0, 4, 8, ... with attention at the LM's width and heads, RMSNorm and per-head q/k
  RMSNorm, the LM's SwiGLU MLP, and no image seen after ``</s>`` (id 2) until the next one;
  ``<fake_token_around_image>`` (32000) and ``<image>`` (32001) after the vocabulary."""
  return flamingo_config(
      lm=lm, vision=vision_config(**OPENCLIP_VIT_H14),
      resampler=resampler_config(depth=6, num_latents=64, num_heads=16, head_dim=96, ff_mult=4,
                                 activation="relu", max_num_media=None, max_num_frames=None,
                                 qk_norm=True),
      xattn=xattn_config(every_n_layers=4, offset=3, num_heads=lm.num_heads,
                         head_dim=lm.head_dim, activation="silu", norm="rmsnorm",
                         norm_eps=norm_eps, qk_norm=True, ffw_dim=lm.mlp_dim, gated_ffw=True,
                         document_end_token_id=2),
      added_tokens=special_tokens.IDEFICS_ADDED_TOKENS, dtype="bfloat16")


def idefics_9b() -> ml_collections.ConfigDict:
  """IDEFICS-9B: LLaMA-7B (32 x 4096, 32 heads, SwiGLU 11008, RMSNorm eps 1e-6)."""
  lm = lm_config(family="llama", vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32,
                 mlp_dim=11008, max_length=2048, norm_eps=1e-6)
  return _idefics(lm, norm_eps=1e-6)


def idefics_80b() -> ml_collections.ConfigDict:
  """IDEFICS-80B: LLaMA-65B (80 x 8192, 64 heads, SwiGLU 22016, RMSNorm eps 1e-5)."""
  lm = lm_config(family="llama", vocab_size=32000, num_layers=80, embed_dim=8192, num_heads=64,
                 mlp_dim=22016, max_length=2048, norm_eps=1e-5)
  return _idefics(lm, norm_eps=1e-5)


def _flamingo(lm, every_n_layers: int, xattn_heads: int) -> ml_collections.ConfigDict:
  """Paper shapes. The NFNet-F6 encoder is not implemented: a ViT-H/16-sized tower (632M) at 320px
  stands in; the resampler is 6 x 64 latents at width 1536 with squared ReLU."""
  return flamingo_config(
      lm=lm,
      vision=vision_config(image_size=320, patch_size=16, width=1280, num_layers=32, num_heads=16,
                           mlp_dim=5120, activation="gelu", use_post_layernorm=True),
      resampler=resampler_config(depth=6, num_latents=64, num_heads=16, head_dim=96, ff_mult=4,
                                 activation="squared_relu", width=1536, max_num_frames=8),
      xattn=xattn_config(every_n_layers=every_n_layers, num_heads=xattn_heads, head_dim=128,
                         ff_mult=4, activation="squared_relu"),
      dtype="bfloat16")


def flamingo_3b() -> ml_collections.ConfigDict:
  """Flamingo-3B: a 1.4B LM (24 x 2048, 16 heads), a gated block before every layer."""
  lm = lm_config(family="llama", vocab_size=32000, num_layers=24, embed_dim=2048, num_heads=16,
                 mlp_dim=swiglu_width(4 * 2048), max_length=2048)
  return _flamingo(lm, every_n_layers=1, xattn_heads=16)


def flamingo_9b() -> ml_collections.ConfigDict:
  """Flamingo-9B: a 7B LM (40 x 4096, 32 heads), a gated block every 4th layer."""
  lm = lm_config(family="llama", vocab_size=32000, num_layers=40, embed_dim=4096, num_heads=32,
                 mlp_dim=swiglu_width(4 * 4096), max_length=2048)
  return _flamingo(lm, every_n_layers=4, xattn_heads=32)


def flamingo_80b() -> ml_collections.ConfigDict:
  """Flamingo-80B: Chinchilla 70B (80 x 8192, 64 heads), a gated block every 7th layer."""
  lm = lm_config(family="llama", vocab_size=32000, num_layers=80, embed_dim=8192, num_heads=64,
                 mlp_dim=swiglu_width(4 * 8192), max_length=2048)
  return _flamingo(lm, every_n_layers=7, xattn_heads=64)


PRESETS = {
    "tiny": tiny, "tiny_llama": tiny_llama, "bench_small": bench_small,
    "openflamingo_3b": openflamingo_3b, "openflamingo_4b": openflamingo_4b,
    "openflamingo_9b": openflamingo_9b, "openflamingo_9b_v1": openflamingo_9b_v1,
    "idefics_9b": idefics_9b, "idefics_80b": idefics_80b,
    "flamingo_3b": flamingo_3b, "flamingo_9b": flamingo_9b, "flamingo_80b": flamingo_80b,
}


def get_model_config(name: str) -> ml_collections.ConfigDict:
  if name not in PRESETS:
    raise ValueError(f"model config name must be one of {sorted(PRESETS)}, got {name!r}")
  return PRESETS[name]()
