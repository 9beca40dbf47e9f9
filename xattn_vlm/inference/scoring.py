"""Scoring: the log-likelihood of given continuations of a prompt (classification by ranking).

The prompt is prefilled once; its cache (LM keys/values, cross-attention keys/values of the last
image) is then repeated for each candidate continuation, and the continuations' tokens run through
cached decode steps. So scoring 1,000 class names costs one prompt forward plus the class names'
tokens, in chunks of ``candidate_batch_size`` candidates that all reuse the same prefill.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xattn_vlm.inference import decoding
from xattn_vlm.inference.model import InferenceModel, StaticGraph, as_inference_model
from xattn_vlm.inference.processor import ImageLike, Processor, Prompt
from xattn_vlm.models.flamingo import Flamingo, FlamingoCache


@functools.partial(jax.jit, static_argnames=("graph", "num_new"))
def prefill(graph: StaticGraph, params: nnx.State, images: jax.Array | None,
            input_ids: jax.Array, attention_mask: jax.Array, num_new: int,
            vision_features: jax.Array | None = None) -> tuple[jax.Array, FlamingoCache]:
  """The prompt's next-token logits [B, V] and a cache with room for ``num_new`` more tokens
  (``vision_features`` stand in for the images when given)."""
  logits, cache, _ = decoding.start_cached(graph.merge(params), images, input_ids, attention_mask,
                                           num_new, vision_features)
  return logits, cache


@functools.partial(jax.jit, static_argnames=("graph",))
def continuation_log_probs(graph: StaticGraph, params: nnx.State, logits: jax.Array,
                           cache: FlamingoCache, continuation_ids: jax.Array) -> jax.Array:
  """Per-token log-probs [B, C, Lc] of C continuations [B, C, Lc] of each of B prefilled prompts.

  ``logits`` [B, V] and ``cache`` come from ``prefill``; the cache is repeated C times, and all but
  the last continuation token are fed through decode steps. Positions past a continuation's end
  hold whatever its padding scored: mask them out.
  """
  model = graph.merge(params)
  b, c, length = continuation_ids.shape
  cache = decoding.map_batch(lambda x: jnp.repeat(x, c, axis=0), cache)
  ids = continuation_ids.reshape(b * c, length)

  def step(cache, token):
    logits, cache = model.decode_step(token[:, None], cache)
    return cache, logits[:, 0]

  _, later = jax.lax.scan(step, cache, ids[:, :-1].T)  # [Lc - 1, B * C, V]
  all_logits = jnp.concatenate([jnp.repeat(logits, c, axis=0)[None], later], axis=0)
  log_probs = jax.nn.log_softmax(all_logits, axis=-1)  # [Lc, B * C, V]
  chosen = jnp.take_along_axis(log_probs, ids.T[..., None], axis=-1)[..., 0]
  return chosen.T.reshape(b, c, length)


@dataclasses.dataclass(frozen=True)
class Scores:
  """Log-likelihoods of C continuations of each of B prompts.

  log_probs: float32 [B, C], the sum over each continuation's tokens.
  num_tokens: int32 [B, C], each continuation's length in tokens.
  """
  log_probs: np.ndarray
  num_tokens: np.ndarray

  @property
  def mean_log_probs(self) -> np.ndarray:
    """Length-normalised log-probs [B, C] (OpenFlamingo's ranking of class names)."""
    return self.log_probs / self.num_tokens


def score(model: Flamingo | InferenceModel, processor: Processor, prompts: Sequence[Prompt],
          continuations: Sequence[str] | Sequence[Sequence[str]],
          images: Sequence[Sequence[ImageLike]] | None = None, *,
          candidate_batch_size: int | None = None, pad_to_length: int | None = None,
          max_images: int | None = None,
          vision_features: Callable[[Sequence[ImageLike]], np.ndarray] | None = None) -> Scores:
  """Scores each continuation as a continuation of each prompt, prefilling each prompt once.

  Args:
    model, processor, prompts, images: as in ``generate``.
    continuations: one list of C strings shared by all prompts (class names), or one list of C
      strings per prompt. Their text is tokenized alone and appended to the prompt's tokens.
    candidate_batch_size: candidates run through the decode steps together (default all C); the
      prompts' prefill is reused for every chunk.
    pad_to_length, max_images, vision_features: as in ``Processor``.
  """
  model = as_inference_model(model)
  decoding.check_tokenizer(model, processor)
  batch = processor(prompts, images, pad_to_length=pad_to_length, max_images=max_images,
                    vision_features=vision_features)
  ids, num_tokens = _encode_continuations(processor, continuations, batch.batch_size)
  b, c, length = ids.shape
  context = model.config.lm.max_length
  if batch.input_ids.shape[1] + length > context:
    raise ValueError(f"prompt length ({batch.input_ids.shape[1]} tokens, padded) + the longest "
                     f"continuation ({length} tokens) must fit the model's context of {context}")
  chunk = c if candidate_batch_size is None else candidate_batch_size
  if chunk < 1:
    raise ValueError(f"candidate_batch_size must be >= 1, got {candidate_batch_size}")
  logits, cache = prefill(model.graph, model.params, batch.images, batch.input_ids,
                          batch.attention_mask, length, batch.vision_features)
  parts = []
  for start in range(0, c, chunk):
    part = ids[:, start:start + chunk]
    if part.shape[1] < chunk:  # keep one compiled shape: pad the last chunk with copies
      part = np.concatenate([part, np.repeat(part[:, -1:], chunk - part.shape[1], axis=1)], axis=1)
    parts.append(continuation_log_probs(model.graph, model.params, logits, cache, part))
  per_token = np.concatenate(jax.device_get(parts), axis=1)[:, :c]
  valid = np.arange(length) < num_tokens[..., None]
  return Scores(log_probs=np.where(valid, per_token, 0.0).sum(-1).astype(np.float32),
                num_tokens=num_tokens)


def _encode_continuations(processor: Processor, continuations, batch_size: int
                          ) -> tuple[np.ndarray, np.ndarray]:
  """Continuations -> right-padded ids [B, C, Lc] and lengths [B, C]."""
  if isinstance(continuations, str) or not continuations:
    raise ValueError(f"continuations must be a non-empty list of strings (or one list per "
                     f"prompt), got {continuations!r:.80}")
  if all(isinstance(x, str) for x in continuations):
    per_prompt = [list(continuations)] * batch_size
  else:
    per_prompt = [list(x) for x in continuations]
    if len(per_prompt) != batch_size:
      raise ValueError(f"continuations must hold one list per prompt: {batch_size} prompts but "
                       f"{len(per_prompt)} lists")
    if len({len(x) for x in per_prompt}) != 1:
      raise ValueError("every prompt must have the same number of continuations, got "
                       f"{[len(x) for x in per_prompt]}")
  tokenizer = processor.tokenizer
  encoded = []
  for i, texts in enumerate(per_prompt):
    row = []
    for j, text in enumerate(texts):
      ids = tokenizer.encode(text)
      if not ids:
        raise ValueError(f"continuation {j} of prompt {i} is empty (0 tokens)")
      if tokenizer.media_token_id in ids:
        raise ValueError(f"continuation {j} of prompt {i} contains <image>: continuations are "
                         f"text only, got {text!r}")
      row.append(ids)
    encoded.append(row)
  length = max(len(ids) for row in encoded for ids in row)
  out = np.full((batch_size, len(per_prompt[0]), length), tokenizer.pad_token_id, np.int32)
  num_tokens = np.zeros(out.shape[:2], np.int32)
  for i, row in enumerate(encoded):
    for j, ids in enumerate(row):
      out[i, j, :len(ids)] = ids
      num_tokens[i, j] = len(ids)
  return out, num_tokens
