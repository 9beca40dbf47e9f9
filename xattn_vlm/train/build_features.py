"""``python -m xattn_vlm.train.build_features --config=experiments/<name>.py[:preset] --output=DIR``

Caches the frozen vision tower's features of the config's Flamingo-stage datasets in a new
directory, for ``--config.data.feature_cache=DIR`` (``feature_cache.build_features``).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from xattn_vlm import host
from xattn_vlm.train import feature_cache

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("output", None, "New directory for the feature cache.")
flags.DEFINE_integer("batch_size", 32, "Images per vision-tower call.")
flags.mark_flags_as_required(["config", "output"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if host.REUSE_FREED_MEMORY.value:
    host.reuse_freed_memory()
  feature_cache.build_features(FLAGS.config, FLAGS.output, batch_size=FLAGS.batch_size)


if __name__ == "__main__":
  app.run(main)
