"""grain input pipelines: per-host batches of numpy arrays, dataset mixtures, resumable iterators.

**Order.** A dataset's global stream is its source's indices, shuffled with the seed (reshuffled
every epoch, grain's ``shuffle`` + ``repeat``) and cut into global batches of ``batch_size``.
Host ``p`` of ``P`` reads rows ``[p*b, (p+1)*b)`` of each global batch (``b = batch_size / P``), so
the hosts' slices are disjoint and, concatenated in process order (what
``jax.make_array_from_process_local_data`` does), are exactly the one-host global batch. Records
are read and transformed (decode -> preprocess -> ``build_example``) in grain worker processes
(``num_workers``, 0 = in this process) with ``read_threads`` threads, which work
``prefetch_batches`` whole batches ahead of the consumer (while a training step runs); workers
hand back single examples in stream order and batching happens here, so the batches do not
depend on ``num_workers``.

**Bad records.** A record whose read or transform raises ``sources.BadRecordError``,
``images.ImageError`` or ``OSError`` becomes a ``Skipped`` marker; the iterator drops it, counts it
in ``iterator.skipped`` (reason -> count, logged) and fills the batch from the next records of the
same host's stream. Hosts thus stay in lockstep (one batch per step each) and disjoint; only
with skips does a host's batch reach past its rows of that global batch.

**Workers.** A worker process that dies (SIGKILL, the out-of-memory killer) ends ``next`` with
``DataWorkerError`` naming the dataset and the signal; the trainer then stops without saving
(its other datasets may already have moved on), and a rerun resumes from the newest checkpoint.

**Mixtures.** ``mixture_iterator`` yields, every step, ONE batch per dataset, ``{name: batch}``,
each with its own batch size (e.g. LAION twice MMC4, as OpenFlamingo), and carries each dataset's
loss weight ``lambda_m`` in ``iterator.weights``. The trainer computes ``loss_m`` per batch and
optimises ``sum_m lambda_m * loss_m``, accumulating gradients across the datasets of a step (the
Flamingo objective; round-robin over datasets was worse).

**Checkpoints.** ``BatchIterator`` and ``MixtureIterator`` are ``grain.DatasetIterator``s whose
state is a small JSON dict (elements consumed by this host, skip counts, and the arguments that
fix the stream, checked on restore), independent of ``num_workers``. Save it with the train state in one Orbax step and restore into a freshly built
iterator (same sources and arguments)::

  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)))
  manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(iterator)))

(one JSON file per process) or store ``iterator.get_state()`` yourself and ``set_state`` it. The
restored iterator yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import signal
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags
import grain
import numpy as np

from xattn_vlm.data import images
from xattn_vlm.data import sequence
from xattn_vlm.data import sources
from xattn_vlm.data import tokenizer as tokenizer_lib

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]
Transform = Callable[[dict[str, Any]], Example]

# Errors that mean "this record is bad", not "the code is wrong": skipped and counted.
SKIPPED_ERRORS = (sources.BadRecordError, images.ImageError, OSError)


class DataWorkerError(ChildProcessError):
  """A grain worker process died (killed, or out of memory): the run cannot go on without the
  records it held, and the message names the dataset and how the worker ended."""


def _worker_died(name: str, error: RuntimeError) -> DataWorkerError:
  code = re.search(r"exit code (-?\d+)", str(error))
  how = f"exit code {code.group(1)}" if code else "no exit code"
  if code and int(code.group(1)) < 0:
    how += f", {signal.Signals(-int(code.group(1))).name}"
  return DataWorkerError(
      f"dataset {name!r}: a data worker process (config.data.num_workers) died ({how}; SIGKILL "
      "is often the kernel's out-of-memory killer). The checkpoints are intact: rerun the same "
      "command to resume from the newest")


@dataclasses.dataclass(frozen=True)
class Skipped:
  """Stands in the element stream for a record that failed to read or transform."""
  reason: str
  detail: str


def _reason(error: Exception) -> str:
  if isinstance(error, sources.BadRecordError):
    return error.reason
  if isinstance(error, images.ImageError):
    return "corrupt image"
  if isinstance(error, FileNotFoundError):
    return "missing file"
  return "unreadable file"


def require_text(chunks: Sequence[Any], record_id: Any) -> None:
  """Raises ``BadRecordError`` unless the document has text and its text is free of the layout's
  special-token strings (a web caption containing "<image>" would otherwise shift the images).
  The text before the first image may hold ``<|endofchunk|>`` (text-only demonstrations, as a
  0-shot prompt has them): it shifts no image and is never supervised."""
  texts = [c for c in chunks if isinstance(c, str)]
  if not any(t.strip() for t in texts):
    raise sources.BadRecordError(f"record {record_id!r} has no text", reason="missing text")
  first_image = next((i for i, c in enumerate(chunks) if not isinstance(c, str)), len(chunks))
  for token in tokenizer_lib.ADDED_TOKENS:
    checked = [c for i, c in enumerate(chunks) if isinstance(c, str)
               and (i > first_image or token != tokenizer_lib.EOC_TOKEN)]
    if any(token in t for t in checked):
      raise sources.BadRecordError(f"record {record_id!r}: its text contains {token!r}",
                                   reason="special token in text")


class ExampleTransform:
  """A training record (``{"id", "chunks"}``, see ``sources``) -> one model example.

  Decodes each ``ImageRef``, preprocesses it to ``[image_size, image_size, 3]`` (``mode`` "pad"
  keeps the aspect ratio as Flamingo, "crop" centre-crops), and calls ``sequence.build_example``
  (token ids, labels, attention mask, ``images`` [max_images, 1, S, S, 3], ``media_mask``) with
  its ``supervise`` rule. A record failing ``require_text`` raises ``BadRecordError`` so the
  pipeline skips it.
  """

  def __init__(self, tokenizer, *, max_tokens: int, max_images: int, image_size: int,
               mean: Sequence[float], std: Sequence[float], mode: str = "pad",
               supervise: str = "all", media_tokens: int = 1):
    self.tokenizer = tokenizer
    self.media_tokens = media_tokens
    self.max_tokens = max_tokens
    self.max_images = max_images
    self.supervise = supervise
    self.image_size = image_size
    self.mean, self.std, self.mode = tuple(mean), tuple(std), mode

  def preprocess(self, image: sources.ImageRef) -> np.ndarray:
    """One image as the tower's input, float32 [image_size, image_size, 3]."""
    return images.preprocess_image(image.load(), size=self.image_size, mean=self.mean,
                                   std=self.std, mode=self.mode)

  def __call__(self, record: dict[str, Any]) -> Example:
    chunks = []
    for chunk in record["chunks"]:
      if isinstance(chunk, str):
        chunks.append(chunk)
      elif isinstance(chunk, sources.ImageRef):
        chunks.append(self.preprocess(chunk))
      else:
        raise TypeError(f"record {record.get('id')!r}: chunks must be str or ImageRef, got "
                        f"{type(chunk).__name__}")
    require_text(chunks, record.get("id"))
    return sequence.build_example(chunks, self.tokenizer, max_tokens=self.max_tokens,
                                  max_images=self.max_images,
                                  image_shape=(1, self.image_size, self.image_size, 3),
                                  supervise=self.supervise, media_tokens=self.media_tokens)


class TextTransform:
  """A text record (``{"id", "text"}``) -> ``sequence.build_text_example``: every real token
  supervised, for language-model data. A record failing ``require_text`` raises
  ``BadRecordError`` so the pipeline skips it."""

  def __init__(self, tokenizer, *, max_tokens: int):
    self.tokenizer = tokenizer
    self.max_tokens = max_tokens

  def __call__(self, record: dict[str, Any]) -> Example:
    require_text([record["text"]], record.get("id"))
    return sequence.build_text_example(record["text"], self.tokenizer, max_tokens=self.max_tokens)


class _ReadAndTransform:
  """Index -> example or ``Skipped``; runs in the workers (so it must pickle)."""

  def __init__(self, source: Sequence[dict[str, Any]], transform: Transform):
    self._source = source
    self._transform = transform

  def __call__(self, index: int) -> Example | Skipped:
    try:
      return self._transform(self._source[index])
    except SKIPPED_ERRORS as e:
      return Skipped(reason=_reason(e), detail=f"record {index}: {type(e).__name__}: {e}")


class _HostRows(grain.MapDataset):
  """Host ``p``'s rows of each global batch: element ``j`` is row ``p*b + j % b`` of global batch
  ``j // b``. A trailing partial global batch is dropped so every host has the same length."""

  def __init__(self, parent: grain.MapDataset, *, global_batch: int, process_index: int,
               process_count: int):
    super().__init__(parent)
    self._global_batch = global_batch
    self._local_batch = global_batch // process_count
    self._first_row = process_index * self._local_batch

  def __len__(self) -> int:
    return len(self._parent) // self._global_batch * self._local_batch

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._local_batch)
    return self._parent[step * self._global_batch + self._first_row + row]

  def __str__(self) -> str:
    return f"_HostRows(global_batch={self._global_batch}, first_row={self._first_row})"


def _process_index_and_count(process_index: int | None,
                             process_count: int | None) -> tuple[int, int]:
  """The given host slice, or jax's. jax is imported only here: workers never need it."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index: expected 0 <= process_index < process_count="
                     f"{process_count}, got {process_index}")
  return process_index, process_count


class BatchIterator(grain.DatasetIterator):
  """This host's batches of one dataset: ``{key: array [local_batch, ...]}`` per ``next``.

  ``skipped`` counts the records dropped so far (reason -> count); ``get_state`` /
  ``set_state`` (and so ``grain.checkpoint.CheckpointSave/Restore``) capture the position and
  the counts, plus ``order`` (what fixes the element stream: seed, sizes, host slice), so a
  state is never applied to a pipeline whose stream differs. Built by ``batch_iterator``.
  """

  def __init__(self, elements: grain.MapDataset, *, local_batch: int, name: str,
               order: dict[str, Any], read_options: grain.ReadOptions, num_workers: int):
    super().__init__()
    self.name = name
    self.local_batch = local_batch
    self.order = order
    self.skipped: collections.Counter = collections.Counter()
    self._elements = elements
    self._read_options = read_options
    self._num_workers = num_workers
    self._next_index = 0
    self._iterator = self._start(0)

  def _start(self, index: int) -> grain.DatasetIterator:
    """A grain iterator over this host's elements from ``index`` on (workers start lazily)."""
    if self._num_workers and not flags.FLAGS.is_parsed():
      # grain 0.2.18 reads an absl flag when it starts workers, which fails in programs that
      # never parse absl flags (google/grain#1355, fixed after 0.2.18): use the defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = self._elements[index:].to_iter_dataset(self._read_options)
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
    return iter(dataset)

  def __next__(self) -> Batch:
    self._assert_not_closed()
    examples = []
    while len(examples) < self.local_batch:
      try:
        element = next(self._iterator)
      except RuntimeError as error:  # grain's report of a worker that is gone
        if "terminated unexpectedly" not in str(error):
          raise
        raise _worker_died(self.name, error) from error
      self._next_index += 1
      if isinstance(element, Skipped):
        sources.skip(self.skipped, self.name, element.reason, element.detail)
      else:
        examples.append(element)
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}

  def get_state(self) -> dict[str, Any]:
    return {"next_index": self._next_index, "skipped": dict(self.skipped), "order": self.order}

  def set_state(self, state: dict[str, Any]) -> None:
    if state["order"] != self.order:
      raise ValueError(f"state: saved by the pipeline {state['order']}, which reads a different "
                       f"stream than this one, {self.order} ({self.name})")
    self._iterator.close()
    self._next_index = int(state["next_index"])
    self.skipped = collections.Counter(state["skipped"])
    self._iterator = self._start(self._next_index)

  def start_prefetch(self) -> None:
    self._iterator.start_prefetch()

  def close(self) -> None:
    if not self._closed:
      self._iterator.close()
    super().close()

  def __str__(self) -> str:
    return f"BatchIterator({self.name}, local_batch={self.local_batch})"


def batch_iterator(source: Sequence[dict[str, Any]], transform: Transform, *, batch_size: int,
                   seed: int, shuffle: bool = True, num_epochs: int | None = None,
                   process_index: int | None = None, process_count: int | None = None,
                   num_workers: int = 0, read_threads: int = 1, prefetch_batches: int = 2,
                   name: str | None = None) -> BatchIterator:
  """This host's batches of ``transform(source[i])``; see the module docstring for the order.

  Args:
    source: random-access records (``__len__`` + ``__getitem__``), e.g. a ``sources`` class.
    transform: record -> example dict of numpy arrays (e.g. ``ExampleTransform``); must pickle
      when ``num_workers > 0``.
    batch_size: the GLOBAL batch size, divisible by ``process_count``.
    seed: shuffling seed; the same seed gives the same batches.
    shuffle: shuffle (per epoch) or read in source order.
    num_epochs: passes over the source; None repeats forever (the training default, which
      keeps hosts in lockstep even when records are skipped).
    process_index, process_count: this host's slice; default ``jax.process_index()`` /
      ``jax.process_count()``.
    num_workers: grain worker processes reading and transforming records; 0 = this process.
    read_threads: threads per process reading and transforming records.
    prefetch_batches: batches read and transformed ahead of ``next`` per process, in
      ``read_threads`` threads (as ``prefetch_batches`` times the local batch of examples): the
      next batches are made while the caller computes, even when its computation holds the
      thread that calls ``next`` (synchronous dispatch, ``host.reuse_freed_memory``).
    name: for logs and skip counts; defaults to the source's ``name``.
  """
  process_index, process_count = _process_index_and_count(process_index, process_count)
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f"batch_size: expected a positive multiple of process_count="
                     f"{process_count}, got {batch_size}")
  if prefetch_batches < 0:
    raise ValueError(f"prefetch_batches: expected >= 0, got {prefetch_batches}")
  if len(source) == 0:  # pylint: disable=g-explicit-length-test
    raise ValueError(f"source: expected at least one record, got an empty {source!r}")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed}")
  indices = grain.MapDataset.range(len(source))
  if shuffle:
    indices = indices.shuffle(seed=seed)
  indices = indices.repeat(num_epochs)
  elements = _HostRows(indices, global_batch=batch_size, process_index=process_index,
                       process_count=process_count).map(_ReadAndTransform(source, transform))
  order = {"records": len(source), "batch_size": batch_size, "seed": seed if shuffle else None,
           "num_epochs": num_epochs, "process_index": process_index,
           "process_count": process_count}
  local_batch = batch_size // process_count
  return BatchIterator(elements, local_batch=local_batch,
                       name=name or getattr(source, "name", type(source).__name__), order=order,
                       read_options=grain.ReadOptions(
                           num_threads=read_threads,
                           prefetch_buffer_size=prefetch_batches * local_batch),
                       num_workers=num_workers)


@dataclasses.dataclass(frozen=True)
class Component:
  """One dataset of a mixture: its records, their transform, its GLOBAL per-step batch size and
  its weight ``lambda_m`` in the objective ``sum_m lambda_m * loss_m``."""
  source: Sequence[dict[str, Any]]
  transform: Transform
  batch_size: int
  weight: float


class MixtureIterator(grain.DatasetIterator):
  """One batch per dataset per step: ``next`` returns ``{name: batch}`` for every component.

  ``weights`` maps names to ``lambda_m``; ``skipped`` maps names to their skip counters. The
  state is the components' states by name. Built by ``mixture_iterator``.
  """

  def __init__(self, iterators: Mapping[str, BatchIterator], weights: Mapping[str, float]):
    super().__init__()
    self.iterators = dict(iterators)
    self.weights = dict(weights)

  @property
  def skipped(self) -> dict[str, collections.Counter]:
    return {name: it.skipped for name, it in self.iterators.items()}

  def __next__(self) -> dict[str, Batch]:
    self._assert_not_closed()
    return {name: next(it) for name, it in self.iterators.items()}

  def get_state(self) -> dict[str, Any]:
    return {name: it.get_state() for name, it in self.iterators.items()}

  def set_state(self, state: dict[str, Any]) -> None:
    if set(state) != set(self.iterators):
      raise ValueError(f"state: expected the datasets {sorted(self.iterators)}, got "
                       f"{sorted(state)}")
    for name, it in self.iterators.items():
      it.set_state(state[name])

  def start_prefetch(self) -> None:
    for it in self.iterators.values():
      it.start_prefetch()

  def close(self) -> None:
    if not self._closed:
      for it in self.iterators.values():
        it.close()
    super().close()

  def __str__(self) -> str:
    return f"MixtureIterator({self.weights})"


def component_seed(seed: int, name: str) -> int:
  """The shuffling seed of one mixture component: the mixture seed mixed with the name, so adding
  or removing a dataset does not change the others' order."""
  return zlib.crc32(name.encode(), seed % 2**32)


def mixture_iterator(components: Mapping[str, Component], *, seed: int,
                     **kwargs) -> MixtureIterator:
  """A ``MixtureIterator`` over ``components`` (name -> ``Component``).

  Each component gets its own ``batch_iterator`` (its own workers when ``num_workers > 0``) with
  ``component_seed(seed, name)``; ``kwargs`` (``shuffle``, ``num_epochs``, ``process_index``,
  ``process_count``, ``num_workers``, ``read_threads``, ``prefetch_batches``) apply to every
  component.
  """
  if not components:
    raise ValueError("components: expected at least one dataset, got none")
  for name, component in components.items():
    if not component.weight > 0:
      raise ValueError(f"components[{name!r}].weight: expected > 0, got {component.weight}")
  iterators = {
      name: batch_iterator(c.source, c.transform, batch_size=c.batch_size,
                           seed=component_seed(seed, name), name=name, **kwargs)
      for name, c in components.items()}
  return MixtureIterator(iterators, {name: c.weight for name, c in components.items()})
