"""Does the trained model look at the images? An image-swap ablation on shapes-world VQA.

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

from xattn_vlm.data.sequence import IGNORE_INDEX
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
