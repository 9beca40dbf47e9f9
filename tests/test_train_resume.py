"""Preemption and exact resume of ``python -m xattn_vlm.train``, in subprocesses (8 CPU devices)."""

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import leaves, random_seed, tiny
from xattn_vlm.train import metrics as metrics_lib
from xattn_vlm.train import trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = 10
OVERRIDES = {"total_steps": STEPS, "checkpoint.every_steps": 2}
ENV = dict(
    os.environ,  # with conftest's XLA_FLAGS: the same devices and code as the in-process runs
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(REPO / ".jax_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
)


def _start(workdir: pathlib.Path, log: pathlib.Path) -> subprocess.Popen:
  args = [f"--config.{key}={value}" for key, value in OVERRIDES.items()]
  return subprocess.Popen(
      [sys.executable, "-m", "xattn_vlm.train", "--config=experiments/tiny_test.py:flamingo",
       f"--workdir={workdir}", *args],
      cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _rows(workdir: pathlib.Path) -> list[str]:
  path = workdir / metrics_lib.METRICS_FILE
  return path.read_text().splitlines() if path.exists() else []


def _wait_for_rows(process, workdir, log, count: int, timeout: float = 300) -> None:
  """Until metrics.jsonl has ``count`` rows (one per finished step)."""
  deadline = time.monotonic() + timeout
  while len(_rows(workdir)) < count:
    if process.poll() is not None:
      pytest.fail(f"training exited with {process.returncode} early:\n{log.read_text()[-3000:]}")
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"no step {count} within {timeout} s:\n{log.read_text()[-3000:]}")
    time.sleep(0.05)


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_match_an_uninterrupted_run(tmp_path):
  """Killed with SIGKILL at a random step (seeded: ``XATTN_TEST_SEED``), restarted, stopped with
  SIGTERM and then with SIGINT (each time it saves the step it reached and exits 0 within
  seconds), restarted again to the end: the final parameters are bit-identical to an
  uninterrupted run's, data order included."""
  reference = trainer.train(tiny(**OVERRIDES), str(tmp_path / "reference"))
  workdir = tmp_path / "run"
  kill_at = random.Random(random_seed("SIGKILL step")).randint(2, STEPS - 5)
  print(f"SIGKILL after step {kill_at}")
  process = _start(workdir, tmp_path / "killed.log")
  _wait_for_rows(process, workdir, tmp_path / "killed.log", kill_at)
  process.kill()
  process.wait()

  for sig in (signal.SIGTERM, signal.SIGINT):
    log = tmp_path / f"{sig.name}.log"
    rows_before = len(_rows(workdir))
    process = _start(workdir, log)
    _wait_for_rows(process, workdir, log, rows_before + 1)
    sent = time.monotonic()
    process.send_signal(sig)
    returncode = process.wait(timeout=60)
    elapsed = time.monotonic() - sent
    assert returncode == 0, log.read_text()[-3000:]
    print(f"saved and exited {elapsed:.1f} s after {sig.name}")
    # About 10 s on an idle 2-core machine; generous, as CI machines are shared.
    assert elapsed < 60, f"took {elapsed:.1f} s to save and exit after {sig.name}"
    assert f"stopped by {sig.name}" in log.read_text(), log.read_text()[-3000:]
    last_step = json.loads(_rows(workdir)[-1])["step"]  # this run's last step
    assert len(_rows(workdir)) > rows_before and last_step < STEPS
    assert _checkpoint_steps(workdir)[-1] == last_step

  log = tmp_path / "finished.log"
  process = _start(workdir, log)
  assert process.wait(timeout=600) == 0, log.read_text()[-3000:]
  assert _checkpoint_steps(workdir)[-1] == STEPS
  resumed = trainer.train(tiny(**OVERRIDES), str(workdir))  # restores, no steps
  expected, got = leaves(reference.params), leaves(resumed.params)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  assert [r["step"] for r in metrics_lib.read_metrics(str(workdir))] == list(range(1, STEPS + 1))
