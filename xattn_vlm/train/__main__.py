"""``python -m xattn_vlm.train --config=experiments/<name>.py[:preset] --workdir=DIR``.

Trains one stage (``config.stage``) with the trainer, resuming from the newest checkpoint in
DIR. Dotted overrides (``--config.total_steps=20``) apply on top of the file; an unknown key fails
at start. ``--multiprocess`` joins a multi-process run first (``distributed.initialize``:
TPU pods, SLURM, or the coordinator settings a launcher puts in the environment). The log is in
DIR/logs/, metrics in DIR/metrics.jsonl and DIR/tensorboard/.
"""

import logging

from absl import flags
import jax
from ml_collections import config_flags

from xattn_vlm import cli
from xattn_vlm import distributed
from xattn_vlm.train import trainer

_log = logging.getLogger(__name__)

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
flags.DEFINE_bool("multiprocess", False, "Initialise jax.distributed before training.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def train() -> None:
  if "stages" in FLAGS.config:
    raise ValueError(
        f"--config holds a recipe of several stages ({', '.join(FLAGS.config.stages)}), not one "
        "training run: run it with `python -m xattn_vlm.recipe`, or pick one stage with "
        "--config=FILE:STAGE")
  if FLAGS.multiprocess:
    distributed.initialize()
  _log.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  trainer.train(FLAGS.config, FLAGS.workdir)


def main() -> None:
  cli.run(train, name="train", doc=__doc__, module=__name__, log_dir=lambda: FLAGS.workdir,
          training=True)


if __name__ == "__main__":
  main()
