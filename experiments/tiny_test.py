"""The smallest config of every stage, for tests: 16x16 images, a 2-layer LM, a few steps.

COMMAND:
  python -m xattn_vlm.train --config=experiments/tiny_test.py:flamingo --workdir=/tmp/tiny_test
Presets: ``lm_pretrain``, ``vision_pretrain``, ``flamingo`` (the stage).
"""

from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs


def get_config(arg=None):
  settings = configs.parse_arg(arg, stage="flamingo")
  config = configs.base_config()
  config.stage = settings.stage
  config.model = model_config.tiny()
  config.model.lm.vocab_size = 1024  # the shapes-world tokenizer's vocabulary
  config.contrastive.text.vocab_size = 1024
  config.data.max_tokens = 32
  config.data.max_images = 2
  config.data.datasets = {
      "lm_pretrain": dict(
          text=configs.dataset("shapes_text", batch_size=8, num_records=256)),
      "vision_pretrain": dict(
          pairs=configs.dataset("shapes", batch_size=8, kind="pair", num_records=256)),
      "flamingo": dict(
          docs=configs.dataset("shapes", batch_size=8, weight=1.0, kind="interleaved",
                               num_records=256, max_images=2),
          pairs=configs.dataset("shapes", batch_size=8, weight=0.2, kind="caption",
                                num_records=256)),
  }[settings.stage]
  config.optimizer.learning_rate = 1e-3
  config.total_steps = 3
  config.checkpoint.every_steps = 2
  config.log_every_steps = 1
  config.peak_flops_per_device = 1e11
  config.progress_bar = False
  config.plots = False
  return config
