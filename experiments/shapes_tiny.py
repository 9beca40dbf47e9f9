"""The miniature Flamingo recipe on the synthetic shapes world: the CPU default, three stages.

COMMAND (from the repository root; all three stages take a few minutes on a 2-core CPU):
  python -m xattn_vlm.train --config=experiments/shapes_tiny.py:lm_pretrain \
      --workdir=runs/shapes_tiny/lm_pretrain
  python -m xattn_vlm.train --config=experiments/shapes_tiny.py:vision_pretrain \
      --workdir=runs/shapes_tiny/vision_pretrain
  python -m xattn_vlm.train --config=experiments/shapes_tiny.py:flamingo \
      --workdir=runs/shapes_tiny/flamingo

1. ``lm_pretrain``: a 2-layer GPT-2-style LM learns the world's text (captions, descriptions, QA).
2. ``vision_pretrain``: a 2-layer ViT learns image-caption alignment against a small causal text
   tower (CLIP's symmetric InfoNCE).
3. ``flamingo``: both towers are loaded from the runs above (``config.init.*_workdir``) and
   frozen; the resampler, gated cross-attention blocks and ``<image>``/``<|endofchunk|>`` rows
   train on interleaved documents (weight 1.0), captions (0.2) and VQA (0.2).
Preset: the stage, optionally with ``steps=N`` (e.g. ``:flamingo,steps=20``, a smoke run).
"""

import ml_collections

from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs

RUNS = "runs/shapes_tiny"
STEPS = {"lm_pretrain": 400, "vision_pretrain": 200, "flamingo": 300}


def model() -> ml_collections.ConfigDict:
  """LM 2 x 64 (vocab = the shapes-world BPE's 1024), ViT 32px/8 2 x 64, resampler 1 x 8
  latents, a gated block before each LM layer."""
  return model_config.flamingo_config(
      lm=model_config.lm_config(family="gpt2", vocab_size=1024, num_layers=2, embed_dim=64,
                                num_heads=4, mlp_dim=256, max_length=64),
      vision=model_config.vision_config(image_size=32, patch_size=8, width=64, num_layers=2,
                                        num_heads=4, mlp_dim=256),
      resampler=model_config.resampler_config(depth=1, num_latents=8, num_heads=4, head_dim=16,
                                              ff_mult=2, max_num_media=4),
      xattn=model_config.xattn_config(every_n_layers=1, num_heads=4, head_dim=16, ff_mult=2))


def get_config(arg=None):
  settings = configs.parse_arg(arg, stage="flamingo", steps=0)
  config = configs.base_config()
  config.stage = settings.stage
  config.model = model()
  config.contrastive.text = model_config.lm_config(
      family="gpt2", vocab_size=1024, num_layers=2, embed_dim=64, num_heads=4, mlp_dim=256,
      max_length=64)
  config.contrastive.embed_dim = 64
  config.init.lm_workdir = f"{RUNS}/lm_pretrain"
  config.init.vision_workdir = f"{RUNS}/vision_pretrain"
  config.data.max_tokens = 64
  config.data.max_images = 3
  shapes = dict(num_records=100_000)
  config.data.datasets = {
      "lm_pretrain": dict(text=configs.dataset("shapes_text", batch_size=16, **shapes)),
      "vision_pretrain": dict(pairs=configs.dataset("shapes", batch_size=32, kind="pair",
                                                    **shapes)),
      "flamingo": dict(
          documents=configs.dataset("shapes", batch_size=8, weight=1.0, kind="interleaved",
                                    max_images=3, **shapes),
          captions=configs.dataset("shapes", batch_size=8, weight=0.2, kind="caption", **shapes),
          vqa=configs.dataset("shapes", batch_size=8, weight=0.2, kind="vqa", **shapes)),
  }[settings.stage]
  config.optimizer.learning_rate = 3e-3 if settings.stage == "flamingo" else 1e-3
  config.optimizer.warmup_steps = 20
  if settings.stage != "flamingo":
    config.optimizer.schedule = "cosine"
    config.optimizer.decay_pattern = "kernel|embedding"
  config.total_steps = settings.steps or STEPS[settings.stage]
  config.checkpoint.every_steps = 100
  config.log_every_steps = 20
  return config
