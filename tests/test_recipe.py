"""The miniature recipe end to end (``experiments/shapes_tiny.py:smoke``): three stages, the
few-shot evaluation and the report; the trained model must beat the untrained one (gates at 0:
the frozen LM alone) on shapes-world VQA."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from xattn_vlm import recipe
from xattn_vlm.recipe import report
from xattn_vlm.train import input_pipeline

REPO = pathlib.Path(__file__).resolve().parent.parent


def shapes_tiny(preset: str):
  spec = importlib.util.spec_from_file_location(
      "shapes_tiny", REPO / "experiments" / "shapes_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.mark.slow
def test_smoke_recipe_beats_the_untrained_model_on_vqa(tmp_path):
  config = shapes_tiny("smoke")
  summary = recipe.run(config, str(tmp_path))

  trained = np.mean([np.mean(s) for s in summary["results"]["shapes_vqa"].values()])
  untrained = np.mean([np.mean(s) for s in summary["untrained"]["shapes_vqa"].values()])
  assert trained > untrained, (trained, untrained)
  assert set(summary["results"]) == {"shapes_captioning", "shapes_vqa", "shapes_binding"}
  assert set(summary["seconds"]) >= set(recipe.STAGES) | {"eval", "total"}
  saved = json.loads((tmp_path / recipe.SUMMARY).read_text())
  assert saved["results"]["shapes_vqa"] == {str(k): v for k, v in
                                           summary["results"]["shapes_vqa"].items()}
  text = (tmp_path / report.REPORT).read_text()
  assert "| VQA, majority answer per question type |" in text and "![" in text
  for figure in (report.FIGURE, report.GRID):
    assert (tmp_path / figure).stat().st_size > 10_000


def test_recipe_presets():
  smoke, full = shapes_tiny("smoke"), shapes_tiny("recipe")
  assert set(full.stages) == set(recipe.STAGES)
  for stage in recipe.STAGES:
    assert smoke.stages[stage].total_steps < full.stages[stage].total_steps
  assert tuple(full.eval.shots) == (0, 4, 8)
  with pytest.raises(ValueError, match="steps=N"):
    shapes_tiny("smoke,steps=3")
  with pytest.raises(ValueError, match="expected recipe, smoke or one of"):
    shapes_tiny("pretrain")


def test_recipe_batches_have_each_datasets_own_shapes():
  """Short pairs are not padded to the documents' length and image slots; LM records pack
  several texts so the whole context is trained."""
  flamingo = shapes_tiny("flamingo")
  iterator = input_pipeline.create_iterator(flamingo)
  batches = next(iterator)
  iterator.close()
  assert batches["vqa"]["input_ids"].shape == (32, 64)
  assert batches["vqa"]["images"].shape[1] == 1
  assert batches["documents"]["input_ids"].shape == (8, 192)
  assert batches["documents"]["images"].shape[1] == 5

  lm = shapes_tiny("lm_pretrain")
  iterator = input_pipeline.create_iterator(lm)
  text = next(iterator)["text"]
  iterator.close()
  assert text["input_ids"].shape == (8, 384)
  assert text["attention_mask"].sum(axis=1).mean() > 250  # 8 texts of about 45 tokens each
