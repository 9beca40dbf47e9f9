"""Analytic model FLOPs of one training step, for TFLOP/s and MFU (MaxText's convention).

Matmuls count 2 FLOPs per multiply-add, attention scores and values included (no causal
discount); norms, softmax and elementwise work are ignored. A training step costs the forward
pass times a factor per part: 3 for trained weights (forward, input gradient, weight gradient),
2 for frozen weights that gradients flow through (the LM in the Flamingo stage), 1 for a frozen
part run under stop-gradient (the vision tower in the Flamingo stage).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xattn_vlm.models import flamingo

Shapes = Mapping[str, Mapping[str, tuple[int, ...]]]


def lm_forward(lm: ml_collections.ConfigDict, batch: int, length: int, head: bool = True) -> float:
  d, h, hkv, dh = lm.embed_dim, lm.num_heads, lm.num_kv_heads, lm.head_dim
  projections = 2 * d * h * dh + 2 * d * hkv * dh
  mlp = (3 if lm.family == "llama" else 2) * d * lm.mlp_dim
  tokens = batch * length
  flops = 2 * tokens * lm.num_layers * (projections + mlp)
  flops += 4 * batch * length * length * h * dh * lm.num_layers  # scores and weighted values
  if head:
    flops += 2 * tokens * d * lm.vocab_size
  return float(flops)


def vision_forward(vision: ml_collections.ConfigDict, images: int) -> float:
  w, p = vision.width, vision.patch_size
  tokens = (vision.image_size // p) ** 2 + 1
  per_layer = 2 * tokens * (4 * w * w + 2 * w * vision.mlp_dim) + 4 * tokens * tokens * w
  embed = 2 * (tokens - 1) * p * p * vision.num_channels * w
  return float(images * (embed + vision.num_layers * per_layer))


def resampler_forward(model: ml_collections.ConfigDict, media: int, frames: int) -> float:
  res, vision = model.resampler, model.vision
  w = res.width or vision.width
  hd = res.num_heads * res.head_dim
  n = res.num_latents
  keys = frames * (vision.image_size // vision.patch_size) ** 2 + n
  proj_in = 0 if w == vision.width else 2 * (keys - n) * vision.width * w
  per_layer = (2 * n * w * hd * 2  # queries, output
               + 2 * keys * w * hd * 2  # keys, values
               + 4 * n * keys * hd  # scores and weighted values
               + 2 * n * w * res.ff_mult * w * 2)  # feed-forward
  return float(media * (proj_in + res.depth * per_layer))


def xattn_forward(model: ml_collections.ConfigDict, batch: int, length: int, media: int) -> float:
  lm, x = model.lm, model.xattn
  d, hd = lm.embed_dim, x.num_heads * x.head_dim
  dv = model.resampler.width or model.vision.width
  keys = media * model.resampler.num_latents
  blocks = len(flamingo.gated_layers(model))
  ffw = (3 if x.gated_ffw else 2) * d * (x.ffw_dim or x.ff_mult * d)
  per_block = (2 * batch * length * (2 * d * hd + ffw)  # q, out, feed-forward
               + 2 * batch * keys * dv * hd * 2  # media keys and values
               + 4 * batch * length * keys * hd)  # scores and weighted values
  return float(blocks * per_block)


def step_flops(config: ml_collections.ConfigDict, shapes: Shapes) -> float:
  """Model FLOPs of one training step over every dataset batch (``shapes``: name -> key ->
  global array shape)."""
  total = 0.0
  for batch in shapes.values():
    b, length = batch["input_ids"]
    if config.stage == "lm_pretrain":
      total += 3 * lm_forward(config.model.lm, b, length)
    elif config.stage == "vision_pretrain":
      c = config.contrastive
      total += 3 * (vision_forward(config.model.vision, b)
                    + lm_forward(c.text, b, length, head=False)
                    + 2 * b * (config.model.vision.width + c.text.embed_dim) * c.embed_dim)
    else:
      # [B, T, F, ...]: pixels, or cached tower features (then the tower does not run).
      _, per_sample, frames = batch["images" if "images" in batch else "features"][:3]
      total += 2 * lm_forward(config.model.lm, b, length)
      total += 3 * xattn_forward(config.model, b, length, per_sample)
      total += 3 * resampler_forward(config.model, b * per_sample, frames)
      if "images" in batch:
        total += vision_forward(config.model.vision, b * per_sample * frames)
  return total


def matmul_peak_probe(size: int = 2048) -> Callable[[], float]:
  """A probe whose every call times one float32 [size, size] matmul on the first device and
  returns its FLOP/s (compiled and warmed up once, here), so a benchmark can measure the peak next
  to each step it times."""
  x = jax.device_put(jnp.ones((size, size), jnp.float32), jax.devices()[0])
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()

  def probe() -> float:
    start = time.perf_counter()
    matmul(x).block_until_ready()
    return 2 * size**3 / (time.perf_counter() - start)

  return probe


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a float32 [size, size] matmul on the first device (median of ``repeats``): the
  peak MFU is quoted against when the config gives none (e.g. on CPU)."""
  probe = matmul_peak_probe(size)
  return float(np.median([probe() for _ in range(repeats)]))
