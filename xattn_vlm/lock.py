"""One run per directory: a lock file that a training workdir or an evaluation's output directory
holds while a job writes into it.

Two runs in one directory would interleave checkpoints, metrics and prediction logs and corrupt
each other's resume. The lock is ``<dir>/run.lock``: an exclusive ``flock`` on it is the lock
itself, and the file's content (host, pid, start time, command) only says who holds it. The kernel
drops a ``flock`` when its process ends, however it ends (SIGKILL included), so a lock file left by
a dead process is stale by construction and the next run takes it over; on a shared filesystem
whose locks reach the server (NFS) that holds across hosts too. On several processes only process
0 takes the lock and tells the others whether it got it, so they all stop together. Directories
that are URLs (``gs://...``) are not locked: object stores have no such lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
from typing import Iterator

import numpy as np

LOCK_FILE = "run.lock"


class DirectoryInUseError(ValueError):
  """Another live process holds the directory's lock; the message names it and the holder."""


def _holder() -> dict[str, object]:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)}


def _describe(path: str) -> str:
  """Who holds the lock at ``path``, as its file says."""
  try:
    with open(path, encoding="utf-8") as f:
      holder = json.loads(f.read() or "null")
  except (OSError, ValueError):
    holder = None
  if not isinstance(holder, dict):
    return "a process that has not yet written its name into the lock"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')} "
          f"({holder.get('command')})")


class DirectoryLock:
  """The exclusive lock of ``directory`` (created if missing); ``setting`` (``--workdir``,
  ``--output_dir``) names the directory in the error a second run gets."""

  def __init__(self, directory: str | os.PathLike, setting: str):
    self.directory = os.path.abspath(directory)
    self.setting = setting
    self.path = os.path.join(self.directory, LOCK_FILE)
    self._fd: int | None = None

  def acquire(self) -> None:
    """Takes the lock, or raises ``DirectoryInUseError`` naming the holder's host and pid."""
    os.makedirs(self.directory, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        os.close(fd)
        raise DirectoryInUseError(
            f"{self.setting}={self.directory} is in use by another run: {_describe(self.path)}. "
            f"Wait for it to end, stop it, or use another {self.setting}") from None
      # A holder that was releasing may have unlinked the file we opened: lock the one at the path.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder()).encode())
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    """Removes the lock file and drops the lock (in that order, see ``acquire``)."""
    if self._fd is None:
      return
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.path)
    os.close(self._fd)
    self._fd = None


@contextlib.contextmanager
def hold(directory: str | os.PathLike, setting: str) -> Iterator[None]:
  """Holds ``directory``'s lock for the ``with`` body (see the module docstring); on several
  processes process 0 takes it, and every process raises when it could not."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  lock = None
  if jax.process_index() == 0 and "://" not in str(directory):
    lock = DirectoryLock(directory, setting)
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except DirectoryInUseError as e:
      error = e
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
    if failed and error is None:
      error = DirectoryInUseError(f"{setting}={directory}: process 0 could not lock it (another "
                                  "run holds it; process 0's log names the holder)")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
