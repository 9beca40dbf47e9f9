"""launch/: the Cloud TPU VM and SLURM launchers, which cannot run here, through their dry runs and
a fake gcloud/scontrol on PATH; every script is shellcheck-clean."""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = REPO / "launch"
TRAIN = ["python", "-m", "xattn_vlm.train", "--multiprocess",
         "--config=experiments/flamingo_9b.py:mesh=tpu", "--workdir=gs://bucket/flamingo 9b"]


def _run(args, env=None, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run([str(a) for a in args], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, **(env or {})}, timeout=60, **kwargs)


def _fake(bin_dir: pathlib.Path, name: str, script: str) -> None:
  path = bin_dir / name
  path.write_text("#!/bin/sh\n" + script)
  path.chmod(0o755)


def test_scripts_are_shellcheck_clean():
  assert shutil.which("shellcheck"), "shellcheck is not installed: bash .ci/setup installs it"
  scripts = sorted(LAUNCH.glob("*.sh")) + [LAUNCH / "slurm.sbatch"]
  result = _run(["shellcheck", *scripts])
  assert result.returncode == 0, result.stdout


def test_tpu_vm_dry_run_prints_create_copy_install_and_run_on_all_workers():
  result = _run([LAUNCH / "tpu_vm.sh", "--name=flamingo", "--zone=us-east5-a", "--project=proj",
                 "--create=v5p-128", "--spot", "--dry_run", "--", *TRAIN])
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]
  where = ["--zone=us-east5-a", "--project=proj"]
  tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
  assert "describe flamingo --zone=us-east5-a --project=proj" in result.stdout
  assert commands[0] == [*tpu, "create", "flamingo", *where, "--accelerator-type=v5p-128",
                         "--version=tpu-ubuntu2204-base", "--spot"]
  assert commands[1][:5] == [*tpu, "scp"] and commands[1][-1] == "--worker=all"
  tarball = commands[1][6].split(":", 1)[1]
  for command in commands[2:]:
    assert command[:8] == [*tpu, "ssh", "flamingo", *where] and command[8] == "--worker=all"
  install, run = commands[2][9], commands[3][9]
  assert f"tar -xf {tarball}" in install and "pip install -q -e \"$d[tpu]\"" in install
  assert install.count(tarball.split("-")[-1].split(".")[0]) == 3  # the hash: checked, stored
  assert shlex.split(run.rsplit("exec ", 1)[1]) == TRAIN


def test_tpu_vm_runs_what_it_prints_and_skips_creating_an_existing_slice(tmp_path):
  """With a fake gcloud that records its arguments: describe succeeds (the slice exists), so
  no create; then scp, install and run, in that order."""
  log = tmp_path / "gcloud.log"
  _fake(tmp_path, "gcloud", f'echo "$*" >> {log}\n')
  result = _run([LAUNCH / "tpu_vm.sh", "--name=flamingo", "--zone=z", "--create=v5e-16", "--",
                 *TRAIN], env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
  assert result.returncode == 0, result.stderr
  calls = [line.split()[3] for line in log.read_text().splitlines()]
  assert calls == ["describe", "scp", "ssh", "ssh"]
  assert "flamingo exists; not creating it" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--zone=z", "--", "true"], "--name: expected the TPU VM name"),
    (["--name=n", "--", "true"], "--zone: expected a zone"),
    (["--name=n", "--zone=z"], "expected '-- COMMAND [ARGS...]'"),
    (["--name=n", "--zone=z", "--", "python", "--workdir=/tmp/run"],
     "--workdir=/tmp/run: the workers of a TPU slice share no disk"),
    (["--name=n", "--zone=z", "--workers=all", "--", "true"], "unknown option '--workers=all'"),
])
def test_tpu_vm_rejects_bad_arguments(args, message):
  result = _run([LAUNCH / "tpu_vm.sh", *args])
  assert result.returncode == 2 and message in result.stderr


SLURM = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[17-18]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}


def test_slurm_task_sets_coordinator_and_process_ids_from_slurm(tmp_path):
  _fake(tmp_path, "scontrol", 'test "$1 $2 $3" = "show hostnames gpu-a[17-18]" && '
                              'printf "gpu-a17\\ngpu-a18\\n"\n')
  env = {**SLURM, "PATH": f"{tmp_path}:{os.environ['PATH']}", "DRY_RUN": "1"}
  result = _run([LAUNCH / "slurm_task.sh", *TRAIN], env=env)
  assert result.returncode == 0, result.stderr
  words = shlex.split(result.stdout)
  assert words[:6] == ["env", "JAX_COORDINATOR_ADDRESS=gpu-a17:24242", "JAX_NUM_PROCESSES=2",
                       "JAX_PROCESS_ID=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                       "JAX_HEARTBEAT_TIMEOUT_SECONDS=100"]
  assert words[6:6 + len(TRAIN)] == TRAIN
  assert words[6 + len(TRAIN):] == [">logs/slurm-4242-process_1.log", "2>&1"]
  result = _run([LAUNCH / "slurm_task.sh", "true"],
                env={**env, "SLURM_PROCID": "0", "JAX_COORDINATOR_PORT": "1234"})
  assert "gpu-a17:1234" in result.stdout and ">logs" not in result.stdout


def test_slurm_task_runs_the_command_with_that_environment(tmp_path):
  _fake(tmp_path, "scontrol", 'printf "gpu-a17\\ngpu-a18\\n"\n')
  env = {**SLURM, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_PROCID": "0"}
  result = _run([LAUNCH / "slurm_task.sh", "sh", "-c",
                 "echo $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID"], env=env)
  assert result.returncode == 0 and result.stdout.split() == ["gpu-a17:24242", "2", "0"]


@pytest.mark.parametrize("change, message", [
    ({"SLURM_PROCID": ""}, "SLURM_PROCID is not set"),
    ({"SLURM_NTASKS_PER_NODE": "8"}, "SLURM_NTASKS_PER_NODE=8: expected 1"),
])
def test_slurm_task_refuses_a_wrong_environment(change, message):
  result = _run([LAUNCH / "slurm_task.sh", "true"], env={**SLURM, **change})
  assert result.returncode == 2 and message in result.stderr


def test_slurm_sbatch_dry_run_prints_srun_with_kill_on_bad_exit(tmp_path):
  (tmp_path / "venv" / "bin").mkdir(parents=True)
  (tmp_path / "venv" / "bin" / "activate").write_text("")
  result = _run(["bash", LAUNCH / "slurm.sbatch", *TRAIN],
                env={"DRY_RUN": "1", "VENV": str(tmp_path / "venv")})
  assert result.returncode == 0, result.stderr
  assert shlex.split(result.stdout) == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1",
                                        "launch/slurm_task.sh", *TRAIN]
  header = (LAUNCH / "slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=8" in header
