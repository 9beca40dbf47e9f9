"""The shapes world as record sources for the data pipeline: its image-text generators
(``ShapesWorld``) and its text-only stream (``ShapesText``, what the LM is pretrained on)."""

from __future__ import annotations

import functools
from typing import Any

from xattn_vlm.data import fewshot
from xattn_vlm.data.shapes import world
from xattn_vlm.data.sources import ImageRef, RecordSource


class ShapesWorld(RecordSource):
  """Training records from the synthetic shapes world (``data.shapes.world``): ``num_records``
  items of one generator, rendered on read (in the pipeline's workers).

  ``kind``: ``caption`` and ``pair`` give ``[image, caption]``, ``vqa`` gives ``[image,
  "Question:... Short answer:", answer]`` (the answer its own chunk, so a dataset can supervise it
  alone: ``sequence.build_example``'s ``supervise``), ``interleaved`` and ``binding`` give their
  documents.
  ``fewshot_vqa`` and ``fewshot_caption`` give few-shot episodes in the very format of the
  evaluation's prompts (``fewshot.build_prompt``): a query (a VQA or caption item of the split)
  after ``k`` demonstrations, ``k`` uniform in ``0..max_shots`` (default 8), drawn from the first
  ``pool_size`` (default 2048) train items, text-only at 0 shots; the last chunk is the query's
  answer (caption), so ``supervise="answer"`` trains the query alone.
  ``generator_kwargs`` go to the generator (e.g. ``image_size``, ``max_images``, ``num_shots``).
  """

  KINDS = ("caption", "pair", "vqa", "interleaved", "binding", "fewshot_vqa", "fewshot_caption")

  def __init__(self, kind: str, *, num_records: int, split: str = "train", seed: int = 0,
               **generator_kwargs):
    if kind not in self.KINDS:
      raise ValueError(f"kind: expected one of {self.KINDS}, got {kind!r}")
    if num_records < 1:
      raise ValueError(f"num_records: expected >= 1, got {num_records}")
    super().__init__(f"ShapesWorld({kind}, {split}, seed={seed})")
    self._kind, self._split, self._seed = kind, split, seed
    self._kwargs = generator_kwargs
    self._entries = range(num_records)

  def _read(self, entry) -> dict[str, Any]:
    key = f"shapes/{self._kind}/{self._split}/{self._seed}/{entry}"
    if self._kind in FEWSHOT_TEMPLATES:
      chunks = fewshot_chunks(self._kind, self._split, self._seed, entry, **self._kwargs)
      return {"id": key, "chunks": [c if isinstance(c, str) else ImageRef(key=f"{key}/{i}", array=c)
                                    for i, c in enumerate(chunks)]}
    item = world.GENERATORS[self._kind](self._split, self._seed, entry, **self._kwargs)
    if self._kind in ("caption", "pair"):
      chunks = [item["image"], item["caption" if self._kind == "caption" else "text"]]
    elif self._kind == "vqa":
      chunks = [item["image"], world.QA_FORMAT.format(question=item["question"], answer=""),
                item["answer"]]
    else:
      chunks = item["chunks"]
    return {"id": key,
            "chunks": [c if isinstance(c, str) else ImageRef(key=f"{key}/{i}", array=c)
                       for i, c in enumerate(chunks)]}


# Few-shot kind -> (the world's generator, the evaluation's template, the item's template fields).
FEWSHOT_TEMPLATES = {
    "fewshot_vqa": ("vqa", "shapes_vqa", lambda item: {"question": item["question"],
                                                "answer": item["answer"]}),
    "fewshot_caption": ("caption", "shapes_captioning", lambda item: {"caption": item["caption"]}),
}


@functools.lru_cache(maxsize=8192)
def _pool_item(generator: str, seed: int, index: int, image_size: int) -> dict[str, Any]:
  # Demonstrations come from a fixed pool, so each worker renders a pool item once.
  return world.GENERATORS[generator]("train", seed, index, image_size=image_size)


def fewshot_chunks(kind: str, split: str, seed: int, index: int, *, image_size: int = 64,
                   max_shots: int = 8, pool_size: int = 2048) -> list:
  """Few-shot episode ``index`` of ``kind`` (a ``FEWSHOT_TEMPLATES`` key) as record chunks: the
  text before the first image (at 0 shots, the text-only demonstrations with their
  ``<|endofchunk|>``), then each image with the text that follows it up to its closing
  ``<|endofchunk|>`` (which the layout adds), and the query's answer as the last chunk. Tokenised
  by ``sequence.build_example``, these are the ids of ``fewshot.build_prompt``'s prompt followed
  by the answer and ``<|endofchunk|>``."""
  generator, template_name, fields = FEWSHOT_TEMPLATES[kind]
  template = fewshot.TEMPLATES[template_name]
  shots, pool_indices = world.fewshot_draw(
      split, seed, index, max_shots=max_shots, pool_size=pool_size,
      zero_shot_demonstrations=fewshot.ZERO_SHOT_TEXT_DEMONSTRATIONS)
  demos = [_pool_item(generator, seed, i, image_size) for i in pool_indices]
  query = world.GENERATORS[generator](split, seed, index, image_size=image_size)
  answer = fields(query)[template.answer_field]
  prompt = fewshot.build_prompt(
      template, {**fields(query), "image": query["image"]},
      [{**fields(d), "image": d["image"]} for d in demos], shots)
  prefix, *texts = prompt.text.split(template.image_token)
  chunks: list = [prefix] if prefix else []
  for k, (image, text) in enumerate(zip(prompt.images, texts)):
    if k < len(texts) - 1:
      text = text.removesuffix(fewshot.END_OF_CHUNK)
    chunks += [image, text]
  return chunks + [str(answer).strip()]


class ShapesText:
  """The shapes world's text-only records ``{"id", "text"}`` (random access, for grain); record
  i joins texts ``i * texts_per_record, ...`` with spaces, so the LM sees long sequences."""

  def __init__(self, *, num_records: int, split: str = "train", seed: int = 0,
               texts_per_record: int = 1):
    for name, value in (("num_records", num_records), ("texts_per_record", texts_per_record)):
      if value < 1:
        raise ValueError(f"{name}: expected >= 1, got {value}")
    self.name = f"ShapesText({split}, seed={seed})"
    self._split, self._seed, self._len = split, seed, num_records
    self._per_record = texts_per_record

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    first = int(index) * self._per_record
    text = " ".join(world.text_example(self._split, self._seed, i)["text"]
                    for i in range(first, first + self._per_record))
    return {"id": f"shapes/text/{self._split}/{self._seed}/{index}", "text": text}
