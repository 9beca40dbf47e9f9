"""The optimizer: linear warmup then constant (the Flamingo default) or cosine; AdamW with weight
decay only on parameters whose path matches ``decay_pattern`` (the gated blocks, as OpenFlamingo);
global-norm clipping. Built for the trainable parameters only, so no state exists for frozen ones.
"""

from __future__ import annotations

import re

import jax
import ml_collections
import optax

from xattn_vlm.train.sharding import path_name

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over ``warmup_steps``, then constant or cosine decay to
  ``end_learning_rate_fraction * learning_rate`` at ``total_steps``."""
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule: expected one of {SCHEDULES}, got "
                     f"{cfg.schedule!r}")
  if not 0 <= cfg.warmup_steps <= total_steps:
    raise ValueError(f"config.optimizer.warmup_steps: expected 0..total_steps={total_steps}, got "
                     f"{cfg.warmup_steps}")
  peak = cfg.learning_rate
  if cfg.schedule == "constant":
    after = optax.constant_schedule(peak)
  else:
    after = optax.cosine_decay_schedule(peak, max(total_steps - cfg.warmup_steps, 1),
                                        alpha=cfg.end_learning_rate_fraction)
  if cfg.warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, cfg.warmup_steps)
  return optax.join_schedules([warmup, after], [cfg.warmup_steps])


def decay_mask(pattern: str):
  """A mask function: True for parameters whose path ('gated_blocks/0/ffw/up/kernel') matches."""
  regex = re.compile(pattern)

  def mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.search(path_name(path))),
                                            params)
  return mask


def create_optimizer(cfg: ml_collections.ConfigDict,
                     total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The gradient transformation and its learning-rate schedule (for logging)."""
  if cfg.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name: expected one of {OPTIMIZERS}, got {cfg.name!r}")
  schedule = learning_rate_schedule(cfg, total_steps)
  if cfg.name == "sgd":
    tx = optax.sgd(schedule)
  else:
    tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask(cfg.decay_pattern))
  if cfg.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), tx)
  return tx, schedule
