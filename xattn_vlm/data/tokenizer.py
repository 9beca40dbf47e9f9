"""The tokenizer: a Hugging Face or ``tokenizers`` tokenizer plus the model's added special tokens.

The LM's vocabulary is frozen at ``lm_vocab_size`` rows; the added tokens (by default ``<image>``
and ``<|endofchunk|>``; a model config lists its own as ``added_tokens``) are new rows right after
it, so the model sees token k as id ``lm_vocab_size + k`` whatever id the wrapped tokenizer gave it
(a checkpoint's vocabulary can be larger than its tokenizer, e.g. Qwen2 pads to a multiple of
128). ``Tokenizer`` does that remapping in ``encode`` and back in ``decode``; nothing else in the
library needs to know the wrapped tokenizer's ids. Build it for a model with ``model_config=`` so
it gives that model's ids (``special_tokens.added_token_ids``, the rule the model itself uses).

The shapes world's own tokenizer, a BPE learned from its text, is ``data.shapes.tokenizer``.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

import numpy as np
import tokenizers

from xattn_vlm import special_tokens

MEDIA_TOKEN = special_tokens.MEDIA_TOKEN
EOC_TOKEN = special_tokens.EOC_TOKEN
ADDED_TOKENS = special_tokens.DEFAULT_ADDED_TOKENS  # new models' order: ids lm_vocab_size + 0, + 1

DEFAULT_EOS_TOKEN = "<|endoftext|>"  # the EOS of a bare ``tokenizers.Tokenizer``


class Tokenizer:
  """Text <-> model ids with the ``added_tokens`` at ``lm_vocab_size + k`` (by default ``<image>``
  then ``<|endofchunk|>``).

  Wraps a ``transformers`` tokenizer or a ``tokenizers.Tokenizer`` and adds the special tokens to
  it when missing. ``eos_token``, ``bos_token`` and ``pad_token`` default to the wrapped
  tokenizer's (a ``tokenizers.Tokenizer`` has none: its EOS defaults to ``<|endoftext|>`` when that
  is in its vocabulary); a missing pad token is the EOS token (padding is masked out anyway).
  ``lm_vocab_size`` defaults to the smallest vocabulary that holds every other token.
  ``eoc_token_id`` is None when ``<|endofchunk|>`` is not among the added tokens (IDEFICS).
  ``raw_added_token_ids`` are the wrapped tokenizer's own ids of the added tokens: where a model
  trained with that tokenizer keeps their rows.
  """

  def __init__(self, tokenizer, *, lm_vocab_size: int | None = None, eos_token: str | None = None,
               bos_token: str | None = None, pad_token: str | None = None,
               added_tokens: Sequence[str] = ADDED_TOKENS):
    self._raw = isinstance(tokenizer, tokenizers.Tokenizer)
    self._tokenizer = tokenizer
    self.added_tokens = tuple(added_tokens)
    vocab = self._vocab()
    missing = [t for t in self.added_tokens if t not in vocab]
    if missing:
      added = [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
      if self._raw:
        tokenizer.add_special_tokens(added)
      else:
        tokenizer.add_tokens(added, special_tokens=True)
      vocab = self._vocab()
    raw_added_ids = tuple(vocab[t] for t in self.added_tokens)
    self.raw_added_token_ids = raw_added_ids

    required = 1 + max(i for t, i in vocab.items() if t not in self.added_tokens)
    if lm_vocab_size is None:
      lm_vocab_size = required
    if lm_vocab_size < required:
      beyond = sorted(t for t, i in vocab.items()
                      if i >= lm_vocab_size and t not in self.added_tokens)
      raise ValueError(f"lm_vocab_size must be at least {required} (the largest id of the "
                       f"tokenizer's own tokens + 1), got {lm_vocab_size}; tokens past it: "
                       f"{beyond[:5]}")
    self.lm_vocab_size = int(lm_vocab_size)
    self.vocab_size = self.lm_vocab_size + len(self.added_tokens)
    self.media_token_id, self.eoc_token_id = special_tokens.added_token_ids(
        self.lm_vocab_size, self.added_tokens)
    self._to_model = {raw: self.lm_vocab_size + k for k, raw in enumerate(raw_added_ids)}
    self._to_raw = {m: r for r, m in self._to_model.items()}

    if eos_token is None:
      eos_token = DEFAULT_EOS_TOKEN if self._raw else tokenizer.eos_token
    if eos_token is None or eos_token not in vocab:
      raise ValueError(f"eos_token must name a token of the tokenizer's vocabulary, got "
                       f"{eos_token!r}: pass eos_token= for a tokenizer without one")
    self.eos_token_id = vocab[eos_token]
    if bos_token is None and not self._raw:
      bos_token = tokenizer.bos_token
    self.bos_token_id = None if bos_token is None else self._token_id(bos_token, "bos_token")
    if pad_token is None and not self._raw:
      pad_token = tokenizer.pad_token
    self.pad_token_id = (self.eos_token_id if pad_token is None
                         else self._token_id(pad_token, "pad_token"))

  @classmethod
  def from_pretrained(cls, path: str | os.PathLike, lm_vocab_size: int | None = None, *,
                      model_config=None) -> Tokenizer:
    """A tokenizer from a local Hugging Face folder, or the one a llama.cpp ``.gguf`` file stores
    in its metadata (``models.gguf_file``: its EOS and padding tokens, its BOS only when llama.cpp
    adds one); offline. Pass the LM checkpoint's vocabulary size as ``lm_vocab_size`` when it
    differs from the tokenizer's (padded embeddings), or the Flamingo model's config as
    ``model_config``: its ``lm.vocab_size`` and ``added_tokens`` then set the ids, and the result
    is checked against the model (``require_model``)."""
    added_tokens = ADDED_TOKENS
    if model_config is not None:
      if lm_vocab_size is not None and lm_vocab_size != model_config.lm.vocab_size:
        raise ValueError(f"lm_vocab_size={lm_vocab_size} disagrees with the model config's "
                         f"lm.vocab_size={model_config.lm.vocab_size}: pass one of them")
      lm_vocab_size = model_config.lm.vocab_size
      added_tokens = model_config.added_tokens
    # Imported here: transformers is slow to import, and the GGUF reader lives with the model
    # loaders; the shapes world's tokenizer and the data pipelines need neither.
    from xattn_vlm.models import gguf_file  # pylint: disable=import-outside-toplevel
    if gguf_file.is_gguf(path):
      wrapped, settings = gguf_file.tokenizer_from_gguf(path)
    else:
      folder = pathlib.Path(path)
      if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer {str(folder)!r} does not exist: pass a local Hugging "
                                "Face folder holding tokenizer.json or its vocabulary files, or a "
                                ".gguf file")
      import transformers  # pylint: disable=import-outside-toplevel
      wrapped = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
      settings = {}
    if lm_vocab_size is not None:
      settings["lm_vocab_size"] = lm_vocab_size
    tokenizer = cls(wrapped, added_tokens=added_tokens, **settings)
    if model_config is not None:
      tokenizer.require_model(model_config)
    return tokenizer

  def save_pretrained(self, path: str | os.PathLike) -> None:
    """Writes the wrapped tokenizer, its added tokens included, as a Hugging Face folder that
    ``from_pretrained`` reads back with the same ids."""
    if self._raw:
      import transformers  # pylint: disable=import-outside-toplevel
      vocab = self._vocab()
      names = {i: t for t, i in vocab.items()}
      wrapped = transformers.PreTrainedTokenizerFast(
          tokenizer_object=self._tokenizer, eos_token=names[self.eos_token_id],
          bos_token=None if self.bos_token_id is None else names[self.bos_token_id],
          pad_token=names[self.pad_token_id])
    else:
      wrapped = self._tokenizer
    wrapped.save_pretrained(str(path))

  def require_model_vocab(self, vocab_size: int, setting: str, where: str) -> None:
    """Fails unless a Flamingo model whose LM vocabulary is ``vocab_size`` (``setting`` names it in
    the error, ``where`` says which model) reads this tokenizer's ``<image>`` and
    ``<|endofchunk|>``: the model takes them as ids ``vocab_size + 0`` and ``+ 1``, so a larger
    LM vocabulary would silently see neither."""
    if vocab_size != self.lm_vocab_size:
      raise ValueError(f"{setting}={vocab_size} must equal the tokenizer's vocabulary "
                       f"({self.lm_vocab_size}) {where}, where <image> and <|endofchunk|> follow it")

  def require_model(self, config, where: str = "in the model's config",
                    setting_prefix: str = "") -> None:
    """Fails unless this tokenizer gives a Flamingo model of ``config`` (a model config) the ids
    it reads: its LM vocabulary (``lm.vocab_size``), the ids of its ``added_tokens`` and, for a
    model with a document-end token (``xattn.document_end_token_id``), that token as EOS. Errors
    name the settings with ``setting_prefix`` before them (``config.model.`` in a trainer
    config)."""
    self.require_model_vocab(config.lm.vocab_size, f"{setting_prefix}lm.vocab_size", where)
    media, eoc = special_tokens.added_token_ids(config.lm.vocab_size, config.added_tokens)
    for name, ours, theirs in ((MEDIA_TOKEN, self.media_token_id, media),
                               (EOC_TOKEN, self.eoc_token_id, eoc)):
      if ours != theirs:
        raise ValueError(f"the tokenizer gives {name} id {ours} but the model reads id {theirs} "
                         f"({setting_prefix}added_tokens={tuple(config.added_tokens)} {where}; "
                         f"the tokenizer's are {self.added_tokens}): build the tokenizer for the "
                         "model, Tokenizer.from_pretrained(path, model_config=config)")
    document_end = config.xattn.document_end_token_id
    if document_end is not None and document_end != self.eos_token_id:
      raise ValueError(f"{setting_prefix}xattn.document_end_token_id={document_end} {where} must "
                       f"be the tokenizer's EOS id ({self.eos_token_id}): after it the model sees "
                       "no image until the next one")

  def _vocab(self) -> dict[str, int]:
    if self._raw:
      return self._tokenizer.get_vocab(with_added_tokens=True)
    return self._tokenizer.get_vocab()

  def _token_id(self, token: str, argument: str) -> int:
    vocab = self._vocab()
    if token not in vocab:
      raise ValueError(f"{argument} must name a token of the tokenizer's vocabulary, got {token!r}")
    return vocab[token]

  def encode(self, text: str) -> list[int]:
    """Model ids of ``text``; no BOS or EOS is added. ``<image>`` and ``<|endofchunk|>`` written in
    the text become their model ids."""
    if not isinstance(text, str):
      raise TypeError(f"text must be a str, got {type(text).__name__}")
    if self._raw:
      ids = self._tokenizer.encode(text, add_special_tokens=False).ids
    else:
      ids = self._tokenizer.encode(text, add_special_tokens=False)
    return [self._to_model.get(i, i) for i in ids]

  def decode(self, ids, skip_special_tokens: bool = False) -> str:
    """Text of a 1-D sequence of model ids. ``skip_special_tokens`` drops the added tokens
    (``<image>``, ``<|endofchunk|>``, ...), EOS, BOS, padding and the wrapped tokenizer's other
    special tokens."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"ids must be a 1-D sequence of integers, got shape {ids.shape} "
                       f"and dtype {ids.dtype}")
    ids = ids.tolist()
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids must be in [0, vocab_size={self.vocab_size}), got {bad[:5]}")
    if skip_special_tokens:
      special = {*range(self.lm_vocab_size, self.vocab_size), self.eos_token_id,
                 self.pad_token_id, self.bos_token_id}
      ids = [i for i in ids if i not in special]
    raw = [self._to_raw.get(i, i) for i in ids]
    if self._raw:
      return self._tokenizer.decode(raw, skip_special_tokens=skip_special_tokens)
    return self._tokenizer.decode(raw, skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=False)
