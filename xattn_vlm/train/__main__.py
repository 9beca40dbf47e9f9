"""``python -m xattn_vlm.train --config=experiments/<name>.py[:preset] --workdir=DIR``.

Dotted overrides (``--config.total_steps=20``) apply on top of the file; an unknown key fails at
start. ``--multiprocess`` joins a multi-process run first (``train.distributed.initialize``:
TPU pods, SLURM, or the coordinator settings a launcher puts in the environment).
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import jax

from xattn_vlm import host
from xattn_vlm.train import distributed
from xattn_vlm.train import trainer

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("multiprocess", False, "Initialise jax.distributed before training.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if host.REUSE_FREED_MEMORY.value:
    host.reuse_freed_memory()
  if "stages" in FLAGS.config:
    raise app.UsageError(
        f"--config holds a recipe of several stages ({', '.join(FLAGS.config.stages)}), not one "
        "training run: run it with `python -m xattn_vlm.recipe`, or pick one stage with "
        "--config=FILE:STAGE")
  if FLAGS.multiprocess:
    distributed.initialize()
  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
