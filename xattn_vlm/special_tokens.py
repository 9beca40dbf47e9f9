"""The special tokens a Flamingo-family model adds after its LM's vocabulary, by name and order.

A model config lists its added tokens in id order (``added_tokens``): token k has id
``lm.vocab_size + k``. The model (``models.flamingo``) and the tokenizer built for that config
(``data.tokenizer``) both take the ids from ``added_token_ids``, so the two cannot disagree. This
module sits outside ``models`` and ``data`` because both read it and neither imports the other.
"""

from __future__ import annotations

from typing import Sequence

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
# IDEFICS writes every image as <fake_token_around_image><image><fake_token_around_image>.
IMAGE_BOUNDARY_TOKEN = "<fake_token_around_image>"

DEFAULT_ADDED_TOKENS = (MEDIA_TOKEN, EOC_TOKEN)  # new models: <image> = vocab + 0, eoc = vocab + 1
# OpenFlamingo adds <|endofchunk|> then <image> (then <PAD>, which has no use in a model).
OPENFLAMINGO_ADDED_TOKENS = (EOC_TOKEN, MEDIA_TOKEN)
IDEFICS_ADDED_TOKENS = (IMAGE_BOUNDARY_TOKEN, MEDIA_TOKEN)  # ids 32000 and 32001


def added_token_ids(lm_vocab_size: int, added_tokens: Sequence[str]) -> tuple[int, int | None]:
  """``(media_token_id, eoc_token_id)`` of a model whose LM vocabulary has ``lm_vocab_size`` ids
  and whose added tokens are ``added_tokens`` in id order; the end-of-chunk id is None when the
  model has no such token (IDEFICS)."""
  added_tokens = tuple(added_tokens)
  if MEDIA_TOKEN not in added_tokens or len(set(added_tokens)) != len(added_tokens):
    raise ValueError(f"added_tokens must name {MEDIA_TOKEN!r} once and hold no token twice, got "
                     f"{added_tokens}")
  eoc = lm_vocab_size + added_tokens.index(EOC_TOKEN) if EOC_TOKEN in added_tokens else None
  return lm_vocab_size + added_tokens.index(MEDIA_TOKEN), eoc
