"""``python -m xattn_vlm.recipe --config=experiments/shapes_tiny.py[:smoke] --workdir=DIR``.

Trains the three stages, evaluates and writes the report into ``DIR`` (``DIR/report.md``).
Dotted overrides (``--config.eval.trials=1``) apply on top of the file. A rerun resumes.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from xattn_vlm import host
from xattn_vlm import recipe

config_flags.DEFINE_config_file("config", None, "Recipe config file[:preset].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for the stages, evaluation and report.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if host.REUSE_FREED_MEMORY.value:
    host.reuse_freed_memory()
  recipe.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
