"""Does the trained model look at the images? An image-swap ablation on shapes-world VQA; and
what binding could reach: the same episodes in words, without images.

Few-shot accuracy alone cannot tell a model that reads its images from one that has learnt the
answers' prior per question type. ``image_reliance`` scores the answer of held-out VQA questions
(validation split) twice, teacher-forced: with each question's own image, and with the image of
another question of the batch (the batch's images rolled by one). A model that uses its images
does better with its own; a blind one scores the same, to the last digit when its gates are 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from xattn_vlm.data import fewshot
from xattn_vlm.data.sequence import IGNORE_INDEX
from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.eval import tasks as tasks_lib
from xattn_vlm.inference import Processor, generate
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.train import input_pipeline
from xattn_vlm.train.stages import next_token_loss_sum


def answer_positions(labels: jax.Array, eoc_token_id: int) -> jax.Array:
  """bool [B, L-1] over next-token targets: the supervised target just before the closing
  ``<|endofchunk|>``, i.e. the answer of ``Question:... Short answer:{answer}<|endofchunk|>``
  (every shapes-world answer is one word and one token of the world's BPE)."""
  targets = labels[:, 1:]
  closing = targets == eoc_token_id
  return (targets != IGNORE_INDEX) & jnp.pad(closing[:, 1:], ((0, 0), (0, 1)))


def _answer_scores(model: Flamingo, batch, eoc_token_id: int):
  """Summed answer NLL (the training loss over the answers alone), answers predicted right
  (greedy, teacher-forced), number of answers."""
  labels = batch["labels"]
  is_answer = answer_positions(labels, eoc_token_id)
  answers = jnp.where(is_answer, labels[:, 1:], IGNORE_INDEX)
  logits = model(batch["images"], batch["input_ids"], batch["attention_mask"])
  nll = next_token_loss_sum(logits, jnp.concatenate([labels[:, :1], answers], axis=1))
  right = is_answer & (jnp.argmax(logits[:, :-1], axis=-1) == answers)
  return nll, jnp.sum(right), jnp.sum(is_answer)


def image_reliance(config: ml_collections.ConfigDict, model: Flamingo, *,
                   num_batches: int = 4) -> dict[str, float]:
  """Answer NLL (nats) and teacher-forced answer accuracy (%) of ``model`` on ``num_batches``
  batches of validation VQA questions, with their own images (``own_*``) and with another
  question's image (``swapped_*``). ``config`` is the Flamingo stage's; its ``vqa`` dataset sets
  the batch."""
  if "vqa" not in config.data.datasets:
    raise ValueError("config.data.datasets: image_reliance reads the 'vqa' dataset, got "
                     f"{sorted(config.data.datasets)}")
  cfg = ml_collections.ConfigDict(config.to_dict())
  vqa = ml_collections.ConfigDict(config.data.datasets.vqa.to_dict())
  vqa.split = "validation"
  vqa.weight = 1.0
  cfg.data.datasets = ml_collections.ConfigDict({"vqa": vqa})
  cfg.data.feature_cache = ""
  tokenizer = input_pipeline.tokenizer_for(cfg)
  scores = nnx.jit(_answer_scores, static_argnums=2)
  totals = {"own": np.zeros(3), "swapped": np.zeros(3)}
  iterator = input_pipeline.create_iterator(cfg)
  try:
    for _ in range(num_batches):
      batch = {k: jnp.asarray(v) for k, v in next(iterator)["vqa"].items()}
      swapped = dict(batch, images=jnp.roll(batch["images"], 1, axis=0))
      for name, b in (("own", batch), ("swapped", swapped)):
        totals[name] += np.asarray([float(x) for x in scores(model, b, tokenizer.eoc_token_id)])
  finally:
    iterator.close()
  out = {"questions": int(totals["own"][2])}
  for name, (nll, right, count) in totals.items():
    out[f"{name}_nll"] = nll / count
    out[f"{name}_accuracy"] = 100 * right / count
  return out


def binding_text_prompt(episode: dict, shots: int) -> tuple[str, str]:
  """A binding episode's few-shot prompt (the evaluation's, ``fewshot.build_prompt``) with each
  image replaced by its object in words ("A large red striped star."), and the answer."""
  names = dict(zip(episode["shapes"], episode["names"]))
  scenes = episode["scenes"]
  words = [shapes_world.object_description(scene.objects[0]) + " " for scene in scenes]
  demos = [{"image": word, "name": names[scene.objects[0].shape]}
           for word, scene in zip(words[:-1], scenes[:-1])]
  prompt = fewshot.build_prompt("shapes_binding", {"image": words[-1]}, demos, shots)
  pieces = prompt.text.split(fewshot.IMAGE_TOKEN)
  text = pieces[0] + "".join(word + piece for word, piece in zip(prompt.images, pieces[1:]))
  return text, episode["answer"]


def binding_text_ceiling(eval_config: ml_collections.ConfigDict, model: Flamingo,
                         processor: Processor) -> dict[int, list[float]]:
  """In-context binding accuracy (%) per shot count and trial with every image replaced by its
  description in words, on the evaluation's own episodes (test split, trial t drawn with seed
  ``seed + t``): what the frozen LM can do from its context alone, the ceiling the image version
  is measured against. No image is given, so the gated blocks add nothing."""
  shapes = eval_config.shapes
  task = tasks_lib.TASKS["shapes_binding"]
  results: dict[int, list[float]] = {}
  for shots in sorted(int(s) for s in eval_config.shots):
    results[shots] = []
    for trial in range(eval_config.trials):
      episodes = [shapes_world.binding_episode(
          "test", eval_config.seed + trial, index,
          num_shots=fewshot.num_demonstrations(shots), num_ways=shapes.binding_ways,
          image_size=8) for index in range(shapes.num_queries)]
      prompts = [binding_text_prompt(e, shots) for e in episodes]
      right = 0
      for start in range(0, len(prompts), eval_config.batch_size):
        chunk = prompts[start:start + eval_config.batch_size]
        out = generate(model, processor, [p for p, _ in chunk], [[] for _ in chunk],
                       max_new_tokens=task.max_new_tokens, num_beams=eval_config.num_beams,
                       length_penalty=eval_config.length_penalty)
        right += sum(task.postprocess(text) == answer for text, (_, answer) in
                     zip(out.text, chunk))
      results[shots].append(100 * right / len(prompts))
  return results
