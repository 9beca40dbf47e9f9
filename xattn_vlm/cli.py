"""The one ``main`` of every entry point: flags, logging, the host, and bad input as one line.

Each entry point (``python -m xattn_vlm.<name>`` and its console script ``xattn-<name>``) defines
its flags at import and calls ``run`` with the function that does the job. ``run``

* parses the flags: ``--help`` prints the usage and exits 0; a flag error is one line on stderr
  and exit code 2;
* keeps JAX off a TPU runtime this host does not have (an installed libtpu otherwise prints
  errors on every start of a CPU or GPU host), unless ``JAX_PLATFORMS`` says otherwise;
* sends every log record (INFO and up) and Python warnings to ``<dir>/logs/`` when the job has a
  directory, and shows on the console only ``console.say`` milestones, this package's warnings
  and any library's errors; ``--verbosity=1`` shows every log record on the console too;
* sets up a training host (``training=True``: ``train.host.reuse_freed_memory`` unless
  ``--noreuse_freed_memory``);
* turns a user error (``USER_ERRORS``: bad arguments, paths, files, settings) into one line on
  stderr and exit code 2; ``--verbosity=1`` shows its traceback instead.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import socket
import sys
from typing import Callable, Sequence

from absl import flags
from absl import logging as absl_logging

from xattn_vlm import console

USER_ERRORS = (ValueError, OSError, KeyError, NotImplementedError)
EXIT_USER_ERROR = 2
LOGS = "logs"
HELP_FLAGS = ("--help", "-h", "--helpshort", "-?", "--helpfull")
FLAGS = flags.FLAGS


# Errors whose message says everything; others are named by their type too.
_SELF_EXPLAINED = (ValueError, KeyError, FileNotFoundError, flags.Error)


# ml_collections puts a config file's whole traceback into the flag error after this.
_CONFIG_FILE_ERROR = "Error whilst parsing config file:"


def _message(error: BaseException) -> str:
  text = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else str(error)
  if _CONFIG_FILE_ERROR in str(text):
    flag, _, trace = str(text).partition(_CONFIG_FILE_ERROR)
    text = flag + trace.strip().splitlines()[-1].removeprefix("ValueError: ")
  text = " ".join(str(text).split()) or type(error).__name__
  return text if isinstance(error, _SELF_EXPLAINED) else f"{type(error).__name__}: {text}"


def fail(name: str, error: BaseException | str) -> None:
  """Prints ``xattn-<name>: error: ...`` on one line of stderr and exits with code 2."""
  text = error if isinstance(error, str) else _message(error)
  print(f"xattn-{name}: error: {text}", file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _verbose(argv: Sequence[str]) -> bool:
  """Whether ``--verbosity`` (or ``-v``) >= 1 is among the arguments, read before parsing so a
  flag error can show its traceback too."""
  for i, arg in enumerate(argv):
    for prefix in ("--verbosity", "-v"):
      if arg == prefix and i + 1 < len(argv):
        value = argv[i + 1]
      elif arg.startswith(prefix + "="):
        value = arg.partition("=")[2]
      else:
        continue
      try:
        return int(value) >= 1
      except ValueError:
        return False
  return False


def _usage(doc: str | None, module: str, full: bool) -> str:
  key = sys.argv[0] if module == "__main__" else module
  help_text = FLAGS.get_help() if full else FLAGS.module_help(key)
  if not full and "reuse_freed_memory" in FLAGS:
    help_text += "\n" + FLAGS.module_help(__name__)
  common = ("\n\nCommon flags:\n  --verbosity: 1 shows every log record and the traceback of an "
            "error on the console\n    (default: 0: warnings and milestones only; the full log "
            "is in <dir>/logs/)")
  return f"{(doc or '').strip()}\n\nFlags:\n{help_text}{common}\n"


def parse(name: str, argv: Sequence[str], doc: str | None, module: str) -> list[str]:
  """Parses ``argv`` into ``FLAGS``; prints the usage for ``--help`` (exit 0), a flag error as
  one line (exit 2). Returns the positional arguments, which no entry point takes."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    print(_usage(doc, module, full="--helpfull" in argv[1:]))
    sys.exit(0)
  try:
    rest = FLAGS(list(argv))
  except Exception as error:  # pylint: disable=broad-except  # flag values are user input
    if _verbose(argv):
      raise
    fail(name, error)
  if len(rest) > 1:
    fail(name, f"unexpected arguments {rest[1:]}: every argument is a --flag (see --help)")
  return rest


def skip_absent_tpu() -> None:
  """Leaves the TPU runtime out when this host has no TPU chip and ``JAX_PLATFORMS`` is unset.

  An installed libtpu (``pip install 'jax[tpu]'``, which ``plan`` needs on any host) is probed at
  JAX's first computation and prints errors on a host without TPUs; GPUs are still used.
  """
  if os.environ.get("JAX_PLATFORMS"):
    return
  from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    return
  rocm = any(d.metadata["Name"].startswith("jax-rocm") for d in importlib.metadata.distributions())
  jax.config.update("jax_platforms", "cuda,rocm,cpu" if rocm else "cuda,cpu")


def _ours_or_serious(record: logging.LogRecord) -> bool:
  """Our own warnings, and every library's errors (their warnings stay in the log file)."""
  return record.name.startswith("xattn_vlm") or record.levelno >= logging.ERROR


def log_file(log_dir: str, name: str) -> str:
  """Where ``run`` writes the job's log: ``<log_dir>/logs/<name>.<host>.<pid>.log``."""
  return os.path.join(log_dir, LOGS, f"{name}.{socket.gethostname()}.{os.getpid()}.log")


def setup_logging(name: str, log_dir: str | None, verbose: bool) -> str | None:
  """Log records to a file (when ``log_dir`` is a local directory), warnings and milestones to
  the console; returns the log file's path."""
  absl_logging.use_absl_handler()
  root = logging.getLogger()
  root.setLevel(logging.DEBUG if absl_logging.get_verbosity() > 1 else logging.INFO)
  to_console = absl_logging.get_absl_handler()
  to_console.setLevel(logging.INFO if verbose else logging.WARNING)
  if not verbose:
    to_console.addFilter(_ours_or_serious)
  logging.captureWarnings(True)
  path = None
  handlers = []
  if log_dir and "://" not in log_dir:
    path = log_file(log_dir, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    to_file = logging.FileHandler(path, encoding="utf-8")
    to_file.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname).1s %(name)s:%(lineno)d] %(message)s"))
    root.addHandler(to_file)
    handlers.append(to_file)
  # Python warnings are library chatter: the file keeps them, the console only when verbose.
  warnings_logger = logging.getLogger("py.warnings")
  warnings_logger.propagate = verbose
  for handler in handlers:
    warnings_logger.addHandler(handler)
  if not verbose:
    console.attach(sys.stdout)
  return path


def run(job: Callable[[], None], *, name: str, doc: str | None, module: str,
        log_dir: Callable[[], str | None] = lambda: None, training: bool = False,
        skip_tpu: bool = True, argv: Sequence[str] | None = None) -> None:
  """Runs an entry point's ``job`` (see the module docstring).

  Args:
    job: reads ``FLAGS`` and does the work.
    name: the entry point's name (``train``: console script ``xattn-train``).
    doc: the usage text (the entry module's docstring).
    module: the entry module's ``__name__`` (which flags ``--help`` lists).
    log_dir: after parsing, the directory whose ``logs/`` holds the log file (None: no file).
    training: a training process: defines ``--reuse_freed_memory`` and applies it.
    skip_tpu: ``skip_absent_tpu`` (``plan`` compiles for TPUs on any host and chooses itself).
  """
  argv = list(sys.argv if argv is None else argv)
  if training and "reuse_freed_memory" not in FLAGS:
    flags.DEFINE_bool("reuse_freed_memory", True,
                      "Keep the memory XLA:CPU frees and run each step on the calling thread "
                      "(xattn_vlm.train.host.reuse_freed_memory): faster training steps on CPU.")
  parse(name, argv, doc, module)
  verbose = FLAGS.verbosity >= 1
  try:
    if training and FLAGS.reuse_freed_memory:
      from xattn_vlm.train import host  # pylint: disable=import-outside-toplevel
      host.reuse_freed_memory()
    if skip_tpu:
      skip_absent_tpu()
    setup_logging(name, log_dir(), verbose)
    job()
  except USER_ERRORS as error:
    if verbose:
      raise
    fail(name, error)
