"""The trainer's checkpoints: asynchronous Orbax saves of the train state, the data iterator and
the config in one step directory (the layout of ``xattn_vlm.checkpoint``), and restoring the newest
readable step.

Restoring takes abstract targets carrying shardings, so a checkpoint written on one mesh restores
onto another. A step that fails to restore is treated as corrupt: a warning names it, it is moved
to ``<workdir>/checkpoints_corrupt/`` (never deleted) and the previous step is tried. A workdir
whose checkpoints were written for a different model fails instead, before anything is touched.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from xattn_vlm.checkpoint import (CHECKPOINTS, config_json, get_field, model_differences,
                                  restore_in_layout, run_path, saved_scanned)

_log = logging.getLogger(__name__)

CORRUPT = "checkpoints_corrupt"


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (a full disk, a lost mount); the message names the workdir
  and the newest complete step, which a rerun resumes from."""


def _is_write_failure(error: Exception) -> bool:
  """Whether ``error`` is the filesystem refusing a write: tensorstore (Orbax's array writer)
  raises ``ValueError('RESOURCE_EXHAUSTED: ... [os_error_code='28']')`` for a full disk."""
  return isinstance(error, OSError) or "os_error_code=" in str(error)


class Checkpointer:
  """The run's CheckpointManager with corrupt-step fallback (see the module docstring).

  A save that fails for want of space or access (``OSError``, or tensorstore's ``ValueError``
  carrying the OS error code, which is how a full disk reaches Orbax's array writes; raised by the
  save or by the next call that waits for an asynchronous one) leaves the earlier steps as they were, since Orbax writes a
  step into a temporary directory and renames it when complete; it raises
  ``CheckpointSaveError`` once, and the calls that follow (``wait``, ``close`` on the way out)
  only log the same failure instead of hiding the first report.
  """

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
    self._save_failed = False

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(self.workdir / CHECKPOINTS, options=self._options)

  def due(self, step: int) -> bool:
    """Whether ``save`` saves ``step`` without ``force``."""
    return step % self.every_steps == 0

  def save(self, step: int, state, iterator, config: ml_collections.ConfigDict, *,
           force: bool = False) -> bool:
    """Starts saving ``step`` when it is ``due`` (or ``force``); returns whether it did."""
    if not (self.due(step) or force):
      return False
    with self._saving():
      return self.manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(iterator),
          config=ocp.args.JsonSave(config_json(config))))

  @contextlib.contextmanager
  def _saving(self) -> Iterator[None]:
    """Turns the first failed write into ``CheckpointSaveError``; later ones are only logged."""
    try:
      yield
    except (OSError, ValueError) as error:
      if not _is_write_failure(error):
        raise
      if self._save_failed:
        _log.warning("checkpoint writes in %s still fail: %s", self.workdir, error)
        return
      self._save_failed = True
      steps = self.manager.all_steps(read=True)
      resume = (f"the newest complete checkpoint, step {steps[-1]}, is intact and a rerun "
                f"resumes from it" if steps else "no checkpoint is complete yet")
      raise CheckpointSaveError(
          f"--workdir={self.workdir}: writing a checkpoint failed ({error}); {resume}. Free "
          "space there (or fix the mount) and rerun the same command") from error

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
      saved_mixture = sorted(get_field(saved, "data.datasets") or {})
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
    workdir has no checkpoint. ``target_state``: ShapeDtypeStructs with shardings, in either
    layer layout (``checkpoint.restore_in_layout``)."""
    for step in reversed(self.manager.all_steps()):
      restore = lambda target, step=step: self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          data=grain.checkpoint.CheckpointRestore(iterator))).state
      try:
        state = restore_in_layout(restore, target_state, saved_scanned(self.saved_config(step)))
      except Exception as error:  # pylint: disable=broad-except
        self._set_aside(step, error)
        continue
      return state, step
    return None

  def _set_aside(self, step: int, error: Exception) -> None:
    _log.warning("checkpoint step %d in %s cannot be restored (%s: %s); moving it to %s and "
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
    with self._saving():
      self.manager.wait_until_finished()

  def close(self) -> None:
    with self._saving():
      self.manager.close()
