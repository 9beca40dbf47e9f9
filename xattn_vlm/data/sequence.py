"""Interleaved image-text documents -> fixed-size model inputs, with Flamingo's label mask.

Layout (OpenFlamingo's): the text before the first image as is (the one text that may hold
``<|endofchunk|>``, closing text-only demonstrations as a 0-shot prompt does, ``data.fewshot``;
it is never supervised and shifts no image); then, for each image, ``<image>``,
the text that follows it and ``<|endofchunk|>``; EOS at the end of the document (after BOS when the
tokenizer has one). An image-text pair is ``<image>{caption}<|endofchunk|>{eos}``.

Which tokens are supervised is decided in one place, ``supervised_mask``:
  * ignored: padding, ``<image>`` tokens, everything before the first ``<image>``, and everything
    after an ``<|endofchunk|>`` until the next ``<image>``;
  * supervised: the text of each chunk and the ``<|endofchunk|>`` that closes it (predicting it is
    how the model learns to stop);
  * so the final EOS, which follows the last ``<|endofchunk|>``, is ignored. The model never needs
    it: generation stops at ``<|endofchunk|>``, and what follows a chunk (more text, another image
    or the end) is the document's business, not the image's. OpenFlamingo trains the same way.
``build_example(..., supervise="answer")`` narrows this to the answer of a question-answer record:
the tokens its last text chunk adds and the closing ``<|endofchunk|>`` (a VQA record is ``[image,
"Question:... Short answer:", "red"]``). Under the LM loss on every token, the one answer token
that needs the image is a small share of the loss, among question tokens the frozen LM predicts
from the text alone.
A document may have no supervised token (no image, or cut right after ``<image>``); the loss must
then use a safe denominator, ``max(count, 1)``, so it contributes zero and not NaN.

Under the ``prefix`` and ``joint`` fusion modes an image stands as a run of ``media_tokens``
consecutive ``<image>`` tokens (``models.config.media_tokens_per_image``), each of which takes
one of its latents as input; ``expand_media_tokens`` writes such runs, here and in the processor.

Truncation keeps the document's beginning and never separates an image from its tokens:
  * images beyond ``max_images`` are dropped with their ``<image>``, their text and their
    ``<|endofchunk|>``: that text describes a dropped image, and attached to the previous chunk it
    would teach the model to describe the wrong image. The shorter document still ends with EOS.
  * then the tokens are cut at ``max_tokens``; an image whose ``<image>`` token (or any token of
    its run) was cut is dropped, with the rest of its run.
    The last chunk may lose its tail (and its ``<|endofchunk|>``); what is left stays supervised.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

IGNORE_INDEX = -100
SUPERVISE = ("all", "answer")  # build_example's label rules: every chunk's text, or the answer


def supervised_mask(input_ids, media_token_id: int, eoc_token_id: int,
                    attention_mask) -> np.ndarray:
  """Boolean mask of the tokens the LM loss is computed on (the rule in the module docstring).

  ``input_ids`` and ``attention_mask`` are [..., T] (1/True on real tokens, 0/False on padding);
  token t is supervised when it is a real token, not ``<image>``, and the latest ``<image>`` at or
  before t comes after the latest ``<|endofchunk|>`` strictly before t.
  """
  ids = np.asarray(input_ids)
  valid = np.asarray(attention_mask).astype(bool)
  if ids.shape != valid.shape or ids.ndim == 0:
    raise ValueError(f"input_ids and attention_mask must have the same shape [..., T], got "
                     f"{ids.shape} and {valid.shape}")
  positions = np.broadcast_to(np.arange(ids.shape[-1]), ids.shape)
  is_media = ids == media_token_id
  last_media = np.maximum.accumulate(np.where(is_media, positions, -1), axis=-1)
  last_eoc = np.maximum.accumulate(np.where(ids == eoc_token_id, positions, -1), axis=-1)
  eoc_before = np.concatenate([np.full_like(last_eoc[..., :1], -1), last_eoc[..., :-1]], axis=-1)
  return (last_media > eoc_before) & ~is_media & valid


def expand_media_tokens(ids: Sequence[int], media_token_id: int, media_tokens: int) -> list[int]:
  """``ids`` with every ``<image>`` id repeated ``media_tokens`` times: one image's run."""
  if media_tokens < 1:
    raise ValueError(f"media_tokens must be >= 1, got {media_tokens}")
  out: list[int] = []
  for i in ids:
    out.extend([i] * media_tokens if i == media_token_id else [i])
  return out


def example_spec(max_tokens: int, max_images: int | None = None,
                 media_shape: tuple[int, ...] | None = None,
                 media_key: str = "images") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """``{key: (shape, dtype)}`` of one example: what ``build_text_example`` returns (no
  ``max_images``), or ``build_example`` with ``media_shape`` = ``image_shape`` (a feature cache's
  examples hold ``features`` of their shape in place of the images)."""
  spec = {key: ((max_tokens,), np.dtype(np.int32))
          for key in ("input_ids", "attention_mask", "labels")}
  if max_images is not None:
    spec.update({media_key: ((max_images, *media_shape), np.dtype(np.float32)),
                 "media_mask": ((max_images,), np.dtype(bool)),
                 "num_images": ((), np.dtype(np.int32))})
  return spec


def map_images(chunks: Sequence, fn: Callable) -> list:
  """The document with ``fn`` applied to every image chunk (text chunks unchanged), e.g.
  ``functools.partial(images.preprocess_image, size=..., mean=..., std=...)``."""
  return [chunk if isinstance(chunk, str) else fn(chunk) for chunk in chunks]


def _check_limits(max_tokens: int, max_images: int | None = None) -> None:
  if max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
  if max_images is not None and max_images < 0:
    raise ValueError(f"max_images must be >= 0, got {max_images}")


def _frames(chunk, image_shape: tuple[int, int, int, int], index: int) -> np.ndarray:
  """An image chunk as float32 [F, H, W, C]; [H, W, C] means one frame."""
  image = np.asarray(chunk)
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"chunk {index}: images must be preprocessed float arrays "
                     f"(images.preprocess_image), got dtype {image.dtype}")
  if image.ndim == 3:
    image = image[None]
  if image.shape != tuple(image_shape):
    raise ValueError(f"chunk {index}: image must have shape [F, H, W, C] = {tuple(image_shape)} "
                     f"([H, W, C] when F = 1), got {np.shape(chunk)}")
  return image.astype(np.float32)


def _encode_text(tokenizer, texts: list[str], where: str, allow_eoc: bool = False) -> list[int]:
  ids = tokenizer.encode("".join(texts))
  if tokenizer.media_token_id in ids or (not allow_eoc and tokenizer.eoc_token_id in ids):
    raise ValueError(f"the text {where} contains <image> or <|endofchunk|>: the layout adds "
                     "them, so pass images as array chunks and leave these strings out of text")
  return ids


def _common_prefix(a: list[int], b: list[int]) -> int:
  n = 0
  while n < min(len(a), len(b)) and a[n] == b[n]:
    n += 1
  return n


def _pad(ids: list[int], length: int, fill: int) -> np.ndarray:
  out = np.full(length, fill, np.int32)
  out[:len(ids)] = ids
  return out


def build_example(chunks: Sequence, tokenizer, *, max_tokens: int, max_images: int,
                  image_shape: tuple[int, int, int, int],
                  supervise: str = "all", media_tokens: int = 1) -> dict[str, np.ndarray]:
  """Tokens, labels and images of one interleaved document, padded to fixed sizes.

  ``chunks`` is the document in order: ``str`` text and preprocessed float images ([F, H, W, C],
  or [H, W, C] for F = 1, matching ``image_shape``). Returns ``input_ids``, ``attention_mask`` and
  ``labels`` (the id where supervised, ``IGNORE_INDEX`` elsewhere; the loss shifts), int32
  [max_tokens]; ``images`` float32 [max_images, F, H, W, C], zero past the last image;
  ``media_mask`` bool [max_images]; ``num_images`` int32 []. Layout, label rule and truncation
  policy: see the module docstring. ``supervise`` ``"answer"`` keeps the labels of the last text
  chunk (which must follow an image) and its ``<|endofchunk|>`` only: the tokens the encoding of
  its image's text gains by it, so a merge across the boundary is never half supervised.
  ``media_tokens``: how many ``<image>`` tokens each image stands as (``expand_media_tokens``).
  """
  _check_limits(max_tokens, max_images)
  if supervise not in SUPERVISE:
    raise ValueError(f"supervise must be one of {SUPERVISE}, got {supervise!r}")
  if len(image_shape) != 4 or min(image_shape) < 1:
    raise ValueError(f"image_shape must be (F, H, W, C) of positive sizes, got {image_shape}")
  prefix: list[str] = []
  media: list[tuple[np.ndarray, list[str]]] = []  # (image, the text that follows it)
  for index, chunk in enumerate(chunks):
    if isinstance(chunk, str):
      (media[-1][1] if media else prefix).append(chunk)
    else:
      media.append((_frames(chunk, image_shape, index), []))

  if supervise == "answer" and not (media and chunks and isinstance(chunks[-1], str)):
    raise ValueError('supervise="answer" needs the record to end with a text chunk after an '
                     "image (the answer)")
  ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  ids += _encode_text(tokenizer, prefix, "before the first image", allow_eoc=True)
  answer_start = max_tokens  # supervise="answer": labels from here on (none when it stays)
  run = expand_media_tokens([tokenizer.media_token_id], tokenizer.media_token_id, media_tokens)
  for k, (_, texts) in enumerate(media[:max_images]):
    text_ids = _encode_text(tokenizer, texts, f"after image {k}")
    if supervise == "answer" and k == len(media) - 1:
      answer_start = len(ids) + len(run) + _common_prefix(
          text_ids, _encode_text(tokenizer, texts[:-1], f"after image {k}"))
    ids += [*run, *text_ids, tokenizer.eoc_token_id]
  ids = (ids + [tokenizer.eos_token_id])[:max_tokens]
  while ids.count(tokenizer.media_token_id) % len(run):  # the cut split the last image's run
    ids.pop()
  num_images = ids.count(tokenizer.media_token_id) // len(run)

  attention_mask = _pad([1] * len(ids), max_tokens, 0)
  input_ids = _pad(ids, max_tokens, tokenizer.pad_token_id)
  mask = supervised_mask(input_ids, tokenizer.media_token_id, tokenizer.eoc_token_id,
                         attention_mask)
  if supervise == "answer":
    mask &= np.arange(max_tokens) >= answer_start
  images = np.zeros((max_images, *image_shape), np.float32)
  for k in range(num_images):
    images[k] = media[k][0]
  return {
      "input_ids": input_ids,
      "attention_mask": attention_mask,
      "labels": np.where(mask, input_ids, IGNORE_INDEX).astype(np.int32),
      "images": images,
      "media_mask": np.arange(max_images) < num_images,
      "num_images": np.asarray(num_images, np.int32),
  }


def build_text_example(text: str, tokenizer, *, max_tokens: int) -> dict[str, np.ndarray]:
  """A text-only example for LM pretraining (no images): ``[bos] text eos`` cut at ``max_tokens``,
  every real token supervised. Returns int32 [max_tokens] ``input_ids``, ``attention_mask`` and
  ``labels`` as ``build_example`` does. The text must not contain the added special tokens: the
  LM being pretrained does not have them yet."""
  _check_limits(max_tokens)
  ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
  ids += _encode_text(tokenizer, [text], "of a text-only example")
  ids = (ids + [tokenizer.eos_token_id])[:max_tokens]
  input_ids = _pad(ids, max_tokens, tokenizer.pad_token_id)
  return {
      "input_ids": input_ids,
      "attention_mask": _pad([1] * len(ids), max_tokens, 0),
      "labels": _pad(ids, max_tokens, IGNORE_INDEX),
  }
