"""The shapes world's tokenizer: a small byte-level BPE learned from the world's own text, built
deterministically on first use and cached on disk, so tests and the synthetic experiments need
no download."""

from __future__ import annotations

import hashlib
import os
import pathlib
import tempfile

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from xattn_vlm.data.shapes import world
from xattn_vlm.data.tokenizer import ADDED_TOKENS, DEFAULT_EOS_TOKEN, Tokenizer

# The LM vocabulary, <|endoftext|> included: the BPE learns merges up to this size or until the
# world's text has no pair left to merge, and the rest is padding, so <image> and <|endofchunk|>
# keep their ids even when a smaller world saturates the BPE early.
VOCAB_SIZE = 1024
CORPUS_SIZE = 2000  # world texts the BPE merges are learned from
CACHE_ENV = "XATTN_VLM_CACHE"


def _cache_dir(cache_dir: str | os.PathLike | None) -> pathlib.Path:
  if cache_dir is not None:
    return pathlib.Path(cache_dir)
  if os.environ.get(CACHE_ENV):
    return pathlib.Path(os.environ[CACHE_ENV])
  return pathlib.Path.home() / ".cache" / "xattn_vlm"


def _cache_key(corpus: list[str]) -> str:
  """A digest of everything the tokenizer's bytes depend on: the corpus it learns from, its
  settings and the ``tokenizers`` version."""
  digest = hashlib.sha256("\x00".join(corpus).encode())
  digest.update(f"{VOCAB_SIZE}|{DEFAULT_EOS_TOKEN}|{ADDED_TOKENS}|"
                f"{tokenizers.__version__}".encode())
  return digest.hexdigest()[:16]


def train_bpe(corpus: list[str]) -> tokenizers.Tokenizer:
  """Byte-level BPE (GPT-2 style, no prefix space) learned on ``corpus``: at most
  ``VOCAB_SIZE`` tokens, ``<|endoftext|>`` first, then ``<image>`` and ``<|endofchunk|>`` as
  added tokens right after."""
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[DEFAULT_EOS_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(corpus, trainer)
  tokenizer.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in ADDED_TOKENS])
  return tokenizer


def default_tokenizer(cache_dir: str | os.PathLike | None = None) -> Tokenizer:
  """The shapes-world BPE tokenizer (``VOCAB_SIZE`` LM ids, padded), learned from the first
  ``CORPUS_SIZE`` train texts of the world on first use and cached as JSON in ``cache_dir``
  (default ``$XATTN_VLM_CACHE`` or ``~/.cache/xattn_vlm``). The file name carries a digest of
  that corpus and the settings, so a world whose text changed retrains instead of reusing stale
  merges; the file is written atomically, so concurrent first uses are safe."""
  corpus = world.text_corpus(CORPUS_SIZE)
  folder = _cache_dir(cache_dir)
  path = folder / f"shapes_bpe_{_cache_key(corpus)}.json"
  if not path.is_file():
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as f:
      f.write(train_bpe(corpus).to_str())
    os.replace(f.name, path)
  return Tokenizer(tokenizers.Tokenizer.from_file(str(path)), lm_vocab_size=VOCAB_SIZE,
                   eos_token=DEFAULT_EOS_TOKEN)
