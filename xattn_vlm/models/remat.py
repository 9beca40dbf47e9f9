"""Rematerialisation by policy name (``config.model.remat``): what each transformer block keeps
from its forward pass for the backward pass, traded against recomputing it there.

  ``none``: no remat; a block keeps every activation (least compute, most memory).
  ``full``: a block keeps only its inputs and recomputes the rest (least memory, one more
    forward pass).
  ``dots_saveable``: keeps every matmul output (projections and attention scores), recomputes
    the cheap elementwise work between them (norms, activations, softmax).
  ``dots_with_no_batch_dims_saveable``: keeps the matmuls with weights only, recomputes the
    attention scores and probabilities, whose memory grows with the square of the length.

The booleans of older configs still work: ``True`` is ``full``, ``False`` is ``none``.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import jax
from flax import nnx

POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
NAMES = ("none", *POLICIES)

F = TypeVar("F", bound=Callable)


def policy_name(remat: str | bool) -> str:
  """``remat`` as a checked policy name (a bool mapped to ``full`` / ``none``)."""
  if isinstance(remat, bool):
    return "full" if remat else "none"
  if remat not in NAMES:
    raise ValueError(f"config.model.remat: expected one of {NAMES} (or a bool), got {remat!r}")
  return remat


def rematerialise(fn: F, remat: str | bool) -> F:
  """``fn`` (a block's forward) under ``nnx.remat`` with the named policy; ``fn`` for ``none``."""
  name = policy_name(remat)
  return fn if name == "none" else nnx.remat(fn, policy=POLICIES[name], graph_updates=False)
