"""Training-free fusion: a frozen text-only LM given eyes at inference time, no gradient anywhere.

* MAGiC-style decoding (Su et al. 2022, "Language Models Can See"): at each step the frozen LM's
  top-k next tokens are re-ranked by ``log p(token) + weight * sim(image, text so far + token)``,
  ``sim`` the cosine similarity of the vision-pretrain stage's contrastive towers
  (``models.contrastive.DualEncoder``). Weight 0 is greedy decoding of the LM.
* PICa / Socratic prompting (Yang et al. 2022; Zeng et al. 2022): a captioner's text output
  stands for each image in the frozen LM's prompt, and the few-shot demonstrations are text too.

The LM (``models.lm.DecoderLM``) decodes over its own ``LMCache``: one prefill of the left-padded
prompt, then ``decoding.sample_loop`` until every sequence has stopped. MAGiC encodes the k
candidate texts of every sequence at every step: k text-tower forwards of the generated text.
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
from xattn_vlm.inference.model import StaticGraph
from xattn_vlm.inference.processor import ImageLike, Processor
from xattn_vlm.models import layers
from xattn_vlm.models.contrastive import DualEncoder
from xattn_vlm.models.lm import DecoderLM


@dataclasses.dataclass(frozen=True)
class MagicConfig:
  """How MAGiC decoding picks tokens. Hashable: the compiled loop is specialised on it.

  weight: the similarity's weight against the LM's log-prob (0: greedy decoding).
  num_candidates: the LM's top-k next tokens that are re-ranked.
  max_new_tokens: at most this many tokens per sequence (stop token included).
  stop_token_ids: a sequence ends after emitting one of these.
  pad_token_id: fills the positions after a sequence's end.
  """
  weight: float = 1.0
  num_candidates: int = 8
  max_new_tokens: int = 16
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0

  def __post_init__(self):
    if self.num_candidates < 1:
      raise ValueError(f"num_candidates must be >= 1, got {self.num_candidates}")
    if not np.isfinite(self.weight) or self.weight < 0:
      raise ValueError(f"weight must be a finite number >= 0, got {self.weight}")
    # The decoding loop's settings check max_new_tokens and normalise the stop ids.
    object.__setattr__(self, "stop_token_ids", self.generation.stop_token_ids)

  @property
  def generation(self) -> decoding.GenerationConfig:
    """The settings of ``decoding.sample_loop``, which MAGiC's re-ranking runs in."""
    return decoding.GenerationConfig(max_new_tokens=self.max_new_tokens,
                                     stop_token_ids=self.stop_token_ids,
                                     pad_token_id=self.pad_token_id)


def _decode(lm: DecoderLM, input_ids: jax.Array, attention_mask: jax.Array,
            config: decoding.GenerationConfig, choose: decoding.Choose | None = None
            ) -> decoding.GenerationOutput:
  """Prefill the LM's cache, then ``decoding.sample_loop``."""
  b, length = input_ids.shape
  cache = lm.init_cache(b, length + config.max_new_tokens)
  hidden, cache = lm.forward_embeddings(lm.embed_tokens(input_ids),
                                        layers.default_positions(attention_mask), attention_mask,
                                        cache=cache)
  position = attention_mask.sum(axis=-1).astype(jnp.int32)

  def step(token, state):
    cache, t = state
    hidden, cache = lm.forward_embeddings(lm.embed_tokens(token[:, None]),
                                          (position + t)[:, None], jnp.ones((b, 1), jnp.int32),
                                          cache=cache)
    return lm.logits(hidden[:, -1]), (cache, t + 1)

  return decoding.sample_loop(lm.logits(hidden[:, -1]), (cache, jnp.int32(0)), step, config,
                              jax.random.key(0), choose)


def candidate_scores(log_probs: jax.Array, similarity: jax.Array, weight: float) -> jax.Array:
  """MAGiC's ranking of the k candidates of each sequence: ``log p + weight * sim``. [B, k]."""
  return log_probs + weight * similarity


@functools.partial(jax.jit, static_argnames=("lm_graph", "config"))
def _greedy(lm_graph: StaticGraph, lm_params: nnx.State, input_ids, attention_mask,
            config: decoding.GenerationConfig):
  return _decode(lm_graph.merge(lm_params), input_ids, attention_mask, config)


@functools.partial(jax.jit, static_argnames=("lm_graph", "tower_graph", "config"))
def _magic(lm_graph: StaticGraph, lm_params: nnx.State, tower_graph: StaticGraph,
           tower_params: nnx.State, pixels, input_ids, attention_mask, config: MagicConfig):
  lm, towers = lm_graph.merge(lm_params), tower_graph.merge(tower_params)
  image_emb = towers.encode_image(pixels)  # [B, E]
  k = min(config.num_candidates, lm.cfg.vocab_size)

  def choose(logits, out, t):
    b, n = out.tokens.shape
    mask = (jnp.arange(n) < out.lengths[:, None]).astype(jnp.int32)  # the text so far
    log_probs, candidates = jax.lax.top_k(jax.nn.log_softmax(logits), k)  # [B, k]
    texts = jnp.repeat(out.tokens[:, None], k, axis=1).at[:, :, t].set(candidates)  # [B, k, N]
    text_mask = jnp.repeat(mask[:, None], k, axis=1).at[:, :, t].set(1)
    text_emb = towers.encode_text(texts.reshape(b * k, n), text_mask.reshape(b * k, n))
    similarity = jnp.einsum("be,bke->bk", image_emb, text_emb.reshape(b, k, -1))
    scores = candidate_scores(log_probs, similarity, config.weight)
    return jnp.take_along_axis(candidates, jnp.argmax(scores, axis=-1)[:, None], axis=1)[:, 0]

  return _decode(lm, input_ids, attention_mask, config.generation, choose)


def _check_vocabularies(lm: DecoderLM, towers: DualEncoder | None, processor: Processor) -> None:
  vocab = lm.cfg.vocab_size
  if processor.tokenizer.lm_vocab_size != vocab:
    raise ValueError(f"the processor's tokenizer has {processor.tokenizer.lm_vocab_size} LM ids "
                     f"but the LM's vocabulary has {vocab}: use the LM's tokenizer")
  if towers is not None and towers.text_vocab_size != vocab:
    raise ValueError(f"the contrastive text tower reads {towers.text_vocab_size} ids but the LM "
                     f"has {vocab}: MAGiC needs towers trained with the LM's tokenizer")


def _text_batch(processor: Processor, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
  """Text-only prompts, left padded; they must not hold ``<image>`` (the LM cannot see)."""
  if isinstance(prompts, str) or not prompts:
    raise ValueError(f"prompts must be a non-empty list of text prompts, got {prompts!r:.80}")
  batch = processor(list(prompts))
  if (batch.input_ids == processor.tokenizer.media_token_id).any():
    raise ValueError("prompts for a text-only LM must not contain <image>; the image goes in "
                     "images (MAGiC) or through the captioner (Socratic)")
  return jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)


def _stop_ids(processor: Processor, stop_token_ids) -> tuple[int, ...]:
  return (processor.tokenizer.eos_token_id,) if stop_token_ids is None else tuple(stop_token_ids)


def greedy_text(lm: DecoderLM, processor: Processor, prompts: Sequence[str], *,
                max_new_tokens: int = 16,
                stop_token_ids: Sequence[int] | None = None) -> decoding.Generation:
  """Greedy continuations of text prompts by a bare LM (stops at EOS by default)."""
  _check_vocabularies(lm, None, processor)
  input_ids, attention_mask = _text_batch(processor, prompts)
  graphdef, params = nnx.split(lm)
  config = decoding.GenerationConfig(max_new_tokens=max_new_tokens,
                                     stop_token_ids=_stop_ids(processor, stop_token_ids),
                                     pad_token_id=processor.tokenizer.pad_token_id)
  out = _greedy(StaticGraph(graphdef), params, input_ids, attention_mask, config)
  return decoding.decoded(processor.tokenizer, out)


def magic_tokens(lm: DecoderLM, towers: DualEncoder, pixels: jax.Array, input_ids: jax.Array,
                 attention_mask: jax.Array, config: MagicConfig) -> decoding.GenerationOutput:
  """MAGiC decoding of B left-padded prompts, one image each (pixels [B, H, W, C], the towers'
  normalisation); the log-probs are the LM's, of the tokens the re-ranking chose."""
  if pixels.ndim != 4 or pixels.shape[0] != input_ids.shape[0]:
    raise ValueError(f"pixels must be [B, H, W, C] with B = {input_ids.shape[0]} (one image per "
                     f"prompt), got shape {tuple(pixels.shape)}")
  lm_graph, lm_params = nnx.split(lm)
  tower_graph, tower_params = nnx.split(towers)
  return _magic(StaticGraph(lm_graph), lm_params, StaticGraph(tower_graph), tower_params,
                pixels, input_ids, attention_mask, config)


def magic_generate(lm: DecoderLM, towers: DualEncoder, processor: Processor,
                   prompts: Sequence[str], images: Sequence[ImageLike], *, weight: float = 1.0,
                   num_candidates: int = 8, max_new_tokens: int = 16,
                   stop_token_ids: Sequence[int] | None = None) -> decoding.Generation:
  """Captions (or any continuation) of text ``prompts`` (e.g. "A picture of"), one image each,
  by MAGiC decoding. ``processor`` holds the LM's tokenizer and the towers' image size and pixel
  statistics (``Processor(tokenizer, image_size=..., image_mean=..., image_std=...,
  max_length=...)``). Stops at EOS by default."""
  _check_vocabularies(lm, towers, processor)
  if len(images) != len(prompts):
    raise ValueError(f"images must hold one image per prompt: {len(prompts)} prompts but "
                     f"{len(images)} images")
  input_ids, attention_mask = _text_batch(processor, prompts)
  pixels = jnp.asarray(np.stack([processor.preprocess_image(image, i, 0)
                                 for i, image in enumerate(images)]))
  config = MagicConfig(weight=weight, num_candidates=num_candidates,
                       max_new_tokens=max_new_tokens,
                       stop_token_ids=_stop_ids(processor, stop_token_ids),
                       pad_token_id=processor.tokenizer.pad_token_id)
  return decoding.decoded(processor.tokenizer,
                          magic_tokens(lm, towers, pixels, input_ids, attention_mask, config))


# -- PICa / Socratic -----------------------------------------------------------------------------

SOCRATIC_TEMPLATE = "Context: {context}\nQuestion: {question}\nAnswer: {answer}"


def socratic_prompt(context: str, question: str,
                    demos: Sequence[tuple[str, str, str]] = (), *,
                    template: str = SOCRATIC_TEMPLATE, separator: str = "\n\n") -> str:
  """The frozen LM's prompt: each demonstration ``(context, question, answer)`` as text, then the
  query. ``template`` (PICa's layout by default) has ``{context}``, ``{question}`` and, at its
  end, ``{answer}``; demonstrations are followed by ``separator``, and the query stops where its
  answer would start (trailing spaces dropped)."""
  for field in ("{context}", "{question}", "{answer}"):
    if field not in template:
      raise ValueError(f"template must hold {field}, got {template!r}")
  if not template.endswith("{answer}"):
    raise ValueError(f"template must end with {{answer}}, got {template!r}")
  shots = "".join(template.format(context=c, question=q, answer=a) + separator
                  for c, q, a in demos)
  return shots + template.format(context=context, question=question, answer="").rstrip(" ")


def socratic_answer(lm: DecoderLM, processor: Processor,
                    captioner: Callable[[Sequence[ImageLike]], Sequence[str]],
                    images: Sequence[ImageLike], questions: Sequence[str],
                    demos: Sequence[tuple[ImageLike, str, str]] = (), *,
                    max_new_tokens: int = 8, template: str = SOCRATIC_TEMPLATE,
                    separator: str = "\n\n") -> list[str]:
  """Answers ``questions`` about ``images`` with a frozen text-only LM: ``captioner`` (images ->
  one text each: a Flamingo-family model's captions, MAGiC's, a classifier's labels) describes
  every query and demonstration image once; the LM reads ``socratic_prompt`` (with ``template``
  and ``separator``) and answers greedily up to the end of the line."""
  if len(images) != len(questions):
    raise ValueError(f"images and questions must pair up: {len(images)} images but "
                     f"{len(questions)} questions")
  demo_images = [image for image, _, _ in demos]
  contexts = list(captioner(list(demo_images) + list(images)))
  if len(contexts) != len(demo_images) + len(images):
    raise ValueError(f"the captioner returned {len(contexts)} texts for "
                     f"{len(demo_images) + len(images)} images: it must return one per image")
  shots = [(contexts[i], q, a) for i, (_, q, a) in enumerate(demos)]
  prompts = [socratic_prompt(context, question, shots, template=template, separator=separator)
             for context, question in zip(contexts[len(demos):], questions)]
  out = greedy_text(lm, processor, prompts, max_new_tokens=max_new_tokens)
  return [text.split("\n")[0].strip() for text in out.text]
