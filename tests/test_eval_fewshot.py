"""Few-shot prompts: golden strings for every task at 0, 2 and 4 shots (captioning and VQA
demonstrations followed by a newline, as OpenFlamingo 2.0.1's evaluation writes them)."""

import numpy as np
import pytest

from xattn_vlm.data import default_tokenizer, sequence
from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.data import fewshot

EOC = "<|endofchunk|>"

EXAMPLES = {
    "captioning": [{"image": f"img{i}", "caption": c} for i, c in enumerate(
        [" A dog on grass.\n", "A red bus.", "Two cats.", "A pizza.", "A kitchen."])],
    "vqa": [{"image": f"img{i}", "question": q, "answer": a} for i, (q, a) in enumerate(
        [("What animal is this?", "dog"), ("What color is the bus?", "red"),
         ("How many cats?", "2"), ("What food is this?", "pizza"), ("Which room is this?", "")])],
    "imagenet": [{"image": f"img{i}", "label": c} for i, c in enumerate(
        ["goldfish", "tabby cat", "school bus", "pizza", ""])],
    "hateful_memes": [{"image": f"img{i}", "ocr": o, "label": lab} for i, (o, lab) in enumerate(
        [("have a nice day", "no"), ("you people", "yes"), ("cats rule", "no"),
         ("monday again", "no"), ("look at this", "")])],
    "shapes_binding": [{"image": f"img{i}", "name": n} for i, n in enumerate(
        ["dax", "blicket", "dax", "wug", ""])],
}

GOLDEN = {
    ("captioning", 0): "Output:A dog on grass." + EOC + "\n" + "Output:A red bus." + EOC + "\n"
                       + "<image>Output:",
    ("captioning", 2): "<image>Output:A dog on grass." + EOC + "\n"
                       + "<image>Output:A red bus." + EOC + "\n" + "<image>Output:",
    ("captioning", 4): "<image>Output:A dog on grass." + EOC + "\n"
                       + "<image>Output:A red bus." + EOC + "\n"
                       + "<image>Output:Two cats." + EOC + "\n"
                       + "<image>Output:A pizza." + EOC + "\n" + "<image>Output:",
    ("vqa", 0): "Question:What animal is this? Short answer:dog" + EOC + "\n"
                + "Question:What color is the bus? Short answer:red" + EOC + "\n"
                + "<image>Question:Which room is this? Short answer:",
    ("vqa", 2): "<image>Question:What animal is this? Short answer:dog" + EOC + "\n"
                + "<image>Question:What color is the bus? Short answer:red" + EOC + "\n"
                + "<image>Question:Which room is this? Short answer:",
    ("vqa", 4): "<image>Question:What animal is this? Short answer:dog" + EOC + "\n"
                + "<image>Question:What color is the bus? Short answer:red" + EOC + "\n"
                + "<image>Question:How many cats? Short answer:2" + EOC + "\n"
                + "<image>Question:What food is this? Short answer:pizza" + EOC + "\n"
                + "<image>Question:Which room is this? Short answer:",
    ("imagenet", 0): "Output:goldfish" + EOC + "Output:tabby cat" + EOC + "<image>Output:",
    ("imagenet", 2): "<image>Output:goldfish" + EOC + "<image>Output:tabby cat" + EOC
                     + "<image>Output:",
    ("imagenet", 4): "<image>Output:goldfish" + EOC + "<image>Output:tabby cat" + EOC
                     + "<image>Output:school bus" + EOC + "<image>Output:pizza" + EOC
                     + "<image>Output:",
    ("hateful_memes", 0):
        "is an image with: 'have a nice day' written on it. Is it hateful? Answer:no" + EOC
        + "is an image with: 'you people' written on it. Is it hateful? Answer:yes" + EOC
        + "<image>is an image with: 'look at this' written on it. Is it hateful? Answer:",
    ("hateful_memes", 2):
        "<image>is an image with: 'have a nice day' written on it. Is it hateful? Answer:no" + EOC
        + "<image>is an image with: 'you people' written on it. Is it hateful? Answer:yes" + EOC
        + "<image>is an image with: 'look at this' written on it. Is it hateful? Answer:",
    ("hateful_memes", 4):
        "<image>is an image with: 'have a nice day' written on it. Is it hateful? Answer:no" + EOC
        + "<image>is an image with: 'you people' written on it. Is it hateful? Answer:yes" + EOC
        + "<image>is an image with: 'cats rule' written on it. Is it hateful? Answer:no" + EOC
        + "<image>is an image with: 'monday again' written on it. Is it hateful? Answer:no" + EOC
        + "<image>is an image with: 'look at this' written on it. Is it hateful? Answer:",
    ("shapes_binding", 0): "This is a dax." + EOC + "This is a blicket." + EOC
                           + "<image>What is this? It is a",
    ("shapes_binding", 2): "<image>This is a dax." + EOC + "<image>This is a blicket." + EOC
                           + "<image>What is this? It is a",
    ("shapes_binding", 4): "<image>This is a dax." + EOC + "<image>This is a blicket." + EOC
                           + "<image>This is a dax." + EOC + "<image>This is a wug." + EOC
                           + "<image>What is this? It is a",
}


@pytest.mark.parametrize("task, shots", sorted(GOLDEN))
def test_prompt_golden(task, shots):
  examples = EXAMPLES[task]
  demos = examples[:fewshot.num_demonstrations(shots)]
  prompt = fewshot.build_prompt(task, examples[-1], demos, shots)
  assert prompt.text == GOLDEN[(task, shots)]
  # One image per image token, demonstrations first, the query last; none for text-only demos.
  expected_images = [d["image"] for d in demos] if shots else []
  assert prompt.images == expected_images + [examples[-1]["image"]]
  assert prompt.text.count("<image>") == len(prompt.images)


@pytest.mark.parametrize("num_shots", [1, 4])
def test_binding_template_is_the_episode_text(num_shots):
  """The shapes_binding prompt is the binding episode as training lays it out (one <image> and
  <|endofchunk|> around each support), cut where the answer starts."""
  episode = shapes_world.binding_episode("test", 0, 3, num_shots=num_shots, image_size=8)
  tokenizer = default_tokenizer()
  chunks = [c if isinstance(c, str) else np.zeros((8, 8, 3), np.float32)
            for c in episode["chunks"]]
  example = sequence.build_example(chunks, tokenizer, max_tokens=128, max_images=num_shots + 1,
                                   image_shape=(1, 8, 8, 3))
  trained = tokenizer.decode(example["input_ids"][example["attention_mask"] == 1])
  names = dict(zip(episode["shapes"], episode["names"]))
  demos = [{"image": i, "name": names[scene.objects[0].shape]}
           for i, scene in enumerate(episode["scenes"][:-1])]
  prompt = fewshot.build_prompt("shapes_binding", {"image": "query"}, demos, num_shots)
  assert trained.startswith(prompt.text)
  assert trained[len(prompt.text):].startswith(f" {episode['answer']}." + EOC)


def test_num_demonstrations():
  assert [fewshot.num_demonstrations(s) for s in (0, 4, 8, 16, 32)] == [2, 4, 8, 16, 32]
  with pytest.raises(ValueError, match="shots"):
    fewshot.num_demonstrations(-1)


def test_custom_template_and_errors():
  template = fewshot.PromptTemplate("<image>Caption ({lang}): {text}<|endofchunk|>", "text")
  query = {"image": 0, "lang": "fr"}
  demo = {"image": 1, "lang": "fr", "text": "un chat"}
  assert fewshot.build_prompt(template, query, [demo], 1) == (
      "<image>Caption (fr): un chat<|endofchunk|><image>Caption (fr):", [1, 0])  # no space left
  with pytest.raises(ValueError, match="needs 2 demonstrations"):
    fewshot.build_prompt(template, query, [demo], 0)
  with pytest.raises(KeyError, match="'lang'"):
    fewshot.build_prompt(template, {"image": 0}, [demo], 1)
  with pytest.raises(KeyError, match="image_key"):
    fewshot.build_prompt(template, {"lang": "fr"}, [demo], 1)
  with pytest.raises(KeyError, match="captioning"):
    fewshot.build_prompt("caption", query, [demo], 1)
  with pytest.raises(ValueError, match="exactly one {answer}"):
    fewshot.PromptTemplate("<image>{question}", "answer")
  with pytest.raises(ValueError, match="image token"):
    fewshot.PromptTemplate("Output:{caption}", "caption")
