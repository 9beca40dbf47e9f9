"""``python -m xattn_vlm.summary [--configs=NAME,...]``: parameter counts of the model presets.

Prints a Markdown table (the one in docs/model.md): for each preset of
``xattn_vlm.models.config``, the frozen LM and vision tower, the trained resampler and gated
blocks, what trains and the total, counted from ``nnx.eval_shape`` (nothing is materialised, so
even the 80B preset takes seconds).
"""

from __future__ import annotations

from absl import flags

from xattn_vlm import cli
from xattn_vlm.models import config as model_config
from xattn_vlm.models import parameters

_CONFIGS = flags.DEFINE_list("configs", [], "Model presets to count (default: all).")
COLUMNS = ("config", "LM (frozen)", "vision (frozen)", "resampler", "gated blocks", "trainable",
           "total")


def _human(n: int) -> str:
  return f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n / 1e3:,.1f}k"


def table(names: list[str]) -> str:
  """The Markdown table of parameter counts of the presets ``names``."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for name in names:
    c = parameters.count_parameters(model_config.get_model_config(name))
    row = [c["lm"], c["vision"], c["resampler"], c["gated_blocks"], c["trainable"],
           c["trainable"] + c["frozen"]]
    lines.append(f"| {name} | " + " | ".join(_human(x) for x in row) + " |")
  return "\n".join(lines)


def summary() -> None:
  print(table(_CONFIGS.value or list(model_config.PRESETS)))


def main() -> None:
  cli.run(summary, name="summary", doc=__doc__, module=__name__)


if __name__ == "__main__":
  main()
