"""Generation speed on the bench-small model: cached vs recomputed decoding, decode cost per token
against the number of images, prefill cost against prompt length.

COMMAND: python -m benchmarks.generate --batch_size=8 --new_tokens=20 --repeats=5

``--attention=explicit,fused`` measures the first table once per ``config.model.attention`` in
the same process, the settings timed in turn within each repeat (the later tables use the last
one).

The workload is a 4-shot captioning prompt: ``(<image>Output: caption<|endofchunk|>) x 4`` then
``<image>Output: a``, 5 images of 64x64, 84 tokens, random weights and token ids (speed does not
depend on them). Stop tokens are disabled so every sequence generates exactly ``--new_tokens``
tokens. Every time is the median of ``--repeats`` runs after one warm-up run (compilation).
The per-token decode time is the time of the compiled decode loop alone, started from a prompt
prefilled beforehand, for ``--decode_tokens`` steps (prompt length held fixed), divided by the
steps: a difference of two whole generations drowns in a loaded machine's noise. The machine's
load average is printed before and after: on a shared machine the figures are only as good as it.

The prefill's FLOPs (XLA's cost analysis, split into the media encoding and the rest) divided by
the rate of a 2048^3 float32 matmul measured in the same run give the floor no implementation of
this model reaches on this machine: the batch's generation cannot take less than that.

The recomputed baseline runs the full forward over the prompt and the tokens so far at every step.
XLA hoists the loop-invariant part (vision tower and resampler on the same images) out of the
loop, so it recomputes the LM and the gated blocks only: Hugging Face's ``use_cache=False``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

from benchmarks import common
from xattn_vlm import cli

from xattn_vlm.inference import Batch, GenerationConfig, InferenceModel, decoding, generate_tokens
from xattn_vlm.inference.scoring import prefill
from xattn_vlm.models import config as model_config
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.train import flops

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "prompts per batch")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 20, "tokens generated per prompt")
_DECODE_TOKENS = flags.DEFINE_integer("decode_tokens", 64, "tokens timed for the per-token cost")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed runs per row (the median is reported)")
_ATTENTION = flags.DEFINE_list("attention", ["auto"], "config.model.attention values to measure")
_SHOTS = 4
_SHOT_TOKENS = 20  # <image>, "Output:" (2 tokens), a 16-token caption, <|endofchunk|>
_QUERY_TOKENS = 4  # <image>Output: a


def few_shot_batch(config, batch_size: int, num_images: int, length: int | None = None,
                   seed: int = 0) -> Batch:
  """``num_images - 1`` demonstrations and a query, left padded to ``length`` tokens (default the
  prompt's own length): random token ids in the captioning layout (padding too, masked off),
  random pixels."""
  rng = np.random.default_rng(seed)
  media, eoc, vocab = config.lm.vocab_size, config.lm.vocab_size + 1, config.lm.vocab_size
  prompts = []
  for _ in range(batch_size):
    ids = []
    for _ in range(num_images - 1):
      ids += [media, *rng.integers(0, vocab, _SHOT_TOKENS - 2), eoc]
    ids += [media, *rng.integers(0, vocab, _QUERY_TOKENS - 1)]
    prompts.append(ids)
  length = length or len(prompts[0])
  if len(prompts[0]) > length:
    raise ValueError(f"length ({length}) must hold the {len(prompts[0])}-token prompt")
  input_ids = rng.integers(0, vocab, (batch_size, length)).astype(np.int32)
  input_ids[:, length - len(prompts[0]):] = prompts
  mask = np.zeros((batch_size, length), np.int32)
  mask[:, length - len(prompts[0]):] = 1
  size = config.vision.image_size
  images = rng.standard_normal((batch_size, num_images, 1, size, size, 3)).astype(np.float32)
  return Batch(input_ids=input_ids, attention_mask=mask, images=images,
               media_mask=np.ones((batch_size, num_images), bool))


@functools.partial(jax.jit, static_argnames=("graph",))
def encode_media(graph, params, images):
  """The prefill's media part: vision tower and resampler (for its FLOP count)."""
  return graph.merge(params).encode_media(images)


@functools.partial(jax.jit, static_argnames=("graph", "config"))
def decode_loop(graph, params, logits, cache, config):
  """Generation's greedy loop from a prefilled cache, without the prefill."""
  model = graph.merge(params)

  def step(tokens, cache):
    logits, cache = model.decode_step(tokens[:, None], cache)
    return logits[:, 0], cache

  return decoding.sample_loop(logits, cache, step, config, jax.random.key(0)).tokens


def _model(config, attention: str) -> InferenceModel:
  config = config.copy_and_resolve_references()
  config.attention = attention
  model = nnx.jit(lambda: Flamingo(config, rngs=nnx.Rngs(0)))()
  for block in model.gated_blocks:  # open gates: the cross-attention runs as in a trained model
    block.attn_gate[...] = jnp.asarray(1.0)
    block.ffw_gate[...] = jnp.asarray(1.0)
  return InferenceModel(model)


def benchmark() -> None:
  config = model_config.bench_small()
  b, n, repeats = _BATCH_SIZE.value, _NEW_TOKENS.value, _REPEATS.value
  print(f"before: {common.load_average()}")

  def gen(model, batch, new_tokens, **kw):
    cfg = GenerationConfig(max_new_tokens=new_tokens,
                           suppress_token_ids=(config.lm.vocab_size,), **kw)
    return lambda: generate_tokens(model, batch, cfg).tokens

  batch = few_shot_batch(config, b, _SHOTS + 1)
  length = batch.input_ids.shape[1]
  print(f"bench_small, {_SHOTS}-shot captioning prompt: batch {b}, {_SHOTS + 1} images of "
        f"{config.vision.image_size}px, {length} tokens, {n} new tokens; device "
        f"{jax.devices()[0].device_kind}, medians of {repeats}\n")
  print("| attention | decoding | wall time (s, prefill included) | new tokens/s | speedup |")
  print("|---|---|---|---|---|")
  models = {attention: _model(config, attention) for attention in _ATTENTION.value}

  def prefill_of(model):
    return lambda: prefill(model.graph, model.params, batch.images, batch.input_ids,
                           batch.attention_mask, n)[0]

  rows = {}
  for name, run in (("recomputed (LM + gated blocks per token)",
                     lambda m: gen(m, batch, n, use_cache=False)),
                    ("cached, greedy", lambda m: gen(m, batch, n)),
                    ("cached, beam 3", lambda m: gen(m, batch, n, num_beams=3)),
                    ("prefill alone", prefill_of)):
    rows[name] = common.interleaved_medians({a: run(m) for a, m in models.items()}, repeats)
  for attention in models:
    uncached = rows["recomputed (LM + gated blocks per token)"][attention]
    for name, seconds in rows.items():
      if name == "prefill alone":
        print(f"| {attention} | {name} | {seconds[attention]:.3f} | | |")
      else:
        print(f"| {attention} | {name} | {seconds[attention]:.3f} | "
              f"{b * n / seconds[attention]:,.0f} | {uncached / seconds[attention]:.1f}x |")
  model = models[_ATTENTION.value[-1]]
  prefill_args = (model.graph, model.params, batch.images, batch.input_ids, batch.attention_mask,
                  n)
  prefill_time = rows["prefill alone"][_ATTENTION.value[-1]]
  prefill_flops = prefill.lower(*prefill_args).compile().cost_analysis()["flops"]
  media_flops = encode_media.lower(model.graph, model.params,
                                   batch.images).compile().cost_analysis()["flops"]
  peak = flops.measure_matmul_peak(repeats=repeats)
  print(f"\nprefill: {prefill_flops / 1e9:.1f} GFLOP (XLA cost analysis; vision tower and "
        f"resampler {media_flops / 1e9:.1f}, LM and gated blocks "
        f"{(prefill_flops - media_flops) / 1e9:.1f}) at {prefill_flops / prefill_time / 1e9:.0f} "
        f"GFLOP/s; a 2048^3 float32 matmul runs at {peak / 1e9:.0f} GFLOP/s on this machine now, "
        f"so the prefill cannot take less than {prefill_flops / peak:.3f} s here")

  k = _DECODE_TOKENS.value
  fixed = 7 * _SHOT_TOKENS + _QUERY_TOKENS  # the 8-image prompt's length
  print(f"\n| images in prompt | per-token decode time (ms, batch {b}, prompt {fixed} tokens) |")
  print("|---|---|")
  for num_images in (1, 4, 8):
    batch = few_shot_batch(config, b, num_images, length=fixed)
    logits, cache = prefill(model.graph, model.params, batch.images, batch.input_ids,
                            batch.attention_mask, k + 1)
    cfg = GenerationConfig(max_new_tokens=k + 1, suppress_token_ids=(config.lm.vocab_size,))
    seconds = common.median_time(lambda: decode_loop(model.graph, model.params, logits, cache, cfg),
                          repeats)
    print(f"| {num_images} | {1e3 * seconds / k:.2f} |")

  print(f"\n| prompt tokens | prefill time (ms, batch {b}, 5 images) | per prompt token (us) |")
  print("|---|---|---|")
  for prompt_length in (84, 128, 192, config.lm.max_length - 8):
    batch = few_shot_batch(config, b, _SHOTS + 1, length=prompt_length)
    batch = Batch(batch.input_ids, np.ones_like(batch.attention_mask), batch.images,
                  batch.media_mask)  # the filler before the demonstrations counts as text
    seconds = common.median_time(lambda: prefill(model.graph, model.params, batch.images,
                                          batch.input_ids, batch.attention_mask, 8)[0], repeats)
    print(f"| {prompt_length} | {1e3 * seconds:.1f} | {1e6 * seconds / (b * prompt_length):.1f} |")
  print(f"\nafter: {common.load_average()}")


def main() -> None:
  cli.run(benchmark, name="benchmark-generate", doc=__doc__, module=__name__)


if __name__ == "__main__":
  main()
