"""One run per directory (``xattn_vlm.lock``): a second training run in a workdir, or a second
evaluation into an output directory, fails at start naming the directory and the holder's host
and pid; the lock goes with its holder however it ends (SIGKILL included); only process 0 of a
multi-process run takes it."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import jax
import pytest
from flax import nnx

from helpers import tiny
from xattn_vlm import lock
from xattn_vlm.data import default_tokenizer
from xattn_vlm.eval import runner
from xattn_vlm.inference import Processor
from xattn_vlm.models import config as model_config
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.train import trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
HOLD = ("import sys, time\nfrom xattn_vlm.lock import DirectoryLock\n"
        "DirectoryLock(sys.argv[1], '--workdir').acquire()\nprint('held', flush=True)\n"
        "time.sleep(600)\n")


@pytest.fixture
def holder(tmp_path):
  """Another process holding ``tmp_path / 'run'``'s lock; yields (directory, process)."""
  directory = tmp_path / "run"
  process = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
  assert process.stdout.readline().strip() == "held"
  yield directory, process
  process.kill()
  process.wait()


def _in_use(directory: pathlib.Path, setting: str, pid: int) -> str:
  return (rf"{setting}={directory} is in use by another run: pid {pid} on host "
          rf"{socket.gethostname()}, since .*Wait for it to end")


def test_a_second_training_run_fails_at_start_naming_the_holder(holder):
  directory, process = holder
  with pytest.raises(lock.DirectoryInUseError, match=_in_use(directory, "--workdir", process.pid)):
    trainer.train(tiny(total_steps=1), str(directory))
  assert not (directory / "checkpoints").exists()


def test_the_train_command_reports_the_holder_in_one_line(holder):
  directory, process = holder
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(
      [sys.executable, "-m", "xattn_vlm.train", "--config=experiments/tiny_test.py:flamingo",
       f"--workdir={directory}", "--config.total_steps=1"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 2, done.stderr[-3000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1, done.stderr[-3000:]
  assert lines[0].startswith(f"xattn-train: error: --workdir={directory} is in use by another "
                             f"run: pid {process.pid} on host {socket.gethostname()}")


def test_a_second_evaluation_into_an_output_dir_fails_at_start(holder):
  directory, process = holder
  tokenizer = default_tokenizer()
  config = model_config.tiny()
  config.lm.vocab_size = tokenizer.lm_vocab_size
  model = nnx.jit(lambda: Flamingo(config, rngs=nnx.Rngs(0)))()
  evaluation = runner.default_config()
  evaluation.tasks, evaluation.shots, evaluation.trials = "shapes_vqa", (0,), 1
  evaluator = runner.Evaluator(model, Processor.from_model_config(config, tokenizer), evaluation,
                               directory)
  with pytest.raises(lock.DirectoryInUseError,
                     match=_in_use(directory, "--output_dir", process.pid)):
    evaluator.run()
  assert not (directory / runner.PREDICTIONS).exists()


def test_a_lock_left_by_a_killed_process_is_taken_over(holder):
  directory, process = holder
  process.send_signal(signal.SIGKILL)
  process.wait()
  stale = json.loads((directory / lock.LOCK_FILE).read_text())
  assert stale["pid"] == process.pid  # the file stays, its flock went with the process
  with lock.hold(directory, "--workdir"):
    mine = json.loads((directory / lock.LOCK_FILE).read_text())
    assert (mine["pid"], mine["host"]) == (os.getpid(), socket.gethostname())
  assert not (directory / lock.LOCK_FILE).exists()


def test_the_lock_is_released_when_the_body_raises(tmp_path):
  with pytest.raises(RuntimeError, match="boom"):
    with lock.hold(tmp_path, "--workdir"):
      with pytest.raises(lock.DirectoryInUseError, match=f"pid {os.getpid()}"):
        lock.DirectoryLock(tmp_path, "--workdir").acquire()  # another open file, same process
      raise RuntimeError("boom")
  with lock.hold(tmp_path, "--workdir"):
    assert (tmp_path / lock.LOCK_FILE).exists()


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  with lock.hold(tmp_path / "run", "--workdir"):
    assert not (tmp_path / "run" / lock.LOCK_FILE).exists()
