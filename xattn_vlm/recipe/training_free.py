"""The training-free rows of the fusion comparison: the pretrained towers given eyes at inference
time only (``inference.training_free``), scored on the evaluation's own shapes-world queries.

* ``magic``: captions by MAGiC decoding of the frozen LM (``lm_pretrain``) re-ranked by the
  contrastive towers (``vision_pretrain``), from ``caption_prompt`` (an opening of the world's
  captions, which the LM pretrained on), cut after their first full stop. Captioning only, at 0
  shots: MAGiC has no way to show demonstrations.
* ``socratic``: the frozen LM reads MAGiC's captions in place of the images. VQA: the query's
  caption, question and ``Short answer:`` in the LM's pretraining layout (``QA_FORMAT`` after a
  description), after the shots' demonstrations written the same way (drawn as the evaluation
  draws them; 0 shots: none). Binding: the evaluation's episodes with each support written
  "<caption> This is a <name>." and the query "<caption> What is this? It is a".

Each image is captioned once per run, whatever number of prompts shows it.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.eval import demos as demos_lib
from xattn_vlm.eval import runner
from xattn_vlm.eval import tasks as tasks_lib
from xattn_vlm.inference import Processor, training_free
from xattn_vlm.models.contrastive import DualEncoder
from xattn_vlm.models.lm import DecoderLM

MODES = ("magic", "socratic")
# What ``config.training_free`` must hold (see ``evaluate``).
SETTINGS = ("caption_prompt", "magic_weight", "magic_candidates")
# The shapes world's QA text ("<description> Question:<q> Short answer:<a>"), one space apart.
SHAPES_QA = "{context} Question:{question} Short answer:{answer}"


def first_sentence(text: str) -> str:
  """``text`` up to and including its first full stop (all of it when it has none): a caption
  of the shapes world is one sentence, and an LM that has not learnt to end there runs on."""
  head, stop, _ = text.partition(".")
  return (head + stop).strip()


def check_settings(settings: Mapping[str, Any]) -> None:
  """Raises, naming ``config.training_free``, on settings the modes cannot run with."""
  missing = [key for key in SETTINGS if key not in settings]
  if missing:
    raise ValueError(f"config.training_free: expected {SETTINGS}; missing {missing}")
  if not isinstance(settings["caption_prompt"], str) or not settings["caption_prompt"].strip():
    raise ValueError(f"config.training_free.caption_prompt: expected a non-empty text, got "
                     f"{settings['caption_prompt']!r}")
  try:
    training_free.MagicConfig(weight=settings["magic_weight"],
                              num_candidates=settings["magic_candidates"])
  except ValueError as error:
    raise ValueError(f"config.training_free (magic_weight, magic_candidates): {error}") from None


class MagicCaptioner:
  """MAGiC captions of images, each decoded once (keyed by its pixels), in batches of one shape
  (the last one padded) so that the decoding compiles once."""

  def __init__(self, lm: DecoderLM, towers: DualEncoder, processor: Processor, *,
               prompt: str, weight: float, num_candidates: int, batch_size: int,
               max_new_tokens: int = 20):
    self.lm, self.towers, self.processor = lm, towers, processor
    self.prompt, self.weight, self.num_candidates = prompt, weight, num_candidates
    self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
    self.captions: dict[str, str] = {}

  def __call__(self, images: Sequence[Any]) -> list[str]:
    keys = [hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest() for image in images]
    todo = {key: image for key, image in zip(keys, images) if key not in self.captions}
    pending = list(todo.items())
    for start in range(0, len(pending), self.batch_size):
      chunk = pending[start:start + self.batch_size]
      padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
      out = training_free.magic_generate(
          self.lm, self.towers, self.processor, [self.prompt] * len(padded),
          [image for _, image in padded], weight=self.weight,
          num_candidates=self.num_candidates, max_new_tokens=self.max_new_tokens)
      for (key, _), text in zip(chunk, out.text):
        self.captions[key] = first_sentence(f"{self.prompt}{text}")
    return [self.captions[key] for key in keys]


def _answers(lm: DecoderLM, processor: Processor, prompts: Sequence[str], task: tasks_lib.Task,
             batch_size: int) -> list[str]:
  """Greedy answers of the frozen LM, post-processed as the task's are."""
  out = []
  for start in range(0, len(prompts), batch_size):
    texts = training_free.greedy_text(lm, processor, list(prompts[start:start + batch_size]),
                                      max_new_tokens=task.max_new_tokens).text
    out += [task.postprocess(text.split("\n")[0]) for text in texts]
  return out


def _score(task: tasks_lib.Task, queries: Sequence[Mapping[str, Any]],
           predictions: Sequence[str], references: Sequence[Any]) -> float:
  records = [{"id": query["id"], "prediction": prediction, "reference": reference}
             for query, prediction, reference in zip(queries, predictions, references)]
  return tasks_lib.score_generations(task, records)[task.name]


def magic_captioning(captioner: MagicCaptioner, data: tasks_lib.TaskData) -> float:
  """CIDEr of MAGiC's captions of the captioning queries."""
  task = tasks_lib.TASKS["shapes_captioning"]
  queries = list(data.queries)
  return _score(task, queries, captioner([q["image"] for q in queries]),
                [tasks_lib.reference(task, q) for q in queries])


def socratic_vqa(lm: DecoderLM, processor: Processor, captioner: MagicCaptioner,
                 data: tasks_lib.TaskData, config: ml_collections.ConfigDict, shots: int,
                 trial: int) -> float:
  """VQA accuracy of the frozen LM reading MAGiC's captions (see the module docstring)."""
  task = tasks_lib.TASKS["shapes_vqa"]
  queries = list(data.queries)
  select = demos_lib.RandomDemonstrations(
      data.pool_ids, seed=config.seed + trial,
      subset_size=min(config.pool_subset, len(data.pool_ids)))
  demos = [[data.pool_record(key) for key in select(q["id"], shots)] for q in queries]
  contexts = captioner([d["image"] for ds in demos for d in ds] + [q["image"] for q in queries])
  contexts = iter(contexts)
  shown = [[(next(contexts), d["question"], task.answer(d)) for d in ds] for ds in demos]
  prompts = [training_free.socratic_prompt(next(contexts), q["question"], s, template=SHAPES_QA,
                                           separator=" ")
             for q, s in zip(queries, shown)]
  return _score(task, queries, _answers(lm, processor, prompts, task, config.batch_size),
                [tasks_lib.reference(task, q) for q in queries])


def socratic_binding(lm: DecoderLM, processor: Processor, captioner: MagicCaptioner,
                     config: ml_collections.ConfigDict, shots: int, trial: int) -> float:
  """Binding accuracy of the frozen LM on the evaluation's episodes written with MAGiC's
  captions (see the module docstring)."""
  task = tasks_lib.TASKS["shapes_binding"]
  episodes = [shapes_world.binding_episode(
      "test", config.seed + trial, index, num_shots=shots, num_ways=config.shapes.binding_ways,
      image_size=processor.image_size) for index in range(config.shapes.num_queries)]
  # An episode's images are its supports' in order, then the query's (``prompt_chunks``).
  captions = iter(captioner([chunk for e in episodes for chunk in e["prompt_chunks"]
                             if not isinstance(chunk, str)]))
  prompts = []
  for episode in episodes:
    names = dict(zip(episode["shapes"], episode["names"]))
    said = [shapes_world.SUPPORT_FORMAT.format(name=names[scene.objects[0].shape])
            for scene in episode["scenes"][:-1]]
    prompts.append(" ".join([f"{next(captions)} {text}" for text in said]
                            + [f"{next(captions)} {shapes_world.QUERY_PROMPT}"]))
  queries = [{"id": i} for i in range(len(episodes))]
  return _score(task, queries, _answers(lm, processor, prompts, task, config.batch_size),
                [e["answer"] for e in episodes])


def evaluate(lm: DecoderLM, towers: DualEncoder, processor: Processor,
             eval_config: ml_collections.ConfigDict, modes: Sequence[str],
             settings: ml_collections.ConfigDict) -> dict[str, dict]:
  """``{mode: {task: {shots: [score per trial]}}}`` for each of ``modes`` on the shapes tasks
  of ``eval_config``; ``settings``: ``caption_prompt``, ``magic_weight``, ``magic_candidates``."""
  captioner = MagicCaptioner(lm, towers, processor, prompt=settings.caption_prompt,
                             weight=settings.magic_weight,
                             num_candidates=settings.magic_candidates,
                             batch_size=eval_config.batch_size)
  names = runner.task_names(eval_config)
  load_data = lambda name: tasks_lib.load_data(name, eval_config, processor.image_size)
  shots = sorted(int(s) for s in eval_config.shots)
  trials = range(eval_config.trials)
  out: dict[str, dict] = {}
  if "magic" in modes and "shapes_captioning" in names:
    out["magic"] = {"shapes_captioning": {0: [magic_captioning(
        captioner, load_data("shapes_captioning"))]}}
  if "socratic" in modes:
    results = {}
    if "shapes_vqa" in names:
      data = load_data("shapes_vqa")
      results["shapes_vqa"] = {s: [socratic_vqa(lm, processor, captioner, data, eval_config, s, t)
                                   for t in trials] for s in shots}
    if "shapes_binding" in names:
      results["shapes_binding"] = {
          s: [socratic_binding(lm, processor, captioner, eval_config, s, t) for t in trials]
          for s in shots}
    out["socratic"] = results
  return {mode: out.get(mode, {}) for mode in modes}
