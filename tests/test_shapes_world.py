"""Shapes world: determinism, balance, held-out pairs, binding episodes, disjoint splits."""

import collections
import hashlib
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from xattn_vlm.data.shapes import world as sw

from helpers import all_generators, fingerprint

# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 7: 24.32, 63: 103.4}


_FINGERPRINT_SCRIPT = """
import sys
sys.path.insert(0, {path!r})
from helpers import all_generators, fingerprint
print(fingerprint([all_generators(7, i) for i in range(3)]))
"""


def test_same_seed_gives_the_same_bytes_even_in_another_process():
  here = fingerprint([all_generators(7, i) for i in range(3)])
  assert here == fingerprint([all_generators(7, i) for i in range(3)])
  assert here != fingerprint([all_generators(8, i) for i in range(3)])
  root = str(pathlib.Path(__file__).resolve().parent)
  other = subprocess.run([sys.executable, "-c", _FINGERPRINT_SCRIPT.format(path=root)],
                         check=True, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONHASHSEED="12345")).stdout.strip()
  assert other == here


def chi_square(counts: collections.Counter, values) -> float:
  expected = sum(counts.values()) / len(values)
  return sum((counts[v] - expected) ** 2 / expected for v in values)


@pytest.mark.parametrize("split", ["train", "test"])
def test_attributes_are_balanced(split):
  scenes = [sw.sample_scene(np.random.default_rng([1, i]), split) for i in range(3000)]
  objects = [o for s in scenes for o in s.objects]
  for attribute, values in (("shape", sw.SHAPES), ("colour", sw.COLOURS), ("size", sw.SIZES),
                            ("texture", sw.TEXTURES), ("position", sw.POSITIONS)):
    counts = collections.Counter(getattr(o, attribute) for o in objects)
    assert set(counts) == set(values)
    assert chi_square(counts, values) < CHI2_CRITICAL[len(values) - 1], (attribute, counts)
    assert max(counts.values()) / min(counts.values()) < 1.15, (attribute, counts)
  counts = collections.Counter(len(s.objects) for s in scenes)
  assert chi_square(counts, range(1, sw.MAX_OBJECTS + 1)) < CHI2_CRITICAL[3]


def test_question_types_and_answers_are_balanced_and_true():
  items = [sw.vqa_example("train", 0, i, image_size=8) for i in range(1500)]
  types = collections.Counter(item["question_type"] for item in items)
  assert chi_square(types, sw.QUESTION_TYPES) < CHI2_CRITICAL[4]
  yes_no = collections.Counter(i["answer"] for i in items if i["question_type"] == "yes/no")
  assert chi_square(yes_no, ("yes", "no")) < CHI2_CRITICAL[1]
  for item in items:
    scene, question, answer = item["scene"], item["question"], item["answer"]
    assert answer in sw.ANSWERS[item["question_type"]]
    if question == "How many objects are there?":
      assert answer == str(len(scene.objects))
    if match := re.fullmatch(r"Is there an? (\w+) (\w+)\?", question):
      present = any((o.colour, o.shape) == match.groups() for o in scene.objects)
      assert answer == ("yes" if present else "no")
    if match := re.fullmatch(r"What colour is the (\w+)\?", question):
      (target,) = [o for o in scene.objects if o.shape == match.group(1)]
      assert answer == target.colour
    words = set(re.findall(r"\w+", question))
    assert not any({c, s} <= words for c, s in sw.HELD_OUT_COMBINATIONS), question
  majority = sw.majority_answers(num_questions=500)
  assert set(majority) == set(sw.QUESTION_TYPES)
  assert all(majority[t] in sw.ANSWERS[t] for t in sw.QUESTION_TYPES)
  assert set(sw.ANSWER_VOCABULARY) == {a for answers in sw.ANSWERS.values() for a in answers}


def held_out_mentioned(text: str) -> bool:
  return any(re.search(rf"\b{colour}( \w+)? {shape}", text)
             for colour, shape in sw.HELD_OUT_COMBINATIONS)


def test_held_out_combinations_absent_from_train_present_in_test():
  assert len(sw.HELD_OUT_COMBINATIONS) == 8
  assert sorted(c for c, _ in sw.HELD_OUT_COMBINATIONS) == sorted(sw.COLOURS)
  assert sorted(s for _, s in sw.HELD_OUT_COMBINATIONS) == sorted(sw.SHAPES)
  for split in ("train", "validation"):
    scenes = [sw.sample_scene(np.random.default_rng([2, i]), split) for i in range(2000)]
    assert not any(sw.has_held_out(s) for s in scenes)
    texts = [sw.text_example(split, 0, i)["text"] for i in range(1000)]
    assert not any(held_out_mentioned(t) for t in texts)
    assert not any(sw.caption_example(split, 0, i, image_size=8)["held_out"] for i in range(200))
  scenes = [sw.sample_scene(np.random.default_rng([2, i]), "test") for i in range(2000)]
  pairs = collections.Counter((o.colour, o.shape) for s in scenes for o in s.objects)
  assert set(pairs) == {(c, s) for c in sw.COLOURS for s in sw.SHAPES}
  assert chi_square(pairs, list(pairs)) < CHI2_CRITICAL[63]
  assert any(sw.caption_example("test", 0, i, image_size=8)["held_out"] for i in range(50))


@pytest.mark.parametrize("num_shots", range(9))
def test_binding_answers_follow_the_support_images(num_shots):
  for index in range(4):
    episode = sw.binding_episode("train", 0, index, num_shots=num_shots, image_size=16)
    names, shapes, scenes = episode["names"], episode["shapes"], episode["scenes"]
    assert len(set(names)) == len(names) == 2 and len(scenes) == num_shots + 1
    assert not set(names) & set(sw.SHAPES + sw.COLOURS)
    support = episode["chunks"][:2 * num_shots]
    assert [isinstance(c, str) for c in support] == [False, True] * num_shots
    for scene, text in zip(scenes, support[1::2]):
      (obj,) = scene.objects
      assert text == f"This is a {names[shapes.index(obj.shape)]}."
    (query,) = scenes[-1].objects
    assert episode["answer"] == names[shapes.index(query.shape)]
    if num_shots:
      assert f"This is a {episode['answer']}." in support[1::2]
    assert episode["chunks"][-1] == f"What is this? It is a {episode['answer']}."
    assert episode["prompt_chunks"][-1] == "What is this? It is a"
    assert all(a is b for a, b in zip(episode["prompt_chunks"][:-1], episode["chunks"][:-1]))


def test_binding_is_drawn_per_episode():
  """Names are fresh and a recurring name is bound to other shapes: nothing to memorise."""
  episodes = [sw.binding_episode("train", 0, i, num_shots=0, image_size=8) for i in range(600)]
  assert len({e["answer"] for e in episodes}) > 400
  shapes_of_name = collections.defaultdict(set)
  for e in episodes:
    for name, shape in zip(e["names"], e["shapes"]):
      shapes_of_name[name].add(shape)
  assert sum(len(shapes) > 1 for shapes in shapes_of_name.values()) >= 10
  answers = collections.Counter(e["scenes"][-1].objects[0].shape for e in episodes)
  assert chi_square(answers, sw.SHAPES) < CHI2_CRITICAL[7]


def test_splits_are_disjoint():
  def scenes(split):
    return {s for i in range(150) for s in sw.interleaved_example(split, 0, i, image_size=8)[
        "scenes"]}
  train, validation, test = scenes("train"), scenes("validation"), scenes("test")
  assert not train & validation and not train & test and not validation & test
  images = {split: {sw.caption_example(split, 0, i, image_size=16)["image"].tobytes()
                    for i in range(100)} for split in sw.SPLITS}
  assert not images["train"] & images["validation"] and not images["train"] & images["test"]


def test_rendering_draws_what_the_scene_says():
  dark = sw.Background(start=(0, 0, 0), end=(0, 0, 0), angle=0.0, noise_std=0.0, noise_seed=0)
  drawn = []
  for shape in sw.SHAPES:
    obj = sw.ShapeObject(shape=shape, colour="red", size="large", texture="solid",
                         position="centre")
    image = sw.render(sw.Scene(objects=(obj,), background=dark), image_size=64)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[32, 32], sw.RGB["red"])
    np.testing.assert_array_equal(image[2, 2], (0, 0, 0))
    drawn.append(image.tobytes())
  assert len(set(drawn)) == len(sw.SHAPES)
  small = sw.ShapeObject(shape="square", colour="blue", size="small", texture="striped",
                         position="left")
  image = sw.render(sw.Scene(objects=(small,), background=dark), image_size=64)
  ink = np.argwhere(image.any(-1))
  assert ink[:, 1].max() < 24 and 24 < ink[:, 0].mean() < 40  # left, vertically centred
  assert len({tuple(p) for p in image[image.any(-1)]}) == 2  # blue and its stripes' shade


def test_documents_are_ready_for_build_example():
  for index in range(20):
    doc = sw.interleaved_example("validation", 0, index, image_size=16)
    chunks = doc["chunks"][1:] if isinstance(doc["chunks"][0], str) else doc["chunks"]
    assert [isinstance(c, str) for c in chunks] == [False, True] * len(doc["scenes"])
    assert 2 <= len(doc["scenes"]) <= 5
  kinds = collections.Counter(sw.text_example("train", 0, i)["kind"] for i in range(500))
  assert set(kinds) == set(sw.TEXT_KINDS)
  pair = sw.pair_example("train", 0, 0, image_size=16)
  assert pair["attributes"].shape == (len(sw.ATTRIBUTE_NAMES),)
  present = {name for name, v in zip(sw.ATTRIBUTE_NAMES, pair["attributes"]) if v}
  assert present == ({f"shape:{o.shape}" for o in pair["scene"].objects}
                     | {f"colour:{o.colour}" for o in pair["scene"].objects})
  with pytest.raises(ValueError, match="split must be one of"):
    sw.caption_example("dev", 0, 0)
  with pytest.raises(ValueError, match="index must be a non-negative integer, got -1"):
    sw.vqa_example("train", 0, -1)
