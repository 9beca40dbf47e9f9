"""Joining a multi-process run: ``jax.distributed.initialize`` with settings from the environment.

JAX reads ``JAX_COORDINATOR_ADDRESS`` and ``JAX_LOCAL_DEVICE_IDS`` itself and detects Cloud TPU,
SLURM and Open MPI jobs. It does not read a process count or id from the environment, which a
plain set of processes needs (``launch/local_multiprocess.sh``, ``launch/slurm_task.sh``, any
other launcher); this module adds:

  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``: set both, or neither (then JAX detects them).
  ``JAX_HEARTBEAT_TIMEOUT_SECONDS``: after this long without a heartbeat from a process, the
    others stop with an error instead of waiting in a collective (JAX's default: 100).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax

NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
HEARTBEAT_TIMEOUT = "JAX_HEARTBEAT_TIMEOUT_SECONDS"


def _int(environ: Mapping[str, str], name: str, minimum: int) -> int:
  value = environ[name]
  try:
    number = int(value)
  except ValueError:
    number = minimum - 1
  if number < minimum:
    raise ValueError(f"environment variable {name}: expected an integer >= {minimum}, got "
                     f"{value!r}")
  return number


def initialize_args(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
  """The keyword arguments for ``jax.distributed.initialize`` that ``environ`` sets."""
  given = [name for name in (NUM_PROCESSES, PROCESS_ID) if name in environ]
  if len(given) == 1:
    missing = PROCESS_ID if given == [NUM_PROCESSES] else NUM_PROCESSES
    raise ValueError(f"environment variable {given[0]} is set but {missing} is not; set both "
                     f"(a launcher's explicit processes) or neither (cluster auto-detection)")
  args = {}
  if given:
    args["num_processes"] = _int(environ, NUM_PROCESSES, 1)
    args["process_id"] = _int(environ, PROCESS_ID, 0)
    if args["process_id"] >= args["num_processes"]:
      raise ValueError(f"environment variable {PROCESS_ID}: expected < {NUM_PROCESSES}="
                       f"{args['num_processes']}, got {args['process_id']}")
  if HEARTBEAT_TIMEOUT in environ:
    args["heartbeat_timeout_seconds"] = _int(environ, HEARTBEAT_TIMEOUT, 1)
  return args


def initialize() -> None:
  """Joins the run the environment describes (see the module docstring); call before any JAX
  computation."""
  jax.distributed.initialize(**initialize_args())
