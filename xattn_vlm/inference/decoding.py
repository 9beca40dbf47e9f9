"""Generation: one prefill, then a compiled decode loop (``lax.while_loop``) over cached state.

The prompt is prefilled once: the media latents, every gated block's cross-attention keys/values and
the LM KV cache are computed there and only read afterwards. Each loop iteration feeds one token
per sequence through ``Flamingo.decode_step``. The loop stops when every sequence has emitted a stop
token (``<|endofchunk|>`` or EOS by default) or after ``max_new_tokens``.

Decoding state is a pytree whose non-scalar leaves are batch-major, so beam search expands and
reorders it with one gather. ``use_cache=False`` swaps the cached state for a token buffer that is
run through the full forward at every step: the reference the cached path is tested against, and
the baseline of the benchmark.

Three policies pick tokens: greedy, sampling (temperature, then top-k, then top-p) and beam search
with a length penalty. ``<image>`` is never generated: no image could follow it, and docs/model.md
fixes that new tokens attend to the prompt's last image. Reported log-probs are the model's own
(``log_softmax`` of its logits, before temperature or filtering), so they compare across policies
and with ``score``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from xattn_vlm.inference.model import InferenceModel, StaticGraph, as_inference_model
from xattn_vlm.inference.processor import Batch, ImageLike, Processor, Prompt
from xattn_vlm.models.flamingo import Flamingo, FlamingoCache

# (tokens [B], state) -> (next-token logits [B, V], state)
Step = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How new tokens are chosen. Hashable: the compiled loop is specialised on it.

  Attributes:
    max_new_tokens: at most this many tokens per sequence (stop token included).
    num_beams: 1 for greedy or sampling; more for beam search.
    length_penalty: beam search ranks finished sequences by ``sum_log_prob / length **
      length_penalty`` (Hugging Face's convention; 0 ranks by total log-prob, negative prefers
      shorter sequences; OpenFlamingo's evaluation used 0.0 and, earlier, -2.0).
    do_sample: sample instead of taking the argmax (num_beams must be 1).
    temperature, top_k, top_p: sampling filters, applied in this order (top_k 0 and top_p 1
      switch theirs off).
    stop_token_ids: a sequence ends after emitting one of these (None entries, a model's missing
      ``<|endofchunk|>``, are dropped).
    pad_token_id: fills the positions after a sequence's end.
    suppress_token_ids: never generated (``<image>``).
    use_cache: False recomputes the full forward at each step (a reference, slow).
  """
  max_new_tokens: int = 20
  num_beams: int = 1
  length_penalty: float = 0.0
  do_sample: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  suppress_token_ids: tuple[int, ...] = ()
  use_cache: bool = True

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.do_sample and self.num_beams > 1:
      raise ValueError(f"do_sample=True needs num_beams=1 (sampled beams are not supported), got "
                       f"num_beams={self.num_beams}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got "
                       f"{self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")
    object.__setattr__(self, "stop_token_ids",
                       tuple(int(i) for i in self.stop_token_ids if i is not None))
    object.__setattr__(self, "suppress_token_ids", tuple(int(i) for i in self.suppress_token_ids))


@struct.dataclass
class GenerationOutput:
  """Arrays of one generation call (B prompts, N = max_new_tokens).

  tokens: int32 [B, N], the new tokens; ``pad_token_id`` after a sequence's end.
  log_probs: float32 [B, N], each token's log-prob under the model; 0 after the end.
  lengths: int32 [B], tokens generated, the stop token included.
  stopped: bool [B], whether the sequence ended with a stop token (else it hit max_new_tokens).
  scores: float32 [B], what ranked the sequence: its total log-prob, length-penalised for beams.
  """
  tokens: jax.Array
  log_probs: jax.Array
  lengths: jax.Array
  stopped: jax.Array
  scores: jax.Array


# (logits [B, V], the output so far, step t) -> next tokens [B]
Choose = Callable[[jax.Array, GenerationOutput, jax.Array], jax.Array]


# -- decoding state: cached (prefill + decode_step) or recomputed (full forward) ----------------


def keep_last_media(cache: FlamingoCache, num_latents: int) -> FlamingoCache:
  """Keeps only the cross-attention keys/values of each prompt's last image.

  New tokens attend to the prompt's last image alone (with ``only_attend_immediate_media``), so the
  other images' keys/values are dead weight in every decode step; dropping them makes a step cost
  the same however many images the prompt holds. Prompts without images keep slot 0, masked off.
  """
  slot = jnp.maximum(cache.media_index - 1, 0)  # [B], 0-based image of each prompt's last token

  def last(x):  # [B, H, T * n, Dh] -> [B, H, n, Dh]
    return jax.vmap(lambda xb, s: jax.lax.dynamic_slice_in_dim(xb, s * num_latents, num_latents,
                                                               axis=1))(x, slot)

  return cache.replace(media_kv=tuple((last(k), last(v)) for k, v in cache.media_kv),
                       media_index=jnp.minimum(cache.media_index, 1))


def start_cached(model: Flamingo, images: jax.Array | None, input_ids: jax.Array,
                 attention_mask: jax.Array, num_new: int,
                 vision_features: jax.Array | None = None) -> tuple[jax.Array, Any, Step]:
  """Prefills the prompt with room for ``num_new`` tokens: (last logits [B, V], cache, step).
  ``vision_features`` (the tower's output, [B, T, F, P, D]) stand in for the images."""
  logits, cache = model.prefill(images, input_ids, attention_mask,
                                max_length=input_ids.shape[1] + num_new, last_only=True,
                                vision_features=vision_features)
  if model.config.xattn.only_attend_immediate_media:
    cache = keep_last_media(cache, model.config.resampler.num_latents)

  def step(tokens, cache):
    logits, cache = model.decode_step(tokens[:, None], cache)
    return logits[:, 0], cache

  return logits[:, -1], cache, step


def start_uncached(model: Flamingo, images: jax.Array | None, input_ids: jax.Array,
                   attention_mask: jax.Array, num_new: int,
                   vision_features: jax.Array | None = None) -> tuple[jax.Array, Any, Step]:
  """The recompute-everything reference: the state is the images and a token buffer with room for
  the tokens fed back, and every step runs the training forward over the whole buffer."""
  b, length = input_ids.shape
  buffer = jnp.concatenate([input_ids, jnp.zeros((b, num_new - 1), input_ids.dtype)], axis=1)
  mask = jnp.concatenate([attention_mask, jnp.zeros((b, num_new - 1), attention_mask.dtype)],
                         axis=1)
  state = (images, vision_features, buffer, mask, jnp.zeros((), jnp.int32))
  prefix_end = jnp.full((b,), length, jnp.int32)  # joint fusion: the prompt is the prefix

  def step(tokens, state):
    images, features, buffer, mask, t = state
    buffer = jax.lax.dynamic_update_slice(buffer, tokens[:, None].astype(buffer.dtype),
                                          (0, length + t))
    mask = jax.lax.dynamic_update_slice(mask, jnp.ones((b, 1), mask.dtype), (0, length + t))
    logits = model(images, buffer, mask, vision_features=features, prefix_end=prefix_end)
    return jax.lax.dynamic_index_in_dim(logits, length + t, axis=1, keepdims=False), (
        images, features, buffer, mask, t + 1)

  return (model(images, input_ids, attention_mask, vision_features=vision_features,
                prefix_end=prefix_end)[:, -1], state, step)


def map_batch(fn: Callable[[jax.Array], jax.Array], state: Any) -> Any:
  """Applies ``fn`` to the batch axis of every non-scalar leaf of a decoding state."""
  return jax.tree.map(lambda x: fn(x) if x.ndim else x, state)


# -- token choice ------------------------------------------------------------------------------


def _suppress(logits: jax.Array, config: GenerationConfig) -> jax.Array:
  if not config.suppress_token_ids:
    return logits
  banned = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(config.suppress_token_ids)].set(True)
  return jnp.where(banned, -jnp.inf, logits)


def filter_logits(logits: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """Sets to -inf the logits outside the top ``top_k`` and outside the smallest set of most likely
  tokens whose probability reaches ``top_p`` (the most likely token always stays)."""
  if top_k:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the more likely tokens
    threshold = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _choose(logits: jax.Array, config: GenerationConfig, key: jax.Array) -> jax.Array:
  """Greedy or sampled next tokens [B] from logits [B, V]."""
  logits = _suppress(logits, config)
  if not config.do_sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / config.temperature, config.top_k, config.top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample_loop(logits: jax.Array, state: Any, step: Step, config: GenerationConfig,
                rng: jax.Array, choose: Choose | None = None) -> GenerationOutput:
  """Greedy or sampled decoding: one token per sequence per iteration, until every sequence has
  stopped. ``choose`` replaces the greedy/sampled pick (e.g. a re-ranking of candidates)."""
  b, n = logits.shape[0], config.max_new_tokens
  stop = jnp.asarray(config.stop_token_ids, jnp.int32)

  def pick(t, logits, out):
    if choose is None:
      token = _choose(logits, config, jax.random.fold_in(rng, t))
    else:
      token = choose(logits, out, t)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    active = ~out.stopped
    token = jnp.where(active, token, config.pad_token_id)
    log_prob = jnp.where(active, log_prob, 0.0)
    return out.replace(tokens=out.tokens.at[:, t].set(token),
                       log_probs=out.log_probs.at[:, t].set(log_prob),
                       lengths=out.lengths + active,
                       stopped=out.stopped | (active & jnp.isin(token, stop)),
                       scores=out.scores + log_prob)

  out = GenerationOutput(tokens=jnp.full((b, n), config.pad_token_id, jnp.int32),
                         log_probs=jnp.zeros((b, n), jnp.float32),
                         lengths=jnp.zeros((b,), jnp.int32), stopped=jnp.zeros((b,), bool),
                         scores=jnp.zeros((b,), jnp.float32))
  out = pick(0, logits, out)

  def cond(loop):
    t, out, _ = loop
    return (t < n) & ~out.stopped.all()

  def body(loop):
    t, out, state = loop
    logits, state = step(out.tokens[:, t - 1], state)
    return t + 1, pick(t, logits, out), state

  _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, state))
  return out


@struct.dataclass
class _Beams:
  """Beam-search state for B prompts, K beams, N new tokens: K live hypotheses per prompt and the
  best finished one (ended by a stop token), ranked by length-penalised score."""
  tokens: jax.Array  # [B, K, N]
  log_probs: jax.Array  # [B, K, N]
  score: jax.Array  # [B, K], total log-prob; -inf for empty beams
  done_tokens: jax.Array  # [B, N]
  done_log_probs: jax.Array  # [B, N]
  done_score: jax.Array  # [B], length-penalised; -inf while none finished
  done_length: jax.Array  # [B]


def _penalised(score: jax.Array, length: jax.Array, config: GenerationConfig) -> jax.Array:
  return score / jnp.asarray(length, jnp.float32) ** config.length_penalty


def beam_search(logits: jax.Array, state: Any, step: Step,
                config: GenerationConfig) -> GenerationOutput:
  """Beam search: at step t the K live beams' extensions are ranked by total log-prob; those that
  end in a stop token compete, length-penalised, for the finished slot, the best K others live on.
  A prompt is settled once no live beam can beat its finished one (log-probs only decrease)."""
  b, v = logits.shape
  k, n = config.num_beams, config.max_new_tokens
  stop = jnp.asarray(config.stop_token_ids, jnp.int32)
  # Enough candidates that K survive even if every beam's best extensions are stop tokens.
  num_candidates = min(k * (1 + len(config.stop_token_ids)), k * v)
  state = map_batch(lambda x: jnp.repeat(x, k, axis=0), state)
  logits = jnp.repeat(logits, k, axis=0)

  def expand(t, logits, beams, state):
    log_probs = jax.nn.log_softmax(logits).reshape(b, k * v)
    total = beams.score.reshape(b, k, 1) + _suppress(log_probs.reshape(b, k, v), config)
    score, index = jax.lax.top_k(total.reshape(b, k * v), num_candidates)  # [B, M]
    parent, token = index // v, (index % v).astype(jnp.int32)
    token_log_prob = jnp.take_along_axis(log_probs, index, axis=1)
    tokens = jnp.take_along_axis(beams.tokens, parent[..., None], axis=1).at[:, :, t].set(token)
    seq_log_probs = jnp.take_along_axis(beams.log_probs, parent[..., None], axis=1)
    seq_log_probs = seq_log_probs.at[:, :, t].set(token_log_prob)
    is_stop = jnp.isin(token, stop)

    finished = jnp.where(is_stop, _penalised(score, t + 1, config), -jnp.inf)
    best = jnp.argmax(finished, axis=1)[:, None]  # [B, 1]
    best_score = jnp.take_along_axis(finished, best, axis=1)[:, 0]
    better = best_score > beams.done_score
    done_tokens = jnp.where(better[:, None],
                            jnp.take_along_axis(tokens, best[..., None], axis=1)[:, 0],
                            beams.done_tokens)
    done_log_probs = jnp.where(better[:, None],
                               jnp.take_along_axis(seq_log_probs, best[..., None], axis=1)[:, 0],
                               beams.done_log_probs)

    live_score, keep = jax.lax.top_k(jnp.where(is_stop, -jnp.inf, score), k)  # [B, K]
    beams = _Beams(tokens=jnp.take_along_axis(tokens, keep[..., None], axis=1),
                   log_probs=jnp.take_along_axis(seq_log_probs, keep[..., None], axis=1),
                   score=live_score, done_tokens=done_tokens, done_log_probs=done_log_probs,
                   done_score=jnp.where(better, best_score, beams.done_score),
                   done_length=jnp.where(better, t + 1, beams.done_length))
    rows = (jnp.arange(b)[:, None] * k + jnp.take_along_axis(parent, keep, axis=1)).reshape(-1)
    return beams, map_batch(lambda x: x[rows], state)

  def settled(t, beams):
    # The best score a live beam can still reach: its log-prob can only fall, so with a positive
    # penalty at the longest length, otherwise at its current length.
    bound_length = n if config.length_penalty > 0 else t
    return beams.done_score >= _penalised(beams.score[:, 0], bound_length, config)

  beams = _Beams(
      tokens=jnp.full((b, k, n), config.pad_token_id, jnp.int32),
      log_probs=jnp.zeros((b, k, n), jnp.float32),
      score=jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (b, 1)),
      done_tokens=jnp.full((b, n), config.pad_token_id, jnp.int32),
      done_log_probs=jnp.zeros((b, n), jnp.float32),
      done_score=jnp.full((b,), -jnp.inf), done_length=jnp.zeros((b,), jnp.int32))
  beams, state = expand(0, logits, beams, state)

  def cond(loop):
    t, beams, _ = loop
    return (t < n) & ~settled(t, beams).all()

  def body(loop):
    t, beams, state = loop
    logits, state = step(beams.tokens[:, :, t - 1].reshape(-1), state)
    beams, state = expand(t, logits, beams, state)
    return t + 1, beams, state

  t, beams, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), beams, state))
  # A live beam that reached the end competes as it is (truncated at max_new_tokens).
  live_score = _penalised(beams.score[:, 0], t, config)
  use_live = live_score > beams.done_score
  return GenerationOutput(
      tokens=jnp.where(use_live[:, None], beams.tokens[:, 0], beams.done_tokens),
      log_probs=jnp.where(use_live[:, None], beams.log_probs[:, 0], beams.done_log_probs),
      lengths=jnp.where(use_live, t, beams.done_length).astype(jnp.int32),
      stopped=~use_live,
      scores=jnp.where(use_live, live_score, beams.done_score))


# -- entry points ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graph", "config"))
def _generate(graph: StaticGraph, params: nnx.State, images, input_ids, attention_mask, rng,
              config: GenerationConfig, vision_features=None) -> GenerationOutput:
  model = graph.merge(params)
  start = start_cached if config.use_cache else start_uncached
  logits, state, step = start(model, images, input_ids, attention_mask, config.max_new_tokens,
                              vision_features)
  if config.num_beams > 1:
    return beam_search(logits, state, step, config)
  return sample_loop(logits, state, step, config, rng)


def generate_tokens(model: Flamingo | InferenceModel, batch: Batch, config: GenerationConfig,
                    rng: jax.Array | int = 0) -> GenerationOutput:
  """Compiled generation for a processed batch (shapes and ``config`` select the compiled code).

  Args:
    model: a Flamingo model, or an ``InferenceModel`` (split once: no graph walk per call); its
      parameters may be sharded over a mesh.
    batch: left-padded inputs from ``Processor``.
    config: the decoding policy.
    rng: a PRNG key or an int seed (sampling only).
  """
  model = as_inference_model(model)
  length = batch.input_ids.shape[1]
  context = model.config.lm.max_length
  if length + config.max_new_tokens > context:
    raise ValueError(f"prompt length ({length} tokens, padded) + max_new_tokens "
                     f"({config.max_new_tokens}) must fit the model's context of {context} tokens")
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  return _generate(model.graph, model.params, batch.images, batch.input_ids,
                   batch.attention_mask, rng, config, batch.vision_features)


@dataclasses.dataclass(frozen=True)
class Generation:
  """Generated continuations of a batch of prompts.

  text: per prompt, the new text up to (not including) its stop token.
  tokens, log_probs, lengths, stopped, scores: as in ``GenerationOutput``, as numpy arrays.
  """
  text: list[str]
  tokens: np.ndarray
  log_probs: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  scores: np.ndarray


def check_tokenizer(model: Flamingo | InferenceModel, processor: Processor) -> None:
  """The processor's tokenizer must give the special tokens the model's ids."""
  processor.tokenizer.require_model(model.config, where="in the model's config")


def generate(model: Flamingo | InferenceModel, processor: Processor, prompts: Sequence[Prompt],
             images: Sequence[Sequence[ImageLike]] | None = None, *, max_new_tokens: int = 20,
             num_beams: int = 1, length_penalty: float = 0.0, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_token_ids: Sequence[int] | None = None, use_cache: bool = True,
             rng: jax.Array | int = 0, pad_to_length: int | None = None,
             max_images: int | None = None) -> Generation:
  """Continues each prompt (interleaved text and images) and decodes the new text.

  Greedy by default; ``do_sample`` samples, ``num_beams > 1`` runs beam search. Generation stops per
  sequence at ``stop_token_ids`` (default ``<|endofchunk|>``, when the model has one, and EOS).
  ``pad_to_length`` and ``max_images`` pad the batch to fixed shapes so repeated calls reuse one
  compiled loop. Other arguments: ``GenerationConfig``.
  """
  model = as_inference_model(model)
  check_tokenizer(model, processor)
  tokenizer = processor.tokenizer
  if stop_token_ids is None:
    stop_token_ids = (tokenizer.eoc_token_id, tokenizer.eos_token_id)
  config = GenerationConfig(
      max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty,
      do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
      stop_token_ids=tuple(stop_token_ids), pad_token_id=tokenizer.pad_token_id,
      suppress_token_ids=(tokenizer.media_token_id,), use_cache=use_cache)
  batch = processor(prompts, images, pad_to_length=pad_to_length, max_images=max_images)
  return decoded(tokenizer, generate_tokens(model, batch, config, rng))


def decoded(tokenizer, out: GenerationOutput) -> Generation:
  """A generation's arrays on the host, with each sequence's text up to its stop token."""
  out = jax.device_get(out)
  text = [tokenizer.decode(tokens[:length - int(stopped)])
          for tokens, length, stopped in zip(out.tokens, out.lengths, out.stopped)]
  return Generation(text=text, tokens=out.tokens, log_probs=out.log_probs, lengths=out.lengths,
                    stopped=out.stopped, scores=out.scores)
