"""Checkpoints of a run as Orbax writes them, and reading a model back from them.

``<workdir>/checkpoints/<step>/`` holds three items: ``state`` (the trainer's ``TrainState``:
step, parameters, optimizer state, skip counters), ``data`` (each process's iterator position)
and ``config`` (JSON). The trainer writes them (``train.checkpoint.Checkpointer``); this module
reads them for whoever needs a model without training it: the next stage, evaluation, prompting.

A converted published model (``python -m xattn_vlm.convert``, written by ``save_flamingo``) is a
flamingo-stage workdir of one step, 0, whose ``state`` holds the parameters only and whose
``config`` holds the stage, the model and where it came from; ``<workdir>/tokenizer/`` holds the
tokenizer it needs, which ``load_tokenizer`` finds.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from xattn_vlm.data.tokenizer import Tokenizer
from xattn_vlm.data.shapes.tokenizer import default_tokenizer
from xattn_vlm.models import scan
from xattn_vlm.models.flamingo import Flamingo

_log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TOKENIZER = "tokenizer"

# Per stage, the config fields that decide the shapes and meaning of the saved parameters
# (compute dtype and rematerialisation do not).
MODEL_FIELDS = {
    "lm_pretrain": ("model.lm", "model.param_dtype"),
    "vision_pretrain": ("model.vision", "model.param_dtype", "contrastive"),
    "flamingo": ("model.lm", "model.vision", "model.resampler", "model.xattn",
                 "model.added_tokens", "model.param_dtype"),
}


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
  return [d for f in MODEL_FIELDS[current["stage"]]
          for d in differences(get_field(saved, f), get_field(current, f), f"config.{f}")]


def saved_scanned(saved: dict[str, Any]) -> bool:
  """Whether a saved run's layers are in the scanned layout: only the flamingo stage's model
  scans them, when ``config.model.scan_layers`` is set (absent in configs older than it)."""
  return saved.get("stage") == "flamingo" and bool(get_field(saved, "model.scan_layers"))


def restore_in_layout(restore: Callable[[Any], Any], target: Any, scanned: bool) -> Any:
  """``restore(tree)`` of a checkpoint whose layers are ``scanned`` or not, returned in the
  layout and shardings of ``target`` (ShapeDtypeStructs with shardings): a checkpoint written
  with or without ``config.model.scan_layers`` restores into either (exactly: the layouts hold
  the same numbers)."""
  wanted = scan.scanned_layout(target)
  if wanted is None or wanted == scanned:
    return restore(target)
  restored = scan.layout(restore(scan.layout(target, scanned)), wanted)
  return jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), restored, target)


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
  ``config.model[model_key]`` (``model_key`` '': every field of ``MODEL_FIELDS[stage]``);
  ``setting`` names the config field holding ``workdir``."""
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
    fields = [f"model.{model_key}"] if model_key else MODEL_FIELDS[stage]
    changed = [d for f in fields
               for d in differences(get_field(saved, f), get_field(current, f), f"config.{f}")]
    if changed:
      what = f"config.model.{model_key}" if model_key else "config.model"
      raise ValueError(f"{setting}={workdir!r} holds a different {model_key or 'model'}: "
                       + "; ".join(changed[:5])
                       + f". Set {what} to the {stage} run's (checkpoint.saved_config).")
    restore = lambda tree: manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
            partial_restore=True))).state
    try:
      restored = restore_in_layout(restore, tree, saved_scanned(saved))
    except Exception as error:  # pylint: disable=broad-except
      _log.warning("%s: step %d cannot be restored (%s); trying the previous step", workdir,
                      step, error)
      errors.append(f"step {step}: {error}")
      continue
    manager.close()
    params = restored["params"]
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
  config = saved_config(workdir, setting)
  abstract = nnx.eval_shape(lambda: Flamingo(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), params)
  # ``config`` is the run's own, so load_params' same-model check passes; it still checks the
  # stage and falls back past unreadable steps.
  params = load_params(workdir, target, source="", stage="flamingo", model_key="lm",
                       config=config, setting=setting)
  return nnx.merge(graphdef, params, rest)


def saved_config(workdir: str, setting: str = "--checkpoint") -> ml_collections.ConfigDict:
  """The config saved with the latest checkpoint of ``workdir`` (a run's, or a converted model's:
  its ``model`` is what a run fine-tuning from it sets as ``config.model``)."""
  manager = ocp.CheckpointManager(run_path(workdir) / CHECKPOINTS,
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise ValueError(f"{setting}={workdir!r} holds no checkpoint: give the workdir of a "
                     "flamingo-stage training run or a converted model")
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  manager.close()
  return ml_collections.ConfigDict(saved)


def load_tokenizer(workdir: str, model_config: ml_collections.ConfigDict,
                   path: str | None = None) -> Tokenizer:
  """The tokenizer for the model of ``workdir``, built for ``model_config``: ``path`` when given
  (a Hugging Face folder or .gguf file), else the ``tokenizer/`` folder a conversion wrote, else
  the run's own (``config.data.tokenizer``), else the shapes world's."""
  if path is None and "://" not in str(workdir):
    saved = pathlib.Path(workdir) / TOKENIZER
    path = str(saved) if saved.is_dir() else None
  if path is None:
    path = get_field(config_json(saved_config(workdir)), "data.tokenizer") or None
  if path is None:
    return default_tokenizer()
  return Tokenizer.from_pretrained(path, model_config=model_config)


def require_new_directory(output: str, setting: str = "--output") -> pathlib.Path:
  """``output`` as an absolute path, after checking that it does not exist and its parent does
  (before a long job that ends by writing it)."""
  target = pathlib.Path(output).absolute()
  if target.exists():
    raise ValueError(f"{setting}={output!r} already exists: give a new directory")
  if not target.parent.is_dir():
    raise FileNotFoundError(f"{setting}={output!r}: its parent directory {str(target.parent)!r} "
                            "does not exist")
  return target


def save_flamingo(output: str, model: Flamingo, config: ml_collections.ConfigDict,
                  tokenizer: Tokenizer | None, setting: str = "--output") -> None:
  """Writes ``model`` as a flamingo-stage workdir ``output`` that ``load_flamingo`` reads and a run
  starts from (``config.init.flamingo_workdir``): step 0 with the parameters, ``config`` (a
  ConfigDict with ``stage`` 'flamingo' and ``model``; other fields record the source) and the
  tokenizer in ``tokenizer/``. All is written into a new directory beside ``output`` and renamed
  at the end, so ``output`` either is complete or does not exist. ``output`` must not exist."""
  target = require_new_directory(output, setting)
  if config.get("stage") != "flamingo" or "model" not in config:
    raise ValueError("save_flamingo: config must hold stage='flamingo' and the model config")
  partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
  try:
    manager = ocp.CheckpointManager(partial / CHECKPOINTS, options=ocp.CheckpointManagerOptions(
        enable_async_checkpointing=False, create=True))
    manager.save(0, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": nnx.state(model, nnx.Param)}),
        config=ocp.args.JsonSave(config_json(config))))
    manager.close()
    if tokenizer is not None:
      tokenizer.save_pretrained(partial / TOKENIZER)
    partial.rename(target)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  _log.info("wrote %s", target)
