"""Checkpoints of a run as Orbax writes them, and reading a model back from them.

``<workdir>/checkpoints/<step>/`` holds three items: ``state`` (the trainer's ``TrainState``:
step, parameters, optimizer state, skip counters), ``data`` (each process's iterator position)
and ``config`` (JSON). The trainer writes them (``train.checkpoint.Checkpointer``); this module
reads them for whoever needs a model without training it: the next stage, evaluation, prompting.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from xattn_vlm.models.flamingo import Flamingo

_log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"

# Per stage, the config fields that decide the shapes and meaning of the saved parameters
# (compute dtype and rematerialisation do not).
MODEL_FIELDS = {
    "lm_pretrain": ("model.lm", "model.param_dtype"),
    "vision_pretrain": ("model.vision", "model.param_dtype", "contrastive"),
    "flamingo": ("model.lm", "model.vision", "model.resampler", "model.xattn",
                 "model.added_tokens", "model.param_dtype", "model.scan_layers"),
}
# Fields added after checkpoints were written without them: the value those checkpoints meant.
SAVED_DEFAULTS = {"model.scan_layers": False}


def config_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as plain JSON values (tuples become lists), as it is saved."""
  return json.loads(config.to_json_best_effort())


def differences(saved: Any, current: Any, prefix: str) -> list[str]:
  """'prefix.key: saved X, now Y' for every leaf of two JSON trees that differs."""
  if isinstance(saved, dict) and isinstance(current, dict):
    keys = sorted(set(saved) | set(current))
    return [d for k in keys
            for d in differences(saved.get(k), current.get(k), f"{prefix}.{k}")]
  return [] if saved == current else [f"{prefix}: saved {saved!r}, now {current!r}"]


def get_field(tree: dict[str, Any], dotted: str) -> Any:
  """``tree["a"]["b"]`` for ``"a.b"``; None where a key is missing."""
  for key in dotted.split("."):
    tree = tree.get(key) if isinstance(tree, dict) else None
  return tree


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """'config.model.lm.num_layers: saved 2, now 4' for every field that decides the saved
  parameters and differs (the stage first)."""
  if saved.get("stage") != current["stage"]:
    return [f"config.stage: saved {saved.get('stage')!r}, now {current['stage']!r}"]
  def field(tree, name):
    value = get_field(tree, name)
    return SAVED_DEFAULTS.get(name) if value is None else value

  return [d for f in MODEL_FIELDS[current["stage"]]
          for d in differences(field(saved, f), field(current, f), f"config.{f}")]


def abstract_with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying the target shardings: what Orbax restores onto."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract, shardings)


def run_path(workdir: str) -> epath.Path:
  """``workdir`` as Orbax needs it: absolute for a local path (Orbax refuses relative ones, and
  the commands take ``--workdir=runs/...``), as given for a URL such as ``gs://bucket/run``."""
  return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


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
    changed = differences(get_field(saved, f"model.{model_key}"),
                          get_field(current, f"model.{model_key}"), f"config.model.{model_key}")
    if changed:
      raise ValueError(f"{setting}={workdir!r} holds a different {model_key}: "
                       + "; ".join(changed[:5])
                       + f". Set config.model.{model_key} to the {stage} run's.")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
          partial_restore=True)))
    except Exception as error:  # pylint: disable=broad-except
      _log.warning("%s: step %d cannot be restored (%s); trying the previous step", workdir,
                      step, error)
      errors.append(f"step {step}: {error}")
      continue
    manager.close()
    params = restored.state["params"]
    _log.info("loaded %s from %s step %d", source or "all parameters", workdir, step)
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
