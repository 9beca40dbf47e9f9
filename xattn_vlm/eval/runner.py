"""The few-shot evaluation harness: tasks x shots x trials, batched, sharded and resumable.

For each task, shot count and trial the queries are split over processes (query i goes to
process ``i % process_count``) and cut into fixed batches; each batch's prompts hold
``num_demonstrations(shots)`` demonstrations, chosen at random from a seeded subset of the
training split (``RandomDemonstrations``, trial t uses seed ``seed + t``) or by RICES over the
vision tower's pooled features (cached on disk; one trial, since it is deterministic), or, for
binding, the episode's own supports. Captioning, VQA and binding generate with beam search and
stop at ``<|endofchunk|>``; classification ranks the class names by length-normalised
log-probability, reusing one prefill per prompt. Every batch's predictions are appended to a
``PredictionLog`` as soon as they exist, so a crashed run, started again, skips every batch it
already logged and ends with the results an uninterrupted run gives (batches are the same fixed
slices of the same padded shapes). Scores are computed from the logs; ``results.json`` and
``results.md`` (with the published figures beside ours) are rewritten after every cell.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xattn_vlm import lock
from xattn_vlm.data import images as images_lib
from xattn_vlm.eval import demos as demos_lib
from xattn_vlm.data import fewshot
from xattn_vlm.eval import features as features_lib
from xattn_vlm.eval import results as results_lib
from xattn_vlm.eval import tasks as tasks_lib
from xattn_vlm.inference import GenerationConfig, Processor
from xattn_vlm.inference import decoding
from xattn_vlm.inference import scoring
from xattn_vlm.inference.model import StaticGraph, as_inference_model

_log = logging.getLogger(__name__)

DEMONSTRATIONS = ("random", "rices")
# Padded prompt lengths of length-grouped batches: powers of two and 1.5 times them, so a batch
# carries at most a third of padding and an evaluation compiles a handful of shapes.
BUCKETS = tuple(sorted({m * 2**k for k in range(4, 16) for m in (2, 3)}))
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
PREDICTIONS = "predictions"


def default_config() -> ml_collections.ConfigDict:
  """Every setting of an evaluation, with OpenFlamingo's protocol as the default.

  tasks: comma-separated task names (``tasks.TASKS``).
  shots: the shot counts; 0 shots means 2 text-only demonstrations.
  trials: random-demonstration trials (seeds ``seed``, ``seed + 1``, ...); reported as mean/std.
  demonstrations: ``random`` (a seeded subset of ``pool_subset`` training examples per trial) or
    ``rices`` (most similar training images by the vision tower's pooled features, most similar
    last; features cached in ``rices_cache_dir``, default ``<output>/rices``).
  num_queries: evaluate the first N test records of each benchmark (0: all).
  batch_size: prompts per batch (rounded up to a multiple of the local devices, which split it).
  num_beams, length_penalty: beam search; max_new_tokens is the task's (20 captions, 5 VQA).
  candidate_batch_size: class names scored together per prefill (0: all at once).
  one_shape_per_task: pad every cell of a task to the task's longest prompt and most images, so
    each task compiles one program (worth it when compiling costs more than the padding, as for
    small models on CPU); otherwise each cell gets its own shape.
  group_by_length: batch each cell's prompts in order of length and pad each batch to the
    smallest of a few fixed lengths (``BUCKETS``) that holds it: little padding, and a handful of
    compiled programs for the whole evaluation. Off: every batch of a cell (of a task, with
    ``one_shape_per_task``) is padded to its longest prompt.
  reuse_vision_features: run the vision tower once per image of the evaluation and reuse its
    features in every prompt that shows the image (``eval.features``), kept on disk in
    ``vision_cache_dir`` (default ``<output>/vision_features``) for later evaluations of the same
    tower.
  data_root, data: where the official benchmark files are (``tasks.default_data_config``).
  shapes: the shapes-world tasks: test queries, training pool size, world seed, binding ways.
  """
  return ml_collections.ConfigDict(dict(
      tasks="shapes_captioning,shapes_vqa,shapes_binding",
      shots=(0, 4, 8, 16, 32),
      trials=3,
      demonstrations="random",
      pool_subset=2048,
      num_queries=0,
      batch_size=16,
      num_beams=3,
      length_penalty=0.0,
      candidate_batch_size=0,
      one_shape_per_task=False,
      group_by_length=True,
      reuse_vision_features=True,
      vision_cache_dir="",
      seed=0,
      rices_cache_dir="",
      data_root="",
      data=tasks_lib.default_data_config(),
      shapes=dict(num_queries=500, pool_size=2048, seed=0, binding_ways=2),
  ))


def task_names(config: ml_collections.ConfigDict) -> list[str]:
  names = [name.strip() for name in config.tasks.split(",") if name.strip()]
  if not names:
    raise ValueError(f"config.tasks: expected comma-separated task names, got {config.tasks!r}")
  for name in names:
    tasks_lib.get_task(name)
  return names


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises on settings that cannot work, naming the setting, before any model work."""
  task_names(config)
  if config.demonstrations not in DEMONSTRATIONS:
    raise ValueError(f"config.demonstrations: expected one of {DEMONSTRATIONS}, got "
                     f"{config.demonstrations!r}")
  if not config.shots or any(int(s) < 0 for s in config.shots):
    raise ValueError(f"config.shots: expected shot counts >= 0, got {config.shots}")
  for name in ("trials", "batch_size", "num_beams", "pool_subset"):
    if config[name] < 1:
      raise ValueError(f"config.{name}: expected >= 1, got {config[name]}")


@dataclasses.dataclass(frozen=True)
class Cell:
  """One (task, shots, trial) of the evaluation: the unit that is logged and scored."""
  task: tasks_lib.Task
  shots: int
  trial: int

  @property
  def name(self) -> str:
    return f"{self.task.name} {self.shots}-shot trial {self.trial}"

  def log_path(self, output_dir: pathlib.Path, process: int, processes: int) -> pathlib.Path:
    suffix = f".process{process}" if processes > 1 else ""
    return (output_dir / PREDICTIONS / self.task.name
            / f"{self.shots}shot_trial{self.trial}{suffix}.jsonl")


class _Placement:
  """Where arrays go: the model's parameters replicated over this process's devices, batches
  split over them along the batch axis."""

  def __init__(self):
    devices = jax.local_devices()
    self.mesh = Mesh(np.array(devices), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.split = NamedSharding(self.mesh, P("data"))

  @property
  def num_devices(self) -> int:
    return self.mesh.size

  def batch(self, batch):
    return dataclasses.replace(batch, **{
        field.name: jax.device_put(getattr(batch, field.name), self.split)
        for field in dataclasses.fields(batch)})


@functools.partial(jax.jit, static_argnames=("graph",))
def _pooled_vision_features(graph: StaticGraph, params: nnx.State, pixels: jax.Array) -> jax.Array:
  """[N, H, W, C] pixels -> [N, D]: the vision tower's patch features, averaged (RICES)."""
  return jnp.mean(graph.merge(params).vision(pixels), axis=1)


class Evaluator:
  """Runs the cells of one evaluation config for one model, writing into ``output_dir``.

  Args:
    model: a Flamingo model or ``InferenceModel``; its parameters are replicated over the local
      devices.
    processor: the model's ``Processor``.
    config: ``default_config()`` with overrides.
    output_dir: predictions, RICES features and results go here.
    datasets: task name -> ``TaskData`` to use instead of ``tasks.load_data`` (tests, callers that
      already hold the records).
    model_name: the name of our rows in the Markdown table.
  """

  def __init__(self, model, processor: Processor, config: ml_collections.ConfigDict,
               output_dir: str | os.PathLike, *,
               datasets: Mapping[str, tasks_lib.TaskData] | None = None,
               model_name: str = "ours"):
    check_config(config)
    self.config = config
    self.processor = processor
    self.output_dir = pathlib.Path(output_dir)
    self.model_name = model_name
    self.placement = _Placement()
    model = as_inference_model(model)
    decoding.check_tokenizer(model, processor)
    self.model = copy.copy(model)  # the caller's model keeps its own placement
    self.model.params = jax.device_put(model.params, self.placement.replicated)
    self.datasets = dict(datasets or {})
    self._queries: dict[str, list] = {}
    self._prompts: dict[Cell, list] = {}
    self._shapes: dict[Any, tuple[int, int]] = {}
    self._token_counts: dict[str, int] = {}
    self.process, self.processes = jax.process_index(), jax.process_count()
    per_device = math.ceil(config.batch_size / self.placement.num_devices)
    self.batch_size = per_device * self.placement.num_devices

  @functools.cached_property
  def vision_features(self) -> features_lib.VisionFeatureCache | None:
    """The evaluation's cache of tower features (None without ``reuse_vision_features``)."""
    if not self.config.reuse_vision_features:
      return None
    directory = pathlib.Path(self.config.vision_cache_dir or self.output_dir / "vision_features")
    if self.processes > 1:
      directory = directory / f"process{self.process}"
    return features_lib.VisionFeatureCache(self.model, self.processor, directory,
                                           batch_size=self.batch_size)

  # -- data and demonstrations -----------------------------------------------------------------

  def data(self, name: str) -> tasks_lib.TaskData:
    if name not in self.datasets:
      self.datasets[name] = tasks_lib.load_data(name, self.config, self.processor.image_size)
    return self.datasets[name]

  def num_queries(self, name: str) -> int:
    """How many test records of the task are evaluated (the first ``num_queries`` of a
    benchmark; the shapes tasks set theirs in ``config.shapes``)."""
    count = len(self.data(name).queries)
    if self.config.num_queries and name not in tasks_lib.SHAPES_TASKS:
      count = min(count, self.config.num_queries)
    return count

  def queries(self, name: str) -> list[Mapping[str, Any]]:
    """This process's share of the evaluated queries: every ``process_count``-th from its index."""
    if name not in self._queries:
      records = self.data(name).queries
      self._queries[name] = [records[i] for i in range(self.process, self.num_queries(name),
                                                       self.processes)]
    return self._queries[name]

  def _rices(self, name: str, queries: Sequence[Mapping[str, Any]]) -> dict:
    """Every query's RICES demonstration ids for the largest shot count, most similar last."""
    data = self.data(name)
    k = max(fewshot.num_demonstrations(int(s)) for s in self.config.shots)
    features = functools.partial(
        demos_lib.cached_features, feature_fn=self._image_features, batch_size=self.batch_size,
        cache_dir=self.config.rices_cache_dir or self.output_dir / "rices")
    tower = self._vision_fingerprint
    pool = features([r["image"] for r in data.pool], name=f"{name}_pool_{tower}")
    ours = features([r["image"] for r in queries],
                    name=f"{name}_queries_{tower}_{self.process}of{self.processes}")
    chosen = demos_lib.RICES(data.pool_ids, pool)(ours, k, [q["id"] for q in queries])
    return {query["id"]: ids for query, ids in zip(queries, chosen)}

  @functools.cached_property
  def _vision_fingerprint(self) -> str:
    """A short hash of the tower's identity (``features.tower_identity``: parameters, config,
    preprocessing), so a RICES cache of another tower never matches; the parameters are hashed
    once per evaluation, by the feature cache when there is one."""
    identity = (self.vision_features.identity if self.vision_features is not None
                else features_lib.tower_identity(self.model, self.processor))
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]

  def _image_features(self, sources: Sequence) -> np.ndarray:
    if self.vision_features is not None:  # the tower's features, which the prompts reuse
      return self.vision_features(sources).mean(axis=1)
    p = self.processor
    pixels = np.stack([images_lib.preprocess_image(source, size=p.image_size, mean=p.image_mean,
                                                   std=p.image_std, mode=p.image_mode)
                       for source in sources])
    return np.asarray(_pooled_vision_features(self.model.graph, self.model.params, pixels))

  def prompts(self, cell: Cell) -> list[tuple[fewshot.FewShotPrompt, Any]]:
    """Each query's prompt and the reference its prediction is scored against (built once)."""
    if cell not in self._prompts:
      queries = self.queries(cell.task.name)
      rices = None
      if self.config.demonstrations == "rices" and cell.task.kind != "binding":
        rices = self._rices(cell.task.name, queries)
      self._prompts[cell] = self._build_prompts(cell, queries, rices)
    return self._prompts[cell]

  def _build_prompts(self, cell: Cell, queries: Sequence[Mapping[str, Any]],
                     rices: Mapping | None) -> list[tuple[fewshot.FewShotPrompt, Any]]:
    task, data = cell.task, self.data(cell.task.name)
    k = fewshot.num_demonstrations(cell.shots)
    if task.kind != "binding" and rices is None:
      select = demos_lib.RandomDemonstrations(
          data.pool_ids, seed=self.config.seed + cell.trial,
          subset_size=min(self.config.pool_subset, len(data.pool_ids)))
    out = []
    for query in queries:
      if task.kind == "binding":
        query, demos = data.episode(query, k, self.config.seed + cell.trial)
      else:
        ids = rices[query["id"]][-k:] if rices is not None else select(query["id"], k)
        demos = [data.pool_record(key) for key in ids]
      prompt = fewshot.build_prompt(
          task.template, task.example(query, with_answer=False),
          [task.example(demo, with_answer=True) for demo in demos], cell.shots)
      out.append((prompt, tasks_lib.reference(task, query)))
    return out

  # -- running -----------------------------------------------------------------------------------

  def cells(self) -> list[Cell]:
    trials = 1 if self.config.demonstrations == "rices" else self.config.trials
    return [Cell(tasks_lib.get_task(name), int(shots), trial)
            for name in task_names(self.config) for shots in self.config.shots
            for trial in range(trials)]

  def run(self) -> dict[str, dict[int, list[float]]]:
    """Every cell, resuming from the prediction logs; returns ``{task: {shots: [trial score]}}``
    (ImageNet adds an ``imagenet_top5`` row) and writes results.json and results.md. Holds the
    output directory's lock throughout (``xattn_vlm.lock``): a second evaluation writing there
    fails at start, naming the one that holds it."""
    with lock.hold(self.output_dir, "--output_dir"):
      return self._run()

  def _run(self) -> dict[str, dict[int, list[float]]]:
    cells = self.cells()
    total = sum(len(self.queries(cell.task.name)) for cell in cells)
    results: dict[str, dict[int, list[float]]] = {}
    with tqdm.tqdm(total=total, unit="query", disable=self.process != 0) as bar:
      for cell in cells:
        bar.set_description(cell.name)
        for key, value in self.run_cell(cell, bar).items():
          results.setdefault(key, {}).setdefault(cell.shots, []).append(value)
        self.write_results(results)
        _log.info("%s: %s", cell.name, results)
    return results

  def run_cell(self, cell: Cell, bar: tqdm.tqdm) -> dict[str, float]:
    """Predicts this process's pending queries of a cell batch by batch, logging each batch,
    then scores the cell from every process's log. A batch's prompts are prepared and its work
    dispatched before the previous batch's outputs are waited for, so the host's share of a
    batch runs while the device computes the one before; a batch is logged once its outputs
    are back."""
    queries = self.queries(cell.task.name)
    log = results_lib.PredictionLog(cell.log_path(self.output_dir, self.process, self.processes))
    pending = set(log.pending([q["id"] for q in queries]))
    bar.update(len(queries) - len(pending))
    if self.processes > 1:
      self._shape(cell)  # a collective: every process takes part, pending queries or not
    if pending:
      prompts = self.prompts(cell)
      length, num_images = self._shape(cell)
      if self.vision_features is not None:
        self.vision_features.precompute([image for prompt, _ in prompts
                                         for image in prompt.images])
      predict = self._classify if cell.task.kind == "classification" else self._generate
      in_flight = []  # (batch, a function that waits for its outputs)
      for indices in self._batches(cell, prompts):
        batch = [(queries[i], prompts[i]) for i in indices]
        if not any(query["id"] in pending for query, _ in batch):
          continue  # logged before a restart: the batches are the same fixed slices
        if self.config.group_by_length:
          length = self._bucket(cell, max(self._token_count(prompts[i][0]) for i in indices))
        in_flight.append((batch, predict(cell, [prompt for _, (prompt, _) in batch], length,
                                         num_images)))
        if len(in_flight) > 1:
          self._log(log, *in_flight.pop(0), bar)
      for batch, outputs in in_flight:
        self._log(log, batch, outputs, bar)
    self._prompts.pop(cell, None)
    if self.processes > 1:
      multihost_utils.sync_global_devices(f"evaluated {cell.name}")
    records = [record for process in range(self.processes)
               for record in results_lib.PredictionLog(
                   cell.log_path(self.output_dir, process, self.processes)).records.values()]
    if cell.task.kind == "classification":
      return tasks_lib.score_classes(cell.task, records)
    return tasks_lib.score_generations(cell.task, records)

  @staticmethod
  def _log(log: results_lib.PredictionLog, batch: Sequence, outputs: Callable[[], list[dict]],
           bar: tqdm.tqdm) -> None:
    log.write({"id": query["id"], **output, "reference": ref}
              for (query, (_, ref)), output in zip(batch, outputs()))
    bar.update(len(batch))

  def _token_count(self, prompt: fewshot.FewShotPrompt) -> int:
    if prompt.text not in self._token_counts:
      self._token_counts[prompt.text] = len(self.processor.token_ids(prompt.text))
    return self._token_counts[prompt.text]

  def _batches(self, cell: Cell, prompts: Sequence) -> list[list[int]]:
    """The cell's batches as query indices: fixed slices in query order, or with
    ``group_by_length`` in order of prompt length (ties in query order), the same on every run."""
    order = list(range(len(prompts)))
    if self.config.group_by_length:
      order.sort(key=lambda i: self._token_count(prompts[i][0]))
    return [order[start:start + self.batch_size] for start in range(0, len(order),
                                                                     self.batch_size)]

  def _bucket(self, cell: Cell, longest: int) -> int:
    """The smallest of ``BUCKETS`` that holds ``longest`` tokens and the continuation, or the
    whole context left for the prompt (``_shape`` has refused prompts longer than that)."""
    room = self.model.config.lm.max_length - self._continuation_tokens(cell)
    return min([b for b in BUCKETS if longest <= b <= room] or [room])

  def _continuation_tokens(self, cell: Cell) -> int:
    if cell.task.kind != "classification":
      return cell.task.max_new_tokens
    encode = self.processor.tokenizer.encode
    return max(len(encode(name)) for name in self.data(cell.task.name).class_names)

  def _shape(self, cell: Cell) -> tuple[int, int]:
    """The padded prompt length and image slots of a cell's batches (so one compiled program
    serves all of them): its longest prompt (over every process's queries) rounded up to a
    multiple of 16, within the model's context, and shots + 1 images; the maximum over the task's
    cells with ``one_shape_per_task``."""
    key = cell.task.name if self.config.one_shape_per_task else cell
    if key not in self._shapes:
      self._shapes[key] = self._longest_shape(cell)
    return self._shapes[key]

  def _longest_shape(self, cell: Cell) -> tuple[int, int]:
    cells = [cell]
    if self.config.one_shape_per_task:
      cells = [c for c in self.cells() if c.task == cell.task]
    longest = max((self._token_count(prompt) for c in cells for prompt, _ in self.prompts(c)),
                  default=0)
    if self.processes > 1:
      # Every process pads to the longest prompt of all of them: the shapes, and so the
      # predictions, are those of a one-process run.
      longest = int(np.max(multihost_utils.process_allgather(np.int32(longest))))
    new = self._continuation_tokens(cell)
    context = self.model.config.lm.max_length
    if longest + new > context:
      raise ValueError(
          f"{cell.name}: the longest prompt has {longest} tokens, and with {new} more tokens to "
          f"generate or score it exceeds the model's context of {context} (lm.max_length); "
          "evaluate fewer shots or use a model with a longer context")
    return min(-(-longest // 16) * 16, context - new), max(c.shots for c in cells) + 1

  def _model_inputs(self, prompts: Sequence[fewshot.FewShotPrompt]) -> tuple[list, list]:
    """Texts and image lists of a batch, padded with copies of its last prompt to the batch
    size (fixed shapes; the copies' outputs are dropped)."""
    padded = list(prompts) + [prompts[-1]] * (self.batch_size - len(prompts))
    return [p.text for p in padded], [p.images for p in padded]

  def _generate(self, cell: Cell, prompts: Sequence[fewshot.FewShotPrompt], length: int,
                num_images: int) -> Callable[[], list[dict[str, Any]]]:
    """Dispatches the batch's generation; returns the function that waits for its outputs."""
    tokenizer = self.processor.tokenizer
    texts, images = self._model_inputs(prompts)
    batch = self.processor(texts, images, pad_to_length=length, max_images=num_images,
                           vision_features=self.vision_features)
    config = GenerationConfig(
        max_new_tokens=cell.task.max_new_tokens, num_beams=self.config.num_beams,
        length_penalty=self.config.length_penalty,
        stop_token_ids=(tokenizer.eoc_token_id, tokenizer.eos_token_id),
        pad_token_id=tokenizer.pad_token_id, suppress_token_ids=(tokenizer.media_token_id,))
    dispatched = decoding.generate_tokens(self.model, self.placement.batch(batch), config)

    def outputs() -> list[dict[str, Any]]:
      out = jax.device_get(dispatched)
      texts = [tokenizer.decode(tokens[:count - int(stopped)]) for tokens, count, stopped in
               list(zip(out.tokens, out.lengths, out.stopped))[:len(prompts)]]
      return [{"output": text, "prediction": cell.task.postprocess(text)} for text in texts]
    return outputs

  def _classify(self, cell: Cell, prompts: Sequence[fewshot.FewShotPrompt], length: int,
                num_images: int) -> Callable[[], list[dict[str, Any]]]:
    """Scores the batch's class names (the host waits for them: one program per candidate
    chunk); returns a function giving the outputs."""
    texts, images = self._model_inputs(prompts)
    scores = scoring.score(self.model, self.processor, texts,
                           list(self.data(cell.task.name).class_names), images,
                           candidate_batch_size=self.config.candidate_batch_size or None,
                           pad_to_length=length, max_images=num_images,
                           vision_features=self.vision_features)
    outputs = [{"scores": [float(x) for x in row]}
               for row in scores.mean_log_probs[:len(prompts)]]
    return lambda: outputs

  def write_results(self, results: Mapping[str, Mapping[int, Sequence[float]]]) -> None:
    """results.json (per-trial scores, mean, std and the settings) and results.md."""
    if self.process != 0:
      return
    config = self.config
    metadata = {
        "model": self.model_name,
        "tasks": {name: tasks_lib.get_task(name).metric for name in task_names(config)},
        "shots": [int(s) for s in config.shots],
        "trials": 1 if config.demonstrations == "rices" else config.trials,
        "demonstrations": config.demonstrations,
        "queries": {name: self.num_queries(name) for name in task_names(config)},
        "num_beams": config.num_beams,
    }
    results_lib.write_results_json(self.output_dir / RESULTS_JSON, results, metadata)
    (self.output_dir / RESULTS_MD).write_text(
        results_lib.markdown_table(results, model_name=self.model_name))


def evaluate(model, processor: Processor, config: ml_collections.ConfigDict,
             output_dir: str | os.PathLike, **kwargs) -> dict[str, dict[int, list[float]]]:
  """Runs (or resumes) an evaluation; see ``Evaluator`` for the arguments."""
  return Evaluator(model, processor, config, output_dir, **kwargs).run()
