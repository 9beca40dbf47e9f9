"""Every entry point follows one convention (``xattn_vlm.cli``): ``python -m xattn_vlm.<name>`` and
the console script ``xattn-<name>``; ``--help`` prints the usage and exits 0; a bad argument or
bad input is one line on stderr and exit code 2, with the traceback only under
``--verbosity=1``; the console shows no library INFO line and no TPU warning."""

import concurrent.futures
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from helpers import REPO

# entry point -> (module, a word its usage text holds)
ENTRY_POINTS = {
    "train": ("xattn_vlm.train", "--workdir"),
    "recipe": ("xattn_vlm.recipe", "--workdir"),
    "evaluate": ("xattn_vlm.evaluate", "--output_dir"),
    "prompt": ("xattn_vlm.prompt", "--image"),
    "plan": ("xattn_vlm.plan", "--topology"),
    "build-features": ("xattn_vlm.build_features", "--output"),
    "summary": ("xattn_vlm.summary", "--configs"),
    "convert": ("xattn_vlm.convert", "--preset"),
}


def run(*args, timeout=300):
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)  # as a user's shell has it: the CLI chooses
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env)


def run_all(commands):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return list(pool.map(lambda args: run(*args), commands))


@pytest.fixture(scope="module")
def help_and_bad_flag():
  modules = [module for module, _ in ENTRY_POINTS.values()]
  results = run_all([(m, "--help") for m in modules] + [(m, "--no_such_flag=1") for m in modules])
  return dict(zip(ENTRY_POINTS, zip(results[:len(modules)], results[len(modules):])))


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_help_exits_0_with_the_usage(help_and_bad_flag, name):
  shown, _ = help_and_bad_flag[name]
  module, flag = ENTRY_POINTS[name]
  assert shown.returncode == 0, shown.stderr[-2000:]
  assert f"python -m {module}" in shown.stdout and flag in shown.stdout
  assert "--verbosity" in shown.stdout


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_a_bad_flag_is_one_line_and_exit_2(help_and_bad_flag, name):
  _, bad = help_and_bad_flag[name]
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert bad.stderr.splitlines() == [
      f"xattn-{name}: error: Unknown command line flag 'no_such_flag'"]


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_console_script_is_installed(name):
  script = pathlib.Path(sys.executable).parent / f"xattn-{name}"
  assert script.is_file(), f"{script} missing: reinstall the package (pip install -e .)"


def test_bad_input_is_one_line_and_verbosity_shows_the_traceback(tmp_path):
  missing = tmp_path / "missing.png"
  args = ("xattn_vlm.prompt", "--config=tiny", "--text=<image>A photo of", f"--image={missing}")
  quiet, verbose, no_checkpoint = run_all([
      args, (*args, "--verbosity=1"),
      ("xattn_vlm.evaluate", f"--checkpoint={tmp_path}", f"--output_dir={tmp_path / 'out'}")])
  assert quiet.returncode == 2
  (line,) = quiet.stderr.splitlines()
  assert line.startswith("xattn-prompt: error: prompt 0: image 0") and str(missing) in line
  assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr
  assert no_checkpoint.returncode == 2
  assert no_checkpoint.stderr.splitlines() == [
      f"xattn-evaluate: error: --checkpoint={str(tmp_path)!r} holds no checkpoint: give the "
      "workdir of a flamingo-stage training run or a converted model"]


def test_console_is_quiet_and_the_log_file_has_the_details(tmp_path):
  """A job's console holds its output (and warnings); library INFO records and TPU probing go
  nowhere near it, and the INFO records are in <dir>/logs/."""
  image = tmp_path / "cat.png"
  PIL.Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)
  result, summary = run_all([
      ("xattn_vlm.prompt", "--config=tiny", "--text=<image>A photo of", f"--image={image}",
       "--max_new_tokens=3"),
      ("xattn_vlm.summary", "--configs=tiny")])
  for done in (result, summary):
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TPU" not in done.stderr and "tpu" not in done.stderr
    assert not [line for line in done.stderr.splitlines() if line[:1] == "I" or "INFO" in line]
  assert len(result.stdout.splitlines()) == 1
  assert summary.stdout.splitlines()[2].startswith("| tiny | 22.3k |")


def test_an_error_in_a_config_file_is_one_line_without_its_traceback():
  """ml_collections puts the config file's traceback into its flag error; only the error's own
  line is shown."""
  result = run("xattn_vlm.train", "--config=experiments/tiny_test.py:nonsense=1",
               "--workdir=/tmp/unused")
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
      "xattn-train: error: flag --config=experiments/tiny_test.py:nonsense=1: config preset "
      "'nonsense=1': unknown setting 'nonsense'; expected one of ['stage']"]
