"""Milestones for the console: a stage started or ended, results written.

Library code calls ``say``; the record goes to the ``xattn_vlm.console`` logger at INFO, so it
lands in the run's log file with everything else, and the entry points (``xattn_vlm.cli``) also
print it plainly on stdout, where the libraries' own INFO records never appear.
"""

from __future__ import annotations

import logging
from typing import TextIO

LOGGER = logging.getLogger("xattn_vlm.console")
_stdout_handler: logging.Handler | None = None


def say(message: str) -> None:
  LOGGER.info(message)


def attach(stream: TextIO) -> None:
  """Prints every milestone on ``stream`` as a plain line (once, however often it is called)."""
  global _stdout_handler
  if _stdout_handler is not None:
    return
  _stdout_handler = logging.StreamHandler(stream)
  _stdout_handler.setFormatter(logging.Formatter("%(message)s"))
  LOGGER.addHandler(_stdout_handler)
  LOGGER.setLevel(logging.INFO)
