"""Orbax checkpoints of a run: train state, data-iterator state and config, in one step directory.

``<workdir>/checkpoints/<step>/`` holds three items: ``state`` (the ``TrainState``: step,
parameters, optimizer state, skip counters), ``data`` (each process's iterator position, grain's
handler) and ``config`` (JSON). Saves are asynchronous; the manager keeps the last ``keep`` steps
(and every ``keep_period``-th).

Restoring takes abstract targets carrying shardings, so a checkpoint written on one mesh restores
onto another. A step that fails to restore is treated as corrupt: a warning names it, it is moved
to ``<workdir>/checkpoints_corrupt/`` (never deleted) and the previous step is tried. A workdir
whose checkpoints were written for a different model fails instead, before anything is touched.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from xattn_vlm.models.flamingo import Flamingo

CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"

# Per stage, the config fields that decide the shapes and meaning of the saved parameters
# (compute dtype and rematerialisation do not).
MODEL_FIELDS = {
    "lm_pretrain": ("model.lm", "model.param_dtype"),
    "vision_pretrain": ("model.vision", "model.param_dtype", "contrastive"),
    "flamingo": ("model.lm", "model.vision", "model.resampler", "model.xattn",
                 "model.num_added_tokens", "model.param_dtype"),
}


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists), as it is saved."""
  return json.loads(config.to_json_best_effort())


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
  if isinstance(saved, dict) and isinstance(current, dict):
    keys = sorted(set(saved) | set(current))
    return [d for k in keys
            for d in _differences(saved.get(k), current.get(k), f"{prefix}.{k}")]
  return [] if saved == current else [f"{prefix}: saved {saved!r}, now {current!r}"]


def _get(tree: dict[str, Any], dotted: str) -> Any:
  for key in dotted.split("."):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'config.model.lm.num_layers: saved 2, now 4' for every field that decides the saved
  parameters and differs (the stage first)."""
  if saved.get("stage") != current["stage"]:
    return [f"config.stage: saved {saved.get('stage')!r}, now {current['stage']!r}"]
  return [d for f in MODEL_FIELDS[current["stage"]]
          for d in _differences(_get(saved, f), _get(current, f), f"config.{f}")]


def abstract_with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying the target shardings: what Orbax restores onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def run_path(workdir: str) -> epath.Path:
  """``workdir`` as Orbax needs it: absolute for a local path (Orbax refuses relative ones, and
  the commands take ``--workdir=runs/...``), as given for a URL such as ``gs://bucket/run``."""
  return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


class Checkpointer:
  """The run's CheckpointManager with corrupt-step fallback (see the module docstring)."""

  def __init__(self, workdir: str, cfg: ml_collections.ConfigDict):
    if cfg.every_steps < 1 or cfg.keep < 1:
      raise ValueError(f"config.checkpoint: every_steps and keep must be >= 1, got "
                       f"every_steps={cfg.every_steps}, keep={cfg.keep}")
    self.workdir = run_path(workdir)
    self.every_steps = cfg.every_steps
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep,
        keep_period=cfg.keep_period or None, enable_async_checkpointing=cfg.async_save,
        create=True, cleanup_tmp_directories=True)
    self.manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.workdir / CHECKPOINTS, options=self._options)

  def save(self, step: int, state, iterator, config: ml_collections.ConfigDict, *,
           force: bool = False) -> bool:
    """Starts saving ``step`` when it is a multiple of ``every_steps`` (or ``force``); returns
    whether it did."""
    if step % self.every_steps and not force:
      return False
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(iterator),
        config=ocp.args.JsonSave(config_json(config))))

  def saved_config(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config

  def check_compatible(self, config: ml_collections.ConfigDict) -> None:
    """Raises when the latest readable checkpoint's model, or its mixture's dataset names,
    differ from ``config``'s (before anything is restored, so a good checkpoint is never taken
    for a corrupt one and set aside)."""
    current = config_json(config)
    for step in reversed(self.manager.all_steps()):
      try:
        saved = self.saved_config(step)
      except Exception:  # pylint: disable=broad-except  # a corrupt step is handled in restore
        continue
      differences = model_differences(saved, current)
      if differences:
        raise ValueError(
            f"--workdir={self.workdir} holds checkpoints of a different model (step {step}): "
            + "; ".join(differences[:5])
            + ". Use a new --workdir, or the config that wrote these checkpoints.")
      saved_mixture = sorted(_get(saved, "data.datasets") or {})
      mixture = sorted(current["data"]["datasets"])
      if saved_mixture != mixture:
        raise ValueError(
            f"--workdir={self.workdir} holds checkpoints (step {step}) whose data iterator covers "
            f"the datasets {saved_mixture}; config.data.datasets now names {mixture}, and an "
            "iterator's position cannot be restored onto another mixture. Use a new --workdir, "
            "or the mixture that wrote these checkpoints.")
      return

  def restore_latest(self, target_state, iterator) -> tuple[Any, int] | None:
    """The newest restorable (state, step), with ``iterator`` set to its position; None when the
    workdir has no checkpoint. ``target_state``: ShapeDtypeStructs with shardings."""
    for step in reversed(self.manager.all_steps()):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state),
            data=grain.checkpoint.CheckpointRestore(iterator)))
      except Exception as error:  # pylint: disable=broad-except
        self._set_aside(step, error)
        continue
      return restored.state, step
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    logging.warning("checkpoint step %d in %s cannot be restored (%s: %s); moving it to %s and "
                    "falling back to the previous step", step, self.workdir / CHECKPOINTS,
                    type(error).__name__, error, self.workdir / CORRUPT)
    if jax.process_index() == 0:
      corrupt = self.workdir / CORRUPT
      corrupt.mkdir(parents=True, exist_ok=True)
      (self.workdir / CHECKPOINTS / str(step)).rename(corrupt / str(step))
    multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self.manager.close()
    self.manager = self._open()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def load_params(workdir: str, target: Any, *, source: str, stage: str, model_key: str,
                config: ml_collections.ConfigDict, setting: str) -> Any:
  """Parameters only, from the latest restorable checkpoint of another run (to start a new stage
  or to evaluate): the saved params at ``source`` ('' = all) restored onto ``target``
  (ShapeDtypeStructs with shardings). That run must be ``stage`` with the same
  ``config.model[model_key]``; ``setting`` names the config field holding ``workdir``."""
  directory = run_path(workdir) / CHECKPOINTS
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  steps = manager.all_steps()
  if not steps:
    raise ValueError(f"{setting}={workdir!r} has no checkpoints under {directory}; run the "
                     f"{stage} stage there first (or clear {setting} to start from random weights)")
  current = config_json(config)
  tree = {"params": target if not source else {source: target}}
  errors = []
  for step in reversed(steps):
    try:
      saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    except Exception as error:  # pylint: disable=broad-except
      errors.append(f"step {step}: {error}")
      continue
    if saved.get("stage") != stage:
      raise ValueError(f"{setting}={workdir!r} holds a {saved.get('stage')!r} run; expected a "
                       f"{stage!r} run")
    differences = _differences(_get(saved, f"model.{model_key}"),
                               _get(current, f"model.{model_key}"), f"config.model.{model_key}")
    if differences:
      raise ValueError(f"{setting}={workdir!r} holds a different {model_key}: "
                       + "; ".join(differences[:5])
                       + f". Set config.model.{model_key} to the {stage} run's.")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
          partial_restore=True)))
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("%s: step %d cannot be restored (%s); trying the previous step", workdir,
                      step, error)
      errors.append(f"step {step}: {error}")
      continue
    manager.close()
    params = restored.state["params"]
    logging.info("loaded %s from %s step %d", source or "all parameters", workdir, step)
    return params if not source else params[source]
  raise ValueError(f"{setting}={workdir!r}: no checkpoint could be restored: {errors}")


def latest_step(workdir: str) -> int | None:
  """The newest checkpoint step in ``workdir`` (None when it holds none)."""
  manager = ocp.CheckpointManager(run_path(workdir) / CHECKPOINTS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  manager.close()
  return step


def load_flamingo(workdir: str, setting: str = "--checkpoint") -> Flamingo:
  """The model of a flamingo-stage training run, for inference or evaluation: its config and
  parameters from the latest readable checkpoint in ``workdir``, on the first local device.
  ``setting`` names the flag or field holding ``workdir`` in errors."""
  manager = ocp.CheckpointManager(run_path(workdir) / CHECKPOINTS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"{setting}={workdir!r} holds no checkpoint: give the workdir of a "
                     "flamingo-stage training run")
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  manager.close()
  config = ml_collections.ConfigDict(saved)
  abstract = nnx.eval_shape(lambda: Flamingo(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
  # ``config`` is the run's own, so load_params' same-model check passes; it still checks the
  # stage and falls back past unreadable steps.
  params = load_params(workdir, target, source="", stage="flamingo", model_key="lm",
                       config=config, setting=setting)
  return nnx.merge(graphdef, params, rest)
