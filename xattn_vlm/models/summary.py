"""Parameter counts of a model config, from ``nnx.eval_shape`` (nothing is materialised).

``python -m xattn_vlm.models.summary`` prints the README's table for every preset.
"""

from __future__ import annotations

import math
import sys
import time

import jax
import ml_collections
from flax import nnx

from xattn_vlm.models import config as model_config
from xattn_vlm.models import flamingo


def _size(state) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def count_parameters(config: ml_collections.ConfigDict) -> dict[str, int]:
  """Parameters per part (lm, vision, resampler, gated_blocks, added) and trainable / frozen."""
  model = nnx.eval_shape(lambda: flamingo.Flamingo(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  counts = {part: _size(params[part]) for part in ("lm", "vision", "resampler", "gated_blocks")}
  counts["added"] = _size(params["added_embed"]) + _size(params["added_head"])
  counts["trainable"] = _size(nnx.state(model, flamingo.trainable))
  counts["frozen"] = _size(nnx.state(model, flamingo.frozen))
  return counts


def _human(n: int) -> str:
  return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n / 1e3:,.1f}k"


def main(names: list[str]) -> None:
  print("| config | LM (frozen) | vision (frozen) | resampler | gated blocks | trainable | total | "
        "eval_shape s |")
  print("|---|---|---|---|---|---|---|---|")
  for name in names or sorted(model_config.PRESETS):
    start = time.perf_counter()
    c = count_parameters(model_config.get_model_config(name))
    seconds = time.perf_counter() - start
    row = [c["lm"], c["vision"], c["resampler"], c["gated_blocks"], c["trainable"],
           c["trainable"] + c["frozen"]]
    print(f"| {name} | " + " | ".join(_human(x) for x in row) + f" | {seconds:.1f} |")


if __name__ == "__main__":
  main(sys.argv[1:])
