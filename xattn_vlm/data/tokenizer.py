"""The tokenizer: a Hugging Face or ``tokenizers`` tokenizer plus Flamingo's two special tokens.

The LM's vocabulary is frozen at ``lm_vocab_size`` rows; ``<image>`` and ``<|endofchunk|>`` are new
rows right after it, so the model sees them as ids ``lm_vocab_size + 0`` and ``lm_vocab_size + 1``
whatever id the wrapped tokenizer gave them (a checkpoint's vocabulary can be larger than its
tokenizer, e.g. Qwen2 pads to a multiple of 128). ``Tokenizer`` does that remapping in ``encode``
and back in ``decode``; nothing else in the library needs to know the wrapped tokenizer's ids.

``default_tokenizer()`` is a small byte-level BPE trained on the shapes world's text, built
deterministically and cached on disk, so tests and the synthetic experiments need no download.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from xattn_vlm.data import shapes_world

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
ADDED_TOKENS = (MEDIA_TOKEN, EOC_TOKEN)  # model ids lm_vocab_size + 0 and + 1, in this order

DEFAULT_EOS_TOKEN = "<|endoftext|>"
# The default tokenizer's LM vocabulary, <|endoftext|> included: the BPE learns merges up to this
# size or until the shapes world's text has no pair left to merge, and the rest is padding, so
# <image> and <|endofchunk|> keep their ids even when a smaller world saturates the BPE early.
DEFAULT_VOCAB_SIZE = 1024
DEFAULT_CORPUS_SIZE = 2000  # shapes-world texts its BPE merges are learned from
CACHE_ENV = "XATTN_VLM_CACHE"


class Tokenizer:
  """Text <-> model ids with ``<image>`` and ``<|endofchunk|>`` at ``lm_vocab_size + {0, 1}``.

  Wraps a ``transformers`` tokenizer or a ``tokenizers.Tokenizer`` and adds the two special tokens
  to it when missing. ``eos_token``, ``bos_token`` and ``pad_token`` default to the wrapped
  tokenizer's (a ``tokenizers.Tokenizer`` has none: its EOS defaults to ``<|endoftext|>`` when that
  is in its vocabulary); a missing pad token is the EOS token (padding is masked out anyway).
  ``lm_vocab_size`` defaults to the smallest vocabulary that holds every other token.
  """

  def __init__(self, tokenizer, *, lm_vocab_size: int | None = None, eos_token: str | None = None,
               bos_token: str | None = None, pad_token: str | None = None):
    self._raw = isinstance(tokenizer, tokenizers.Tokenizer)
    self._tokenizer = tokenizer
    vocab = self._vocab()
    missing = [t for t in ADDED_TOKENS if t not in vocab]
    if missing:
      added = [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
      if self._raw:
        tokenizer.add_special_tokens(added)
      else:
        tokenizer.add_tokens(added, special_tokens=True)
      vocab = self._vocab()
    raw_added_ids = tuple(vocab[t] for t in ADDED_TOKENS)

    required = 1 + max(i for t, i in vocab.items() if t not in ADDED_TOKENS)
    if lm_vocab_size is None:
      lm_vocab_size = required
    if lm_vocab_size < required:
      raise ValueError(f"lm_vocab_size must be at least {required} (the largest id of the "
                       f"tokenizer's own tokens + 1), got {lm_vocab_size}")
    self.lm_vocab_size = int(lm_vocab_size)
    self.vocab_size = self.lm_vocab_size + len(ADDED_TOKENS)
    self.media_token_id = self.lm_vocab_size
    self.eoc_token_id = self.lm_vocab_size + 1
    self._to_model = dict(zip(raw_added_ids, (self.media_token_id, self.eoc_token_id)))
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
  def from_pretrained(cls, path: str | os.PathLike, lm_vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer from a local Hugging Face folder (offline), or from a llama.cpp ``.gguf``
    file (``from_gguf``). Pass the LM checkpoint's vocabulary size as ``lm_vocab_size`` when it
    differs from the tokenizer's (padded embeddings)."""
    from xattn_vlm.models import gguf_file  # pylint: disable=import-outside-toplevel
    if gguf_file.is_gguf(path):
      return cls.from_gguf(path, lm_vocab_size)
    folder = pathlib.Path(path)
    if not folder.is_dir():
      raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist: pass a local "
                              "Hugging Face folder holding tokenizer.json or its vocabulary files")
    # transformers is imported here only: it is slow to import and the default tokenizer and the
    # data pipelines do not need it.
    import transformers  # pylint: disable=import-outside-toplevel
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return cls(hf_tokenizer, lm_vocab_size=lm_vocab_size)

  @classmethod
  def from_gguf(cls, path: str | os.PathLike, lm_vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer stored in a llama.cpp GGUF file's metadata (``models.gguf_file``), with its
    EOS and padding tokens, and its BOS only when llama.cpp adds one. ``lm_vocab_size`` defaults
    to the rows of the file's token table."""
    # Imported here, as transformers is: the GGUF reader lives with the model loaders, and the
    # default tokenizer and the data pipelines do not need it.
    from xattn_vlm.models import gguf_file  # pylint: disable=import-outside-toplevel
    tokenizer, settings = gguf_file.tokenizer_from_gguf(path)
    if lm_vocab_size is not None:
      settings["lm_vocab_size"] = lm_vocab_size
    return cls(tokenizer, **settings)

  def require_model_vocab(self, vocab_size: int, setting: str, where: str) -> None:
    """Fails unless a Flamingo model whose LM vocabulary is ``vocab_size`` (``setting`` names it in
    the error, ``where`` says which model) reads this tokenizer's ``<image>`` and
    ``<|endofchunk|>``: the model takes them as ids ``vocab_size + 0`` and ``+ 1``, so a larger
    LM vocabulary would silently see neither."""
    if vocab_size != self.lm_vocab_size:
      raise ValueError(f"{setting}={vocab_size} must equal the tokenizer's vocabulary "
                       f"({self.lm_vocab_size}) {where}, where <image> and <|endofchunk|> follow it")

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
    """Text of a 1-D sequence of model ids. ``skip_special_tokens`` drops ``<image>``,
    ``<|endofchunk|>``, EOS, BOS, padding and the wrapped tokenizer's other special tokens."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
      raise ValueError(f"ids must be a 1-D sequence of integers, got shape {ids.shape} "
                       f"and dtype {ids.dtype}")
    ids = ids.tolist()
    bad = [i for i in ids if not 0 <= i < self.vocab_size]
    if bad:
      raise ValueError(f"ids must be in [0, vocab_size={self.vocab_size}), got {bad[:5]}")
    if skip_special_tokens:
      special = {self.media_token_id, self.eoc_token_id, self.eos_token_id, self.pad_token_id,
                 self.bos_token_id}
      ids = [i for i in ids if i not in special]
    raw = [self._to_raw.get(i, i) for i in ids]
    if self._raw:
      return self._tokenizer.decode(raw, skip_special_tokens=skip_special_tokens)
    return self._tokenizer.decode(raw, skip_special_tokens=skip_special_tokens,
                                  clean_up_tokenization_spaces=False)


def _cache_dir(cache_dir: str | os.PathLike | None) -> pathlib.Path:
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  return pathlib.Path.home() / ".cache" / "xattn_vlm"


def _default_tokenizer_key() -> str:
  """A digest of everything the default tokenizer's bytes depend on: the shapes world's source
  (its text), the training settings and the ``tokenizers`` version."""
  digest = hashlib.sha256(pathlib.Path(shapes_world.__file__).read_bytes())
  digest.update(f"{DEFAULT_VOCAB_SIZE}|{DEFAULT_CORPUS_SIZE}|{DEFAULT_EOS_TOKEN}|"
                f"{ADDED_TOKENS}|{tokenizers.__version__}".encode())
  return digest.hexdigest()[:16]


def train_default_tokenizer() -> tokenizers.Tokenizer:
  """Byte-level BPE (GPT-2 style, no prefix space) learned on the first ``DEFAULT_CORPUS_SIZE``
  train texts of the shapes world: at most ``DEFAULT_VOCAB_SIZE`` tokens, ``<|endoftext|>``
  first, then ``<image>`` and ``<|endofchunk|>`` as added tokens right after."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=DEFAULT_VOCAB_SIZE, special_tokens=[DEFAULT_EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(shapes_world.text_corpus(DEFAULT_CORPUS_SIZE), trainer)
  tokenizer.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
  return tokenizer


def default_tokenizer(cache_dir: str | os.PathLike | None = None) -> Tokenizer:
  """The shapes-world BPE tokenizer (``DEFAULT_VOCAB_SIZE`` LM ids, padded), trained on first use
  and cached as JSON in ``cache_dir`` (default ``$XATTN_VLM_CACHE`` or ``~/.cache/xattn_vlm``).
  The file name carries a digest of its inputs, so a changed world retrains instead of reusing
  stale merges; the file is written atomically, so concurrent first uses are safe."""
  folder = _cache_dir(cache_dir)
  path = folder / f"shapes_bpe_{_default_tokenizer_key()}.json"
  if not path.is_file():
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
      f.write(train_default_tokenizer().to_str())
    os.replace(f.name, path)
  return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), lm_vocab_size=DEFAULT_VOCAB_SIZE,
                   eos_token=DEFAULT_EOS_TOKEN)
