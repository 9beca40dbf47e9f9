"""Few-shot training episodes of the shapes world (``ShapesWorld("fewshot_vqa" /
"fewshot_caption")``): tokenised by the training pipeline, they are the evaluation's prompt
(``fewshot.build_prompt`` through the ``Processor``) followed by the answer and
``<|endofchunk|>``, and only that answer is supervised."""

import numpy as np
import pytest

from xattn_vlm.data import default_tokenizer, fewshot, pipeline, sequence, sources
from xattn_vlm.data.sequence import IGNORE_INDEX
from xattn_vlm.data.shapes import records, world
from xattn_vlm.inference import Processor

SIZE = 16


@pytest.fixture(scope="module")
def tok():
  return default_tokenizer()


def _episode(kind, index, tok):
  chunks = records.fewshot_chunks(kind, "train", 0, index, image_size=SIZE, pool_size=64)
  transform = pipeline.ExampleTransform(tok, max_tokens=400, max_images=9, image_size=SIZE,
                                        mean=(0.5,) * 3, std=(0.5,) * 3, supervise="answer")
  record = {"id": index, "chunks": [c if isinstance(c, str) else
                                    sources.ImageRef(key=f"{index}/{i}", array=c)
                                    for i, c in enumerate(chunks)]}
  return chunks, transform(record)


@pytest.mark.parametrize("kind", sorted(records.FEWSHOT_TEMPLATES))
def test_episodes_are_the_evaluation_prompt_and_supervise_the_answer_alone(kind, tok):
  generator, template, fields = records.FEWSHOT_TEMPLATES[kind]
  processor = Processor(tok, image_size=SIZE, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                        max_length=400)
  seen_shots = set()
  for index in range(24):
    chunks, example = _episode(kind, index, tok)
    shots, pool = world.fewshot_draw("train", 0, index, max_shots=8, pool_size=64,
                                     zero_shot_demonstrations=fewshot.ZERO_SHOT_TEXT_DEMONSTRATIONS)
    seen_shots.add(shots)
    query = world.GENERATORS[generator]("train", 0, index, image_size=SIZE)
    demos = [world.GENERATORS[generator]("train", 0, i, image_size=SIZE) for i in pool]
    prompt = fewshot.build_prompt(template, {**fields(query), "image": query["image"]},
                                  [{**fields(d), "image": d["image"]} for d in demos], shots)
    ids, images = processor.encode_prompt(prompt.text, prompt.images)
    answer = fields(query)[fewshot.TEMPLATES[template].answer_field]
    real = example["input_ids"][example["attention_mask"] == 1].tolist()
    assert real[:len(ids)] == ids, (index, tok.decode(real), prompt.text)
    labels = example["labels"][example["labels"] != IGNORE_INDEX]
    assert tok.decode(labels) == answer + "<|endofchunk|>"
    assert (np.nonzero(example["labels"] != IGNORE_INDEX)[0] >= len(ids)).all()
    assert int(example["num_images"]) == len(images) == max(shots, 0) + 1
    np.testing.assert_allclose(example["images"][len(images) - 1, 0], images[-1], atol=1e-6)
  assert 0 in seen_shots and len(seen_shots) >= 5


def test_fewshot_draw_counts_and_errors():
  for index in range(50):
    shots, pool = world.fewshot_draw("train", 3, index, max_shots=4, pool_size=10,
                                     zero_shot_demonstrations=2)
    assert 0 <= shots <= 4 and len(pool) == (shots or 2) and len(set(pool)) == len(pool)
    assert all(0 <= i < 10 for i in pool)
  with pytest.raises(ValueError, match="pool_size must be at least 8"):
    world.fewshot_draw("train", 0, 0, max_shots=8, pool_size=5, zero_shot_demonstrations=2)
  with pytest.raises(ValueError, match="max_shots must be >= 0"):
    world.fewshot_draw("train", 0, 0, max_shots=-1, pool_size=5, zero_shot_demonstrations=2)


def test_endofchunk_is_text_only_before_the_first_image(tok):
  image = np.zeros((SIZE, SIZE, 3), np.float32)
  pipeline.require_text(["a<|endofchunk|>b<|endofchunk|>", image, "c"], "ok")
  for bad in (["a", image, "b<|endofchunk|>c"], ["a<image>", image, "b"]):
    with pytest.raises(sources.BadRecordError, match="its text contains"):
      pipeline.require_text(bad, "bad")
  example = sequence.build_example(["a<|endofchunk|>", image, "b"], tok, max_tokens=16,
                                   max_images=1, image_shape=(1, SIZE, SIZE, 3))
  ids = example["input_ids"][example["attention_mask"] == 1].tolist()
  assert ids == tok.encode("a<|endofchunk|><image>b<|endofchunk|>") + [tok.eos_token_id]
  assert tok.decode(example["labels"][example["labels"] != IGNORE_INDEX]) == "b<|endofchunk|>"
  with pytest.raises(ValueError, match="after image 0 contains"):
    sequence.build_example([image, "b<|endofchunk|>c"], tok, max_tokens=16, max_images=1,
                           image_shape=(1, SIZE, SIZE, 3))
