"""``python -m xattn_vlm.prompt``'s library half: building the model and its processor."""

import pytest

from xattn_vlm import prompt


def test_fresh_model_from_a_preset_matches_its_processor():
  model, processor = prompt.build(None, "tiny", None, seed=0)
  assert model.config.lm.vocab_size == processor.tokenizer.lm_vocab_size
  assert processor.tokenizer.media_token_id == model.media_token_id
  assert processor.image_size == model.config.vision.image_size


def test_checkpoint_without_checkpoints_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="holds no checkpoint"):
    prompt.build(str(tmp_path), None, None, seed=0)
