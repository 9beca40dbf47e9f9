"""Prompts -> model inputs: interleaved text and images, batched with left padding.

A prompt is either text with ``<image>`` placeholders plus the list of its images, or one list that
mixes text (``str``) and images (PIL images, uint8 arrays, ``pathlib.Path`` files, encoded bytes) in
reading order; each image in such a list stands where its ``<image>`` token goes. Prompts in a batch
may hold different numbers of images and tokens: ids are LEFT padded (so every prompt's last token
sits in the last column and generation appends to all of them at once) and the images are
zero-padded to the batch's largest count, with ``media_mask`` marking the real ones.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Sequence, Union

import ml_collections
import numpy as np
from PIL import Image

from xattn_vlm.data import images as images_lib
from xattn_vlm.data import sequence
from xattn_vlm.data import tokenizer as tokenizer_lib
from xattn_vlm.models.config import media_tokens_per_image

ImageLike = Union[Image.Image, np.ndarray, str, os.PathLike, bytes]
# Text with <image> placeholders, or text segments (str) and images in reading order.
Prompt = Union[str, Sequence[Union[str, Image.Image, np.ndarray, os.PathLike, bytes]]]


@dataclasses.dataclass(frozen=True)
class Batch:
  """What ``Flamingo`` takes, as numpy arrays.

  input_ids: int32 [B, L], left padded with the tokenizer's pad id.
  attention_mask: int32 [B, L], 1 on real tokens.
  images: float32 [B, T, 1, H, W, C], normalised pixels; slots past a prompt's images are zeros.
    None when ``vision_features`` stand in for them.
  media_mask: bool [B, T], which image slots are real.
  vision_features: float32 [B, T, 1, P, D], the vision tower's output for the images (from a
    feature cache; slots past a prompt's images are zeros), or None.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  images: np.ndarray | None
  media_mask: np.ndarray
  vision_features: np.ndarray | None = None

  @property
  def batch_size(self) -> int:
    return self.input_ids.shape[0]


class Processor:
  """Turns prompts into a ``Batch`` for one model: its tokenizer, image size, pixel statistics and
  context length.

  Args:
    tokenizer: a ``xattn_vlm.data.Tokenizer`` (``encode`` maps ``<image>`` in text to its id).
    image_size: side of the square the vision tower takes.
    image_mean, image_std: the tower's per-channel pixel statistics.
    max_length: the model's context in tokens; longer prompts are rejected, not truncated.
    image_mode: ``"pad"`` (keep the whole image) or ``"crop"`` (CLIP's centre crop).
    media_tokens: the ``<image>`` tokens each image stands as in the model's input
      (``models.config.media_tokens_per_image``); a prompt writes one per image.
  """

  def __init__(self, tokenizer, *, image_size: int, image_mean: Sequence[float],
               image_std: Sequence[float], max_length: int, image_mode: str = "pad",
               media_tokens: int = 1):
    if image_mode not in images_lib.MODES:
      raise ValueError(f"image_mode must be one of {images_lib.MODES}, got {image_mode!r}")
    self.tokenizer = tokenizer
    self.image_size = image_size
    self.image_mean = tuple(image_mean)
    self.image_std = tuple(image_std)
    self.max_length = max_length
    self.image_mode = image_mode
    if media_tokens < 1:
      raise ValueError(f"media_tokens must be >= 1, got {media_tokens}")
    self.media_tokens = media_tokens

  @classmethod
  def from_model_config(cls, config: ml_collections.ConfigDict, tokenizer,
                        image_mode: str = "pad") -> Processor:
    """The processor for a Flamingo model config (``xattn_vlm.models.config``); ``tokenizer`` must
    give that model's special-token ids (``Tokenizer.require_model``)."""
    tokenizer.require_model(config)
    return cls(tokenizer, image_size=config.vision.image_size,
               image_mean=config.vision.image_mean, image_std=config.vision.image_std,
               max_length=config.lm.max_length, image_mode=image_mode,
               media_tokens=media_tokens_per_image(config))

  def token_ids(self, text: str) -> list[int]:
    """Token ids of text with ``<image>`` placeholders, each image expanded to the model's run of
    ``media_tokens`` tokens: the ids the model reads, so their count is the prompt's length."""
    return sequence.expand_media_tokens(self.tokenizer.encode(text), self.tokenizer.media_token_id,
                                        self.media_tokens)

  def encode_prompt(self, prompt: Prompt, images: Sequence[ImageLike] = (),
                    index: int = 0) -> tuple[list[int], list[np.ndarray]]:
    """One prompt -> (token ids, preprocessed images [H, W, C]); ``index`` names it in errors."""
    ids, sources = self.encode_text(prompt, images, index)
    return ids, [self.preprocess_image(source, index, j) for j, source in enumerate(sources)]

  def encode_text(self, prompt: Prompt, images: Sequence[ImageLike] = (),
                  index: int = 0) -> tuple[list[int], list[ImageLike]]:
    """One prompt -> (token ids, its images as given, in prompt order); no image is read."""
    if isinstance(prompt, str):
      text, sources = prompt, list(images)
    elif isinstance(prompt, Sequence):
      if images:
        raise ValueError(f"prompt {index} is an interleaved list, so its images belong in the "
                         f"list; got {len(images)} more in images[{index}]")
      text = "".join(p if isinstance(p, str) else tokenizer_lib.MEDIA_TOKEN for p in prompt)
      sources = [p for p in prompt if not isinstance(p, str)]
    else:
      raise TypeError(f"prompt {index} must be a str or a list of text and images, got "
                      f"{type(prompt).__name__}")
    ids = self.token_ids(text)
    if not ids:
      raise ValueError(f"prompt {index} is empty (0 tokens): give it text or images")
    num_placeholders = ids.count(self.tokenizer.media_token_id) // self.media_tokens
    if num_placeholders != len(sources):
      raise ValueError(f"prompt {index} has {num_placeholders} {tokenizer_lib.MEDIA_TOKEN} "
                       f"placeholders but {len(sources)} images: give one image per placeholder")
    if len(ids) > self.max_length:
      raise ValueError(f"prompt {index} has {len(ids)} tokens, more than the model's context "
                       f"of {self.max_length} tokens")
    return ids, sources

  def preprocess_image(self, source: ImageLike, index: int = 0, position: int = 0) -> np.ndarray:
    """One image as the tower takes it, float32 [H, W, C]; ``index`` and ``position`` (its prompt
    and its place there) name it in errors."""
    try:
      return images_lib.preprocess_image(source, size=self.image_size, mean=self.image_mean,
                                         std=self.image_std, mode=self.image_mode)
    except (OSError, ValueError, TypeError) as error:
      name = str(source) if isinstance(source, (str, pathlib.PurePath)) else type(source).__name__
      raise ValueError(f"prompt {index}: image {position} ({name}) cannot be read: "
                       f"{error}") from error

  def __call__(self, prompts: Sequence[Prompt],
               images: Sequence[Sequence[ImageLike]] | None = None, *,
               pad_to_length: int | None = None, max_images: int | None = None,
               vision_features: Callable[[Sequence[ImageLike]], np.ndarray] | None = None
               ) -> Batch:
    """A batch of prompts -> ``Batch`` (left padded).

    Args:
      prompts: a list of prompts (a single prompt must be wrapped in a list).
      images: one list of images per prompt, for prompts written as text with placeholders.
      pad_to_length: pad the ids to this many columns (fixed shapes reuse compiled functions).
      max_images: pad the image slots to this many (default: the batch's largest count, >= 1).
      vision_features: maps a prompt's n images (n may be 0) to the vision tower's features
        [n, P, D] (a feature cache): the batch then holds those instead of pixels, and no image
        is read here.
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
      raise ValueError("prompts must be a non-empty list of prompts, got "
                       f"{prompts!r:.80}")
    if images is not None and len(images) != len(prompts):
      raise ValueError(f"images must hold one list per prompt: {len(prompts)} prompts but "
                       f"{len(images)} image lists")
    encode = self.encode_prompt if vision_features is None else self.encode_text
    encoded = [encode(p, images[i] if images is not None else (), i)
               for i, p in enumerate(prompts)]
    if vision_features is not None:
      encoded = [(ids, np.asarray(vision_features(sources))) for ids, sources in encoded]
    longest = max(len(ids) for ids, _ in encoded)
    most_images = max(len(pixels) for _, pixels in encoded)
    length = longest if pad_to_length is None else pad_to_length
    num_slots = max(most_images, 1) if max_images is None else max_images
    if length < longest:
      raise ValueError(f"pad_to_length ({pad_to_length}) must be at least the longest prompt "
                       f"({longest} tokens)")
    if length > self.max_length:
      raise ValueError(f"pad_to_length ({pad_to_length}) exceeds the model's context of "
                       f"{self.max_length} tokens")
    if num_slots < most_images:
      raise ValueError(f"max_images ({max_images}) must be at least the most images in one "
                       f"prompt ({most_images})")

    b, size = len(prompts), self.image_size
    input_ids = np.full((b, length), self.tokenizer.pad_token_id, np.int32)
    attention_mask = np.zeros((b, length), np.int32)
    media_shape = (size, size, 3) if vision_features is None else encoded[0][1].shape[1:]
    media = np.zeros((b, num_slots, 1) + tuple(media_shape), np.float32)
    media_mask = np.zeros((b, num_slots), bool)
    for i, (ids, prompt_media) in enumerate(encoded):
      input_ids[i, length - len(ids):] = ids
      attention_mask[i, length - len(ids):] = 1
      if len(prompt_media):
        media[i, :len(prompt_media), 0] = np.stack(prompt_media)
      media_mask[i, :len(prompt_media)] = True
    if vision_features is None:
      return Batch(input_ids=input_ids, attention_mask=attention_mask, images=media,
                   media_mask=media_mask)
    return Batch(input_ids=input_ids, attention_mask=attention_mask, images=None,
                 media_mask=media_mask, vision_features=media)
