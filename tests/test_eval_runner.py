"""The evaluation harness end to end with a tiny random model: the official benchmark layouts
(fixture files written here) and the shapes-world tasks, results.json / results.md, RICES caches,
and a crashed evaluation that resumes to exactly the uninterrupted results.

The point is that every path runs and writes results, not the scores of a random model. Each
task compiles one program (``one_shape_per_task``), shared by its shot counts and trials.
"""

import io
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from xattn_vlm.data import default_tokenizer
from xattn_vlm.eval import runner
from xattn_vlm.eval import tasks
from xattn_vlm.inference import Processor, decoding
from xattn_vlm.models import config as model_config
from xattn_vlm.models.flamingo import Flamingo

CAPTIONS = ["A red circle on the left.", "Two blue squares at the top.", "A green star.",
            "A white heart in the centre.", "Three yellow triangles."]


@pytest.fixture(scope="module")
def tiny():
  """A random tiny model with open gates (so images change its outputs) and its processor."""
  tokenizer = default_tokenizer()
  config = model_config.tiny()
  config.lm.vocab_size = tokenizer.lm_vocab_size
  config.lm.max_length = 128
  model = nnx.jit(lambda: Flamingo(config, rngs=nnx.Rngs(0)))()
  for block in model.gated_blocks:
    block.attn_gate[...] = jnp.asarray(1.0)
    block.ffw_gate[...] = jnp.asarray(1.0)
  return model, Processor.from_model_config(config, tokenizer)


def _image(path: pathlib.Path, seed: int, fmt: str = "JPEG") -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = np.random.default_rng(seed).integers(0, 256, (20, 16, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  path.write_bytes(buffer.getvalue())


def _json(path: pathlib.Path, content) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(content))


def write_benchmarks(root: pathlib.Path, n: int = 4) -> None:
  """Every benchmark in its official layout, ``n`` test and ``n`` train examples each, at the
  paths ``tasks.default_data_config`` expects under ``root``."""
  karpathy = {"coco": [], "flickr30k": []}
  for split, subset in (("train", "train2014"), ("test", "val2014")):
    questions, annotations = [], []
    for i in range(n):
      image_id = 100 * (split == "test") + i
      coco_name = f"COCO_{subset}_{image_id:012d}.jpg"
      _image(root / "coco" / subset / coco_name, image_id)
      sentences = [{"raw": CAPTIONS[(i + j) % 5]} for j in range(5)]
      karpathy["coco"].append({"filepath": subset, "filename": coco_name, "cocoid": image_id,
                               "split": split, "sentences": sentences})
      _image(root / "flickr30k" / "flickr30k-images" / f"{image_id}.jpg", image_id)
      karpathy["flickr30k"].append({"filename": f"{image_id}.jpg", "imgid": image_id,
                                    "split": split, "sentences": sentences})
      questions.append({"question_id": 10 * image_id + 1, "image_id": image_id,
                        "question": "What colour is the circle?"})
      annotations.append({"question_id": 10 * image_id + 1, "multiple_choice_answer": "red",
                          "question_type": "what color", "answer_type": "other",
                          "answers": [{"answer": a} for a in ["red"] * 7 + ["blue"] * 3]})
    for folder, prefix, annotation_file in (("vqav2", "v2_", "v2_mscoco_{}_annotations.json"),
                                            ("okvqa", "", "mscoco_{}_annotations.json")):
      _json(root / folder / f"{prefix}OpenEnded_mscoco_{subset}_questions.json",
            {"data_subtype": subset, "questions": questions})
      _json(root / folder / annotation_file.format(subset), {"annotations": annotations})
  for name, entries in karpathy.items():
    _json(root / "karpathy" / f"dataset_{name}.json", {"images": entries})

  for split in ("train", "val"):
    text_vqa, vizwiz, memes = [], [], []
    for i in range(n):
      key = f"{split}{i}"
      _image(root / "textvqa" / "train_images" / f"{key}.jpg", i)
      text_vqa.append({"question_id": i, "image_id": key, "question": "What does it say?",
                       "answers": ["stop"] * 10})
      _image(root / "vizwiz" / split / f"VizWiz_{key}.jpg", i)
      vizwiz.append({"image": f"VizWiz_{key}.jpg", "question": "What is this?", "answerable": 1,
                     "answers": [{"answer": "a can", "answer_confidence": "yes"}] * 10})
      _image(root / "hateful_memes" / "img" / f"{key}.png", i, fmt="PNG")
      memes.append(json.dumps({"id": key, "img": f"img/{key}.png", "label": i % 2,
                               "text": "have a nice day"}))
    _json(root / "textvqa" / f"TextVQA_0.5.1_{split}.json", {"data": text_vqa})
    _json(root / "vizwiz" / f"{split}.json", vizwiz)
    meme_file = "train.jsonl" if split == "train" else "dev_seen.jsonl"
    (root / "hateful_memes" / meme_file).write_text("\n".join(memes) + "\n")
    for c, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
      for i in range(2):
        _image(root / "imagenet" / split / wnid / f"{wnid}_{i}.JPEG", 10 * c + i)
  (root / "imagenet" / "LOC_synset_mapping.txt").write_text(
      "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
      "n01484850 great white shark, white shark\n")


def test_every_benchmark_from_its_official_layout(tiny, tmp_path):
  model, processor = tiny
  write_benchmarks(tmp_path / "data")
  config = runner.default_config()
  config.tasks = ",".join(tasks.BENCHMARKS)
  config.data_root = str(tmp_path / "data")
  config.shots = (0, 1)
  config.demonstrations = "rices"
  config.batch_size = 8
  config.one_shape_per_task = True
  results = runner.evaluate(model, processor, config, tmp_path / "out")

  expected = set(tasks.BENCHMARKS) | {"imagenet_top5"}
  assert set(results) == expected
  saved = json.loads((tmp_path / "out" / runner.RESULTS_JSON).read_text())
  assert set(saved["results"]) == expected
  for name, cells in saved["results"].items():
    assert set(cells) == {"0", "1"}
    for cell in cells.values():
      assert len(cell["trials"]) == 1 and np.isfinite(cell["mean"]), name
  assert saved["metadata"]["queries"]["coco"] == 4 and saved["metadata"]["demonstrations"] == "rices"
  assert saved["results"]["imagenet_top5"]["0"]["mean"] == 100.0  # 3 classes: always in the top 3
  table = (tmp_path / "out" / runner.RESULTS_MD).read_text()
  # The published figures beside ours; 1-shot was never published.
  assert "| COCO | ours |" in table and "| COCO | OF-9B [1] | 79.5 | — |" in table
  assert "| VQAv2 | Flamingo-80B [2] | 56.3 | — |" in table
  # RICES features: one cache of each training pool, reused by both shot counts.
  assert len(list((tmp_path / "out" / "rices").glob("coco_pool_*.npy"))) == 1
  records = [json.loads(line) for line in
             (tmp_path / "out" / "predictions" / "vqav2" / "1shot_trial0.jsonl").open()]
  assert sorted(r["id"] for r in records) == [1001, 1011, 1021, 1031]
  assert all(len(r["reference"]) == 10 for r in records)


def test_missing_benchmark_files_name_the_setting(tiny, tmp_path):
  config = runner.default_config()
  config.tasks = "coco"
  config.data_root = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"coco test split: .*--eval\.data_root"):
    runner.evaluate(*tiny, config, tmp_path / "out")


class SimulatedCrash(Exception):
  """Stands for the process dying mid-evaluation."""


def _shapes_config():
  config = runner.default_config()
  config.shots = (0, 2)
  config.trials = 2
  config.batch_size = 8
  config.one_shape_per_task = True
  config.shapes.num_queries = 12
  config.shapes.pool_size = 64
  return config


def test_shapes_tasks_resume_after_a_crash_with_the_same_results(tiny, tmp_path, monkeypatch):
  model, processor = tiny
  config = _shapes_config()
  complete = runner.evaluate(model, processor, config, tmp_path / "complete")
  assert set(complete) == set(tasks.SHAPES_TASKS)
  assert all(len(trials) == 2 for cells in complete.values() for trials in cells.values())

  calls, crashed = [], []
  generate = decoding.generate_tokens

  def crash_on_the_fifth_batch(*args, **kwargs):
    calls.append(1)
    if len(calls) == 5 and not crashed:
      crashed.append(1)
      raise SimulatedCrash
    return generate(*args, **kwargs)

  monkeypatch.setattr(decoding, "generate_tokens", crash_on_the_fifth_batch)
  with pytest.raises(SimulatedCrash):
    runner.evaluate(model, processor, config, tmp_path / "resumed")
  logs = tmp_path / "resumed" / "predictions"
  # Two cells (12 queries each, batches of 8 and 4) were logged before the crash.
  assert sum(1 for path in logs.rglob("*.jsonl") for _ in path.open()) == 2 * 12

  calls.clear()
  resumed = runner.evaluate(model, processor, config, tmp_path / "resumed")
  # 2 batches of 8 per cell (12 queries), 12 cells, 4 batches logged before the crash.
  assert len(calls) == 2 * 12 - 4
  assert resumed == complete
  for path in (tmp_path / "complete" / "predictions").rglob("*.jsonl"):
    twin = tmp_path / "resumed" / path.relative_to(tmp_path / "complete")
    by_id = lambda p: sorted(map(json.loads, p.open()), key=lambda r: r["id"])
    assert by_id(path) == by_id(twin), path.name


def test_binding_prompts_are_the_episodes(tiny, tmp_path):
  model, processor = tiny
  evaluator = runner.Evaluator(model, processor, _shapes_config(), tmp_path)
  cell = runner.Cell(tasks.get_task("shapes_binding"), 2, 1)
  (prompt, answer), = evaluator.prompts(cell)[:1]
  assert prompt.text.startswith("<image>This is a ") and prompt.text.endswith(
      "<image>What is this? It is a")
  assert len(prompt.images) == 3 and answer in prompt.text
  assert tasks.binding_answer(f" {answer}. What") == tasks.binding_answer(f"{answer}") == answer
