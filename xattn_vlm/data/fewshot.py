"""Few-shot prompts: task templates and the k-shot prompt built from demonstrations and a query.

A prompt is demonstrations followed by the query, each demonstration a filled template ending in
``<|endofchunk|>`` plus the template's separator (a newline for captioning and VQA, nothing for
classification, as OpenFlamingo 2.0.1's evaluation code builds them), and the query the same
template cut where its answer begins, so the model writes (or scores) the answer next. At 0
shots the prompt still opens with 2 demonstrations, but text-only: their ``<image>`` tokens and
images are left out (Flamingo and OpenFlamingo do this so the model sees the answer format
without being shown an image).
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, NamedTuple, Sequence

from xattn_vlm.data.shapes import world as shapes_world

IMAGE_TOKEN = "<image>"
END_OF_CHUNK = "<|endofchunk|>"
ZERO_SHOT_TEXT_DEMONSTRATIONS = 2


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """A task's demonstration text with ``{field}`` slots, one of them the answer.

  Attributes:
    text: a demonstration with its answer, e.g. ``"<image>Output:{caption}<|endofchunk|>"``; it
      holds exactly one image token.
    answer_field: the slot the model fills; the query is ``text`` cut just before it.
    image_token: the token marking where the example's image sits.
    demonstration_text: the demonstrations' form when it differs from the query's (binding
      episodes: supports say "This is a {name}.", the query asks "What is this? It is a"); None
      means ``text``. Same rules: one answer slot, one image token.
    separator: what follows each demonstration in a prompt.
  """
  text: str
  answer_field: str
  image_token: str = IMAGE_TOKEN
  demonstration_text: str | None = None
  separator: str = ""

  def __post_init__(self):
    for text in (self.text, self.demonstration_text):
      if text is None:
        continue
      fields = _fields(text)
      if fields.count(self.answer_field) != 1:
        raise ValueError(f"template {text!r} must have exactly one {{{self.answer_field}}} slot "
                         f"(answer_field), found fields {fields}")
      if text.count(self.image_token) != 1:
        raise ValueError(f"template {text!r} must hold the image token {self.image_token!r} "
                         f"exactly once, found it {text.count(self.image_token)} times")

  @property
  def fields(self) -> list[str]:
    """The query form's slot names in order of appearance."""
    return _fields(self.text)

  def _fill(self, text: str, example: Mapping[str, Any]) -> str:
    values = {}
    for name in _fields(text):
      if name not in example:
        raise KeyError(f"the template {self.text!r} needs field {name!r}, but the example only has "
                       f"{sorted(example)}")
      # Stripped as OpenFlamingo strips captions: stray whitespace must not reach the prompt.
      values[name] = str(example[name]).strip()
    return text.format(**values)

  def demonstration(self, example: Mapping[str, Any]) -> str:
    """The demonstration form filled from ``example``, answer included."""
    return self._fill(self.demonstration_text or self.text, example)

  def query(self, example: Mapping[str, Any]) -> str:
    """The template filled from ``example`` up to the answer, which is left for the model.

    Spaces right before the answer slot are left out too: byte-level BPE tokenizers attach a
    word's leading space to the word, so the model writes " dax", as it saw in training.
    """
    cut = self.text[:self.text.index("{" + self.answer_field + "}")].rstrip(" ")
    return self._fill(cut, example)


def _fields(text: str) -> list[str]:
  return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


# OpenFlamingo's prompts (its paper and evaluation code). Its code ends every demonstration with
# <|endofchunk|>, the ImageNet and Hateful Memes ones included, and puts a newline after each
# captioning and VQA demonstration (open_flamingo/eval/evaluate.py, 2.0.1).
TEMPLATES: dict[str, PromptTemplate] = {
    "captioning": PromptTemplate(f"{IMAGE_TOKEN}Output:{{caption}}{END_OF_CHUNK}", "caption",
                                 separator="\n"),
    "vqa": PromptTemplate(
        f"{IMAGE_TOKEN}Question:{{question}} Short answer:{{answer}}{END_OF_CHUNK}", "answer",
        separator="\n"),
    # The shapes world's tasks read as its training documents do: each <|endofchunk|> is followed
    # by the next image, with no newline between (the training layout has no text there).
    "shapes_captioning": PromptTemplate(f"{IMAGE_TOKEN}Output:{{caption}}{END_OF_CHUNK}",
                                        "caption"),
    "shapes_vqa": PromptTemplate(
        f"{IMAGE_TOKEN}Question:{{question}} Short answer:{{answer}}{END_OF_CHUNK}", "answer"),
    "imagenet": PromptTemplate(f"{IMAGE_TOKEN}Output:{{label}}{END_OF_CHUNK}", "label"),
    "hateful_memes": PromptTemplate(
        f"{IMAGE_TOKEN}is an image with: '{{ocr}}' written on it. Is it hateful? "
        f"Answer:{{label}}{END_OF_CHUNK}", "label"),
    # The shapes world's fast-binding episodes (shapes_world.binding_episode), in the episode's
    # own words: supports "<image>This is a dax.", then "<image>What is this? It is a" for the
    # model to finish with a name it only saw in this prompt.
    "shapes_binding": PromptTemplate(
        f"{IMAGE_TOKEN}{shapes_world.QUERY_PROMPT} {{name}}.{END_OF_CHUNK}", "name",
        demonstration_text=f"{IMAGE_TOKEN}{shapes_world.SUPPORT_FORMAT}{END_OF_CHUNK}"),
}


class FewShotPrompt(NamedTuple):
  """The prompt text and its images, in the order of the image tokens in the text."""
  text: str
  images: list


def num_demonstrations(shots: int) -> int:
  """How many demonstrations a ``shots``-shot prompt holds: ``shots``, or 2 text-only at 0 shots."""
  if shots < 0:
    raise ValueError(f"shots must be >= 0, got {shots}")
  return shots if shots > 0 else ZERO_SHOT_TEXT_DEMONSTRATIONS


def build_prompt(template: PromptTemplate | str, query: Mapping[str, Any],
                 demonstrations: Sequence[Mapping[str, Any]], shots: int, *,
                 image_key: str = "image") -> FewShotPrompt:
  """The ``shots``-shot prompt for ``query``.

  Args:
    template: a ``PromptTemplate`` or the name of one in ``TEMPLATES``.
    query: the example to answer: its template fields except the answer, and its image.
    demonstrations: ``num_demonstrations(shots)`` examples with every field and (unless
      ``shots == 0``) an image, in prompt order.
    shots: the number of in-context images; 0 makes the demonstrations text-only.
    image_key: the key of each example's image (any object: array, path, id).

  Returns:
    The text, and the images of the demonstrations (none at 0 shots) followed by the query's.
  """
  if isinstance(template, str):
    if template not in TEMPLATES:
      raise KeyError(f"template must be a PromptTemplate or one of {sorted(TEMPLATES)}, "
                     f"got {template!r}")
    template = TEMPLATES[template]
  expected = num_demonstrations(shots)
  if len(demonstrations) != expected:
    raise ValueError(f"a {shots}-shot prompt needs {expected} demonstrations"
                     f"{' (text-only)' if shots == 0 else ''}, got {len(demonstrations)}")
  texts = [template.demonstration(demo) + template.separator for demo in demonstrations]
  images = []
  if shots == 0:
    texts = [text.replace(template.image_token, "") for text in texts]
  else:
    images = [_image(demo, image_key, f"demonstrations[{i}]")
              for i, demo in enumerate(demonstrations)]
  images.append(_image(query, image_key, "query"))
  return FewShotPrompt("".join(texts) + template.query(query), images)


def _image(example: Mapping[str, Any], image_key: str, name: str):
  if image_key not in example:
    raise KeyError(f"{name} has no image under image_key={image_key!r}; "
                   f"its keys: {sorted(example)}")
  return example[image_key]
