"""``python -m xattn_vlm.build_features --config=experiments/<name>.py[:preset] --output=DIR``

Caches the frozen vision tower's features of the config's Flamingo-stage datasets in a new
directory, for ``--config.data.feature_cache=DIR`` (``train.feature_cache.build_features``):
training then reads them instead of running the tower.
"""

from absl import flags
from ml_collections import config_flags

from xattn_vlm import cli
from xattn_vlm.train import feature_cache

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("output", None, "New directory for the feature cache.")
flags.DEFINE_integer("batch_size", 32, "Images per vision-tower call.")
flags.mark_flags_as_required(["config", "output"])
FLAGS = flags.FLAGS


def build_features() -> None:
  feature_cache.build_features(FLAGS.config, FLAGS.output, batch_size=FLAGS.batch_size)


def main() -> None:
  cli.run(build_features, name="build-features", doc=__doc__, module=__name__,
          log_dir=lambda: FLAGS.output, training=True)


if __name__ == "__main__":
  main()
