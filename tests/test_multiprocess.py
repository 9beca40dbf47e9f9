"""Multi-host runs on one machine: ``launch/local_multiprocess.sh`` runs
``python -m xattn_vlm.train --multiprocess`` and ``python -m xattn_vlm.evaluate --multiprocess``
as 2 processes x 4 CPU devices on 127.0.0.1.

"""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import leaves, losses, tiny
from xattn_vlm import checkpoint
from xattn_vlm.train import checkpoint as checkpoint_lib
from xattn_vlm import distributed
from xattn_vlm.train import trainer

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "launch" / "local_multiprocess.sh"
# The launcher forces each process's device count; conftest's other flags go with it, so the
# processes compile as this one does.
ENV = {**os.environ, "XLA_FLAGS": re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                         os.environ.get("XLA_FLAGS", "")).strip()}


def _launch(tmp_path, name: str, launcher_args, command,
            processes: int = 2) -> tuple[subprocess.Popen, pathlib.Path]:
  """Starts the launcher; its output (process 0's and its own) goes to ``<name>.log``."""
  log = tmp_path / f"{name}.log"
  process = subprocess.Popen(
      [str(LAUNCHER), f"--log_dir={tmp_path / name}", *launcher_args, str(processes), *command],
      cwd=REPO, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
  return process, log


def _train_command(workdir, preset: str = "flamingo", *overrides) -> list[str]:
  return [sys.executable, "-m", "xattn_vlm.train", "--multiprocess",
          f"--config=experiments/tiny_test.py:{preset}", f"--workdir={workdir}", *overrides]


def _rows(workdir: pathlib.Path) -> list[dict]:
  """metrics.jsonl's complete lines (process 0 may be writing the last one)."""
  path = workdir / "metrics.jsonl"
  lines = path.read_text().split("\n")[:-1] if path.exists() else []
  return [json.loads(line) for line in lines]


def _tail(log: pathlib.Path) -> str:
  return log.read_text()[-4000:]


def test_environment_gives_process_count_id_and_heartbeat():
  assert distributed.initialize_args({}) == {}
  assert distributed.initialize_args({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
                                      "JAX_HEARTBEAT_TIMEOUT_SECONDS": "5"}) == dict(
                                          num_processes=4, process_id=3,
                                          heartbeat_timeout_seconds=5)
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not"):
    distributed.initialize_args({"JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match=r"JAX_PROCESS_ID: expected < JAX_NUM_PROCESSES=2, got 2"):
    distributed.initialize_args({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="JAX_HEARTBEAT_TIMEOUT_SECONDS: expected an integer >= 1, "
                                       "got 'soon'"):
    distributed.initialize_args({"JAX_HEARTBEAT_TIMEOUT_SECONDS": "soon"})


def _logs(workdir) -> str:
  """Every process's log file of the run (``<workdir>/logs/``), concatenated."""
  return "".join(p.read_text() for p in sorted((workdir / "logs").glob("*.log")))


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(tmp_path):
  """2 processes x 4 devices train the tiny Flamingo stage for 3 steps: the same losses as one
  process with 8 devices (same mesh, data 8), metrics written once (by process 0), and the
  checkpoint they wrote together restores in this single process onto its own mesh."""
  workdir = tmp_path / "two_processes"
  process, log = _launch(tmp_path, "launch", [], _train_command(workdir))
  assert process.wait(timeout=600) == 0, _tail(log)
  single = trainer.train(tiny(), str(tmp_path / "one_process"))

  assert len(losses(workdir)) == 3
  np.testing.assert_allclose(losses(workdir), losses(tmp_path / "one_process"), rtol=1e-5,
                             atol=1e-5)
  assert "process 1 of 2" in _logs(workdir)

  s = trainer.setup(tiny())
  target = checkpoint.abstract_with_shardings(s.abstract_state, s.state_sharding)
  checkpointer = checkpoint_lib.Checkpointer(str(workdir), tiny().checkpoint)
  assert checkpointer.manager.all_steps() == [2, 3]
  restored = checkpointer.manager.restore(3, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state
  checkpointer.close()
  assert int(restored.step) == 3
  kernel = restored.params["lm"]["blocks"][0]["mlp"]["up"]["kernel"][...]
  assert kernel.sharding.mesh.devices.size == jax.device_count() == 8
  expected, got = leaves(single.params), leaves(restored.params)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.slow
def test_a_killed_process_stops_the_other_and_both_resume_from_the_checkpoint(tmp_path):
  """SIGKILL process 1 mid-training: process 0, waiting in a collective, is stopped by JAX's
  distributed service once the heartbeat times out (5 s here), not by the launcher (its grace
  period is 60 s), and the launcher exits non-zero. Relaunched, both processes restore the last
  checkpoint (state and each one's data position) and finish."""
  workdir = tmp_path / "run"
  command = _train_command(workdir, "lm_pretrain", "--config.checkpoint.every_steps=2")
  process, log = _launch(tmp_path, "first", ["--heartbeat_timeout=5", "--grace=60"],
                         [*command, "--config.total_steps=100000"])
  deadline = time.monotonic() + 400
  while not (workdir / "checkpoints" / "2").exists():  # committed by both processes
    assert process.poll() is None, f"exited early:\n{_tail(log)}"
    if time.monotonic() > deadline:
      process.kill()
      pytest.fail(f"no checkpoint of step 2 within 400 s:\n{_tail(log)}")
    time.sleep(0.1)
  pid = int(re.search(r"process 1 pid (\d+)", log.read_text()).group(1))
  os.kill(pid, 9)
  killed = time.monotonic()
  returncode = process.wait(timeout=120)
  elapsed = time.monotonic() - killed
  print(f"process 0 stopped {elapsed:.1f} s after process 1 was killed")
  assert returncode != 0
  assert elapsed < 30, _tail(log)
  assert "terminating the" not in log.read_text(), _tail(log)

  saved = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  process, log = _launch(tmp_path, "second", [], [*command, f"--config.total_steps={saved + 1}"])
  assert process.wait(timeout=400) == 0, _tail(log)
  # Each process logs to its own file in the workdir: both resumed.
  assert _logs(workdir).count(f"resumed lm_pretrain from step {saved} ") == 2
  assert _rows(workdir)[-1]["step"] == saved + 1


def test_launcher_stops_the_others_after_the_grace_period(tmp_path):
  """Without JAX in the loop: process 1 fails at once, process 0 would sleep a minute; with
  --grace=1 the launcher terminates it and exits with process 1's status."""
  start = time.monotonic()
  process, log = _launch(tmp_path, "launch", ["--grace=1", "--port=1"],
                         ["sh", "-c", 'test "$JAX_PROCESS_ID" = 1 && exit 3; sleep 60'])
  assert process.wait(timeout=30) == 3, _tail(log)
  assert time.monotonic() - start < 15
  assert "process 1 exited with status 3" in log.read_text()
  assert "terminating the 1 processes still running" in log.read_text()


def test_launcher_dry_run_prints_each_process_environment(tmp_path):
  result = subprocess.run(
      [str(LAUNCHER), "--dry_run", "--port=4321", "--devices_per_process=2",
       f"--log_dir={tmp_path}", "2", "python", "-m", "xattn_vlm.train", "--multiprocess",
       "--workdir=/tmp/a b"], cwd=REPO, env=ENV, capture_output=True, text=True, check=True)
  lines = result.stdout.splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert "JAX_COORDINATOR_ADDRESS=127.0.0.1:4321 JAX_NUM_PROCESSES=2" in line
    assert f"JAX_PROCESS_ID={i} " in line
    assert "--xla_force_host_platform_device_count=2" in line
    assert line.endswith(r"--workdir=/tmp/a\ b &" if i == 0 else
                         rf"--workdir=/tmp/a\ b >{tmp_path}/process_1.log 2>&1 &")
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["0", "true"], "N: expected a positive integer, got '0'"),
    (["2"], "expected N and a COMMAND"),
    (["--devices=4", "2", "true"], "unknown option '--devices=4'"),
])
def test_launcher_rejects_bad_arguments(args, message):
  result = subprocess.run([str(LAUNCHER), *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True)
  assert result.returncode == 2 and message in result.stderr


# 16 shapes-world VQA queries at 0 and 2 shots: 8 per process, in batches of 4 (one per device).
EVAL_QUERIES = 16
EVAL_SHOTS = (0, 2)


def _evaluate_command(checkpoint_dir, output_dir) -> list[str]:
  return [sys.executable, "-m", "xattn_vlm.evaluate", "--multiprocess",
          f"--checkpoint={checkpoint_dir}", f"--output_dir={output_dir}",
          "--eval.tasks=shapes_vqa", f"--eval.shots={','.join(map(str, EVAL_SHOTS))}",
          "--eval.trials=1", f"--eval.shapes.num_queries={EVAL_QUERIES}",
          "--eval.shapes.pool_size=32", "--eval.batch_size=4", "--eval.num_beams=1"]


def _logged(output_dir: pathlib.Path, shots: int) -> list[dict]:
  """Every line of every process's prediction log of a cell, in file order."""
  folder = output_dir / "predictions" / "shapes_vqa"
  return [json.loads(line) for path in sorted(folder.glob(f"{shots}shot_trial0*.jsonl"))
          for line in path.read_text().splitlines()]


def _predictions(output_dir: pathlib.Path) -> dict[int, dict[int, str]]:
  return {shots: {row["id"]: row["output"] for row in _logged(output_dir, shots)}
          for shots in EVAL_SHOTS}


@pytest.mark.slow
def test_evaluation_over_two_processes_equals_one_and_resumes_after_a_kill(tmp_path):
  """A tiny checkpoint evaluated (1) by one process, (2) by two, and (3) by two of which one is
  SIGKILLed once it has logged predictions, then rerun: the same predictions for every query and
  the same results.json in all three; the rerun logs each query that was left exactly once and
  repeats none."""
  checkpoint_dir = tmp_path / "checkpoint"
  trainer.train(tiny(**{"total_steps": 1, "checkpoint.every_steps": 1}), str(checkpoint_dir))

  one, log = _launch(tmp_path, "one", [], _evaluate_command(checkpoint_dir, tmp_path / "one"),
                     processes=1)
  assert one.wait(timeout=600) == 0, _tail(log)
  two, log = _launch(tmp_path, "two", [], _evaluate_command(checkpoint_dir, tmp_path / "two"))
  assert two.wait(timeout=600) == 0, _tail(log)
  expected = _predictions(tmp_path / "one")
  assert [sorted(cell) for cell in expected.values()] == [list(range(EVAL_QUERIES))] * 2
  assert len(set(expected[0].values())) > 1  # outputs that tell queries apart
  assert _predictions(tmp_path / "two") == expected
  assert sorted((tmp_path / "two" / "predictions" / "shapes_vqa").iterdir())[0].name == (
      "0shot_trial0.process0.jsonl")
  results = (tmp_path / "one" / "results.json").read_text()
  assert (tmp_path / "two" / "results.json").read_text() == results

  output_dir = tmp_path / "killed"
  command = _evaluate_command(checkpoint_dir, output_dir)
  first, log = _launch(tmp_path, "first", ["--heartbeat_timeout=5", "--grace=60"], command)
  process_1_log = output_dir / "predictions" / "shapes_vqa" / "0shot_trial0.process1.jsonl"
  deadline = time.monotonic() + 400
  while not (process_1_log.exists() and process_1_log.read_text().count("\n")):
    assert first.poll() is None, f"exited early:\n{_tail(log)}"
    if time.monotonic() > deadline:
      first.kill()
      pytest.fail(f"process 1 logged no prediction within 400 s:\n{_tail(log)}")
    time.sleep(0.02)
  os.kill(int(re.search(r"process 1 pid (\d+)", log.read_text()).group(1)), 9)
  assert first.wait(timeout=120) != 0
  before = {shots: len(_logged(output_dir, shots)) for shots in EVAL_SHOTS}
  assert before[EVAL_SHOTS[-1]] < EVAL_QUERIES, before  # killed before the end
  assert not (output_dir / "results.json").exists() or (
      (output_dir / "results.json").read_text() != results)

  second, log = _launch(tmp_path, "second", [], command)
  assert second.wait(timeout=600) == 0, _tail(log)
  for shots in EVAL_SHOTS:
    ids = [row["id"] for row in _logged(output_dir, shots)]
    assert sorted(ids) == list(range(EVAL_QUERIES)), (shots, ids)  # none lost, none repeated
  assert _predictions(output_dir) == expected
  assert (output_dir / "results.json").read_text() == results
