"""Scanned against unrolled layers, tower by tower, on the bench-small shapes.

COMMAND: python -m benchmarks.scan_layers --batch_size=8,64 --repeats=15

For each of the vision tower (4 blocks, 64 px images), the resampler (6 layers over one image's
64 patch features), the LM (4 blocks over 128 tokens) and the whole Flamingo (one image and 128
tokens a sample; the gradient of the trainable parameters only, the Flamingo stage's, so the LM
and the vision tower run forward and the LM backward for the activations' gradient alone), one
jitted loss-and-gradient unrolled and with ``scan_layers`` (``models.scan``; the Flamingo's LM
blocks and gated blocks scanned as groups), timed in turn within every repeat
(``common.interleaved_medians``) so that the ratio is taken under one load. A third
variant unrolls the scan completely (``lax.scan(unroll=True)``): still the stacked parameters,
sliced per layer, and a stacked gradient, but no loop, which separates the loop's cost from the
stacked layout's.

The batch is ``--batch_size`` images (or sequences) per call; the parameters are the same at every
batch size, so a cost that is per parameter (copying a layer's weights out of the stack and its
gradient into it) shrinks relative to the compute as the batch grows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx

from benchmarks import common
from xattn_vlm import cli
from xattn_vlm.models import config as model_config
from xattn_vlm.models import flamingo as flamingo_lib
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.models.lm import DecoderLM
from xattn_vlm.models.resampler import PerceiverResampler
from xattn_vlm.models.vision import VisionEncoder

_BATCH_SIZES = flags.DEFINE_list("batch_size", ["8", "64"], "batch sizes to measure")
_REPEATS = flags.DEFINE_integer("repeats", 15, "timed calls per variant (the median is reported)")
_TOWERS = ("vision", "resampler", "lm", "flamingo")


def _tower(name: str, cfg, scan_layers: bool, batch_size: int):
  """The tower ``name`` of ``cfg``, its inputs and the filter of the parameters that train."""
  rngs = nnx.Rngs(0)
  size, patches = cfg.vision.image_size, (cfg.vision.image_size // cfg.vision.patch_size) ** 2
  if name == "vision":
    return (VisionEncoder(cfg.vision, rngs=rngs, scan_layers=scan_layers),
            (jnp.ones((batch_size, size, size, 3)),), nnx.Param)
  if name == "resampler":
    return (PerceiverResampler(cfg.resampler, input_dim=cfg.vision.width, rngs=rngs,
                               scan_layers=scan_layers),
            (jnp.ones((batch_size, 1, patches, cfg.vision.width)),), nnx.Param)
  ids = jax.random.randint(jax.random.key(0), (batch_size, 128), 0, cfg.lm.vocab_size)
  if name == "lm":
    return DecoderLM(cfg.lm, rngs=rngs, scan_layers=scan_layers), (ids,), nnx.Param
  flamingo_cfg = cfg.copy_and_resolve_references()
  flamingo_cfg.scan_layers = scan_layers
  model = Flamingo(flamingo_cfg, rngs=rngs)
  ids = ids.at[:, 0].set(model.media_token_id)  # every token sees the image
  images = jnp.ones((batch_size, 1, 1, size, size, 3))
  return model, (images, ids), flamingo_lib.trainable_params(flamingo_cfg)


def _loss_and_grad(name: str, cfg, scan_layers: bool, batch_size: int, unroll: bool = False):
  """A call of the jitted loss and gradient of one tower (compiled on the first call)."""
  module, inputs, trainable = _tower(name, cfg, scan_layers, batch_size)
  graphdef, params, rest = nnx.split(module, trainable, ...)

  def loss(params, rest, inputs):
    out = nnx.merge(graphdef, params, rest)(*inputs)
    out = out[0] if isinstance(out, tuple) else out  # the LM returns (hidden, cache)
    return jnp.mean(out.astype(jnp.float32) ** 2)

  step = jax.jit(jax.value_and_grad(loss))
  if unroll:
    scan = jax.lax.scan
    # Traced once, at the first call: the patch holds only while it is compiled.
    jax.lax.scan = functools.partial(scan, unroll=True)
    try:
      jax.block_until_ready(step(params, rest, inputs))
    finally:
      jax.lax.scan = scan
  return lambda: step(params, rest, inputs)


def benchmark() -> None:
  cfg = model_config.bench_small()
  print(common.load_average())
  print("| tower | batch | unrolled (ms) | scanned (ms) | scanned, loop unrolled (ms) | "
        "scanned / unrolled | loop unrolled / unrolled |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  for batch_size in map(int, _BATCH_SIZES.value):
    for name in _TOWERS:
      fns = {"unrolled": _loss_and_grad(name, cfg, False, batch_size),
             "scanned": _loss_and_grad(name, cfg, True, batch_size),
             "loop_unrolled": _loss_and_grad(name, cfg, True, batch_size, unroll=True)}
      t = common.interleaved_medians(fns, _REPEATS.value)
      print(f"| {name} | {batch_size} | {t['unrolled'] * 1e3:.1f} | {t['scanned'] * 1e3:.1f} | "
            f"{t['loop_unrolled'] * 1e3:.1f} | {t['scanned'] / t['unrolled']:.2f} | "
            f"{t['loop_unrolled'] / t['unrolled']:.2f} |", flush=True)
  print(common.load_average())


def main() -> None:
  cli.run(benchmark, name="benchmark-scan-layers", doc=__doc__, module=__name__, training=True)


if __name__ == "__main__":
  main()
