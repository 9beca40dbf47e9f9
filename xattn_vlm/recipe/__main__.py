"""``python -m xattn_vlm.recipe --config=experiments/shapes_tiny.py[:smoke] --workdir=DIR``.

Trains the recipe's stages one after the other, evaluates and writes the report into DIR
(``DIR/report.md``). ``--seeds=0,1,2`` runs the whole recipe once per seed into
``DIR/seed_<s>`` and writes a combined report over the seeds into DIR. Dotted overrides
(``--config.eval.trials=1``) apply on top of the file. A rerun resumes each stage and skips
finished ones. The log is in DIR/logs/.
"""

from absl import flags
from ml_collections import config_flags

from xattn_vlm import cli
from xattn_vlm import recipe

config_flags.DEFINE_config_file("config", None, "Recipe config file[:preset].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for the stages, evaluation and report.")
flags.DEFINE_string("seeds", None, "Comma-separated seeds, e.g. 0,1,2 (default: the config's "
                    "seeds, else 0).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def run_recipe() -> None:
  recipe.run(FLAGS.config, FLAGS.workdir, FLAGS.seeds)


def main() -> None:
  cli.run(run_recipe, name="recipe", doc=__doc__, module=__name__, log_dir=lambda: FLAGS.workdir,
          training=True)


if __name__ == "__main__":
  main()
