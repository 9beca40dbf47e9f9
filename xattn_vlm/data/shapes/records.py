"""The shapes world as record sources for the data pipeline: its image-text generators
(``ShapesWorld``) and its text-only stream (``ShapesText``, what the LM is pretrained on)."""

from __future__ import annotations

from typing import Any

from xattn_vlm.data.shapes import world
from xattn_vlm.data.sources import ImageRef, RecordSource


class ShapesWorld(RecordSource):
  """Training records from the synthetic shapes world (``data.shapes.world``): ``num_records``
  items of one generator, rendered on read (in the pipeline's workers).

  ``kind``: ``caption`` and ``pair`` give ``[image, caption]``, ``vqa`` gives ``[image,
  "Question:... Short answer:", answer]`` (the answer its own chunk, so a dataset can supervise it
  alone: ``sequence.build_example``'s ``supervise``), ``interleaved`` and ``binding`` give their
  documents.
  ``generator_kwargs`` go to the generator (e.g. ``image_size``, ``max_images``, ``num_shots``).
  """

  KINDS = ("caption", "pair", "vqa", "interleaved", "binding")

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
    item = world.GENERATORS[self._kind](self._split, self._seed, entry, **self._kwargs)
    if self._kind in ("caption", "pair"):
      chunks = [item["image"], item["caption" if self._kind == "caption" else "text"]]
    elif self._kind == "vqa":
      chunks = [item["image"], world.QA_FORMAT.format(question=item["question"], answer=""),
                item["answer"]]
    else:
      chunks = item["chunks"]
    key = f"shapes/{self._kind}/{self._split}/{self._seed}/{entry}"
    return {"id": key,
            "chunks": [c if isinstance(c, str) else ImageRef(key=f"{key}/{i}", array=c)
                       for i, c in enumerate(chunks)]}


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
