"""Parameter counts: of any tree of arrays, and of a Flamingo config per part, from
``nnx.eval_shape`` (nothing is materialised)."""

from __future__ import annotations

import math

import jax
import ml_collections
from flax import nnx

from xattn_vlm.models import flamingo

PARTS = ("lm", "vision", "resampler", "gated_blocks", "prefix_projection")


def size(tree) -> int:
  """Elements in every array (or ShapeDtypeStruct) leaf of ``tree``."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_parameters(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameters per part (``PARTS``, 0 for a part the fusion mode does not build, and ``added``:
  the new tokens' rows), trainable and frozen."""
  model = nnx.eval_shape(lambda: flamingo.Flamingo(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  counts = {part: size(params[part]) if part in params else 0 for part in PARTS}  # per mode
  counts["added"] = size(params["added_embed"]) + size(params["added_head"])
  counts["trainable"] = size(nnx.state(model, flamingo.trainable_params(config)))
  counts["frozen"] = size(nnx.state(model, flamingo.frozen_params(config)))
  return counts
