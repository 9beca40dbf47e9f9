"""Faults while training, in subprocesses: a disk that fills up during a save, and data workers
that die (``config.data.num_workers=2``), each followed by a restart that must end bit-identical
to an uninterrupted run.

A full disk is simulated without root: the training process is started through a driver that
makes ``etils.epath``'s ``write_text`` (what Orbax writes a step's metadata and the data
iterator's state with) raise ``OSError(ENOSPC)`` for the files of one checkpoint step.
"""

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import leaves, random_seed, tiny
from test_train_resume import ENV, REPO, _checkpoint_steps, _rows, _wait_for_rows
from xattn_vlm.train import checkpoint as checkpoint_lib
from xattn_vlm.train import metrics as metrics_lib
from xattn_vlm.train import trainer

STEPS = 6
OVERRIDES = {"total_steps": STEPS, "checkpoint.every_steps": 2}
FULL_AT = 4  # the checkpoint step whose files find the disk full
DISK_FULL = f"""
import errno, os, sys
from etils import epath
write_text = epath.Path.write_text

def full(self, *args, **kwargs):
  if "checkpoints/{FULL_AT}.orbax-checkpoint-tmp" in os.fspath(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(self))
  return write_text(self, *args, **kwargs)

epath.Path.write_text = full
from xattn_vlm.train.__main__ import main
sys.argv[0] = "xattn-train"
main()
"""


def _args(workdir, overrides) -> list[str]:
  return ["--config=experiments/tiny_test.py:flamingo", f"--workdir={workdir}",
          *(f"--config.{key}={value}" for key, value in overrides.items())]


def _assert_same_params(state, reference) -> None:
  expected, got = leaves(reference.params), leaves(state.params)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.mark.slow
def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_naming_the_workdir(tmp_path):
  reference = trainer.train(tiny(**OVERRIDES), str(tmp_path / "reference"))
  workdir = tmp_path / "run"
  done = subprocess.run([sys.executable, "-c", DISK_FULL, *_args(workdir, OVERRIDES)], cwd=REPO,
                        env=ENV, capture_output=True, text=True, timeout=600, check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  error = done.stderr.strip().splitlines()[-1]
  assert error.startswith(f"xattn-train: error: CheckpointSaveError: --workdir={workdir}: "
                          "writing a checkpoint failed ([Errno 28] No space left on device"), error
  assert f"the newest complete checkpoint, step {FULL_AT - 2}, is intact" in error
  assert _checkpoint_steps(workdir) == [FULL_AT - 2]

  resumed = trainer.train(tiny(**OVERRIDES), str(workdir))  # space again: resumes at FULL_AT - 2
  _assert_same_params(resumed, reference)
  assert _checkpoint_steps(workdir)[-1] == STEPS
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


def _workers(process: subprocess.Popen, timeout: float = 120) -> list[int]:
  """The pids of the grain worker processes among ``process``'s descendants (spawned children
  running ``spawn_main``), waiting until there are some."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    children: dict[int, list[int]] = {}
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
      try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
      except OSError:
        continue
      children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [process.pid]
    while todo:
      for child in children.get(todo.pop(), []):
        todo.append(child)
        try:
          if b"spawn_main" in (pathlib.Path("/proc") / str(child) / "cmdline").read_bytes():
            found.append(child)
        except OSError:
          continue
    if found:
      return found
    time.sleep(0.5)
  pytest.fail(f"no data worker among the descendants of {process.pid} within {timeout} s")


@pytest.mark.slow
def test_a_dead_data_worker_stops_the_run_and_a_killed_run_resumes_exactly(tmp_path):
  """``data.num_workers=2``: a worker killed at a random step ends the run with one line naming
  the dataset and the signal; the rerun is SIGKILLed (workers and all) at a random moment; the
  third run finishes bit-identical to an uninterrupted run without workers."""
  rng = random.Random(random_seed("worker drill"))
  overrides = {**OVERRIDES, "data.num_workers": 2}
  reference = trainer.train(tiny(**OVERRIDES), str(tmp_path / "reference"))
  workdir = tmp_path / "run"

  log = tmp_path / "worker_killed.log"
  process = subprocess.Popen([sys.executable, "-m", "xattn_vlm.train", *_args(workdir, overrides)],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w"))
  kill_after = rng.randint(1, STEPS - 2)
  _wait_for_rows(process, workdir, log, kill_after)
  victim = rng.choice(_workers(process))
  print(f"SIGKILL to worker {victim} after step {kill_after}")
  os.kill(victim, signal.SIGKILL)
  assert process.wait(timeout=300) == 2, log.read_text()[-3000:]
  assert ("xattn-train: error: DataWorkerError: dataset " in log.read_text()
          and "died (exit code -9, SIGKILL" in log.read_text()), log.read_text()[-3000:]

  log = tmp_path / "killed.log"
  rows_before = len(_rows(workdir))
  process = subprocess.Popen([sys.executable, "-m", "xattn_vlm.train", *_args(workdir, overrides)],
                             cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT,
                             start_new_session=True)
  _wait_for_rows(process, workdir, log, rows_before + 1)
  delay = rng.uniform(0, 3)
  print(f"SIGKILL to the run and its workers {delay:.2f} s after its first step")
  time.sleep(delay)
  os.killpg(process.pid, signal.SIGKILL)
  process.wait()

  log = tmp_path / "finished.log"
  process = subprocess.Popen([sys.executable, "-m", "xattn_vlm.train", *_args(workdir, overrides)],
                             cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=log.open("w"))
  assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
  resumed = trainer.train(tiny(**OVERRIDES), str(workdir))  # restores, no steps
  _assert_same_params(resumed, reference)
  assert [r["step"] for r in metrics_lib.read_metrics(str(workdir))] == list(range(1, STEPS + 1))


@pytest.fixture
def small_disk(tmp_path):
  """A 1 MiB tmpfs mounted at a fresh directory: a disk that really fills up. Mounting needs root
  on Linux (CI's container has it); elsewhere the test says why it cannot run."""
  mount = tmp_path / "disk"
  mount.mkdir()
  if sys.platform != "linux" or os.geteuid() != 0:
    pytest.skip("mounting a small tmpfs needs root on Linux")
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
  yield mount
  subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_is_reported_as_a_failed_checkpoint_write(small_disk):
  """Orbax's array writes go through tensorstore, which reports a full disk as a ValueError
  (RESOURCE_EXHAUSTED, os_error_code 28), not an OSError: it must still become
  CheckpointSaveError, and the step saved before must stay restorable."""
  config = tiny(**{"checkpoint.async_save": False})
  checkpointer = checkpoint_lib.Checkpointer(str(small_disk), config.checkpoint)
  rng = np.random.default_rng(0)
  iterator = grain.MapDataset.range(4).to_iter_dataset().__iter__()
  saved = {}  # 400 kB each (incompressible) on a 1 MiB disk: the third cannot fit
  with pytest.raises(checkpoint_lib.CheckpointSaveError) as failure:
    for step in range(1, 5):
      state = {"w": rng.random(100_000, dtype=np.float32)}
      checkpointer.save(step, state, iterator, config, force=True)
      checkpointer.manager.wait_until_finished()
      saved[step] = state
  newest = max(saved)
  assert 1 <= newest < 4
  assert str(failure.value).startswith(f"--workdir={small_disk}: writing a checkpoint failed ")
  assert "No space left on device" in str(failure.value)
  assert f"the newest complete checkpoint, step {newest}, is intact" in str(failure.value)
  restored = checkpointer.manager.restore(newest, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(saved[newest])))
  np.testing.assert_array_equal(restored.state["w"], saved[newest]["w"])
  checkpointer.close()
