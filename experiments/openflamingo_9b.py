"""OpenFlamingo-9B (Awadalla et al. 2023): MPT-7B-shaped frozen LM (a gated block every 4th
layer), CLIP ViT-L/14 at 224px, a 6-layer resampler; MMC4 documents (weight 1.0, up to 6 images)
and LAION pairs (0.2, batch twice MMC4's); AdamW, warmup then constant 1e-4, weight decay 0.1 on
the gated blocks only, clip 1.0.

COMMAND (GPU, 8 nodes x 8 H100 under SLURM, as OpenFlamingo trained on 64 GPUs):
  srun --nodes=8 --ntasks-per-node=1 python -m xattn_vlm.train --multiprocess \
      --config=experiments/openflamingo_9b.py:mesh=gpu --workdir=/shared/openflamingo_9b \
      --config.data.tokenizer=/ckpt/mpt-7b --config.init.lm_hf_path=/ckpt/mpt-7b \
      --config.init.vision_hf_path=/ckpt/clip-vit-large-patch14 \
      --config.data.datasets.interleaved.path=/data/mmc4 \
      --config.data.datasets.interleaved.image_root=/data/mmc4_images \
      --config.data.datasets.pairs.path=/data/laion_tars
COMMAND (TPU v5p-128, 64 chips: on every host): the same with ``:mesh=tpu`` and a gs:// workdir.
Presets: ``mesh=gpu`` (tensor 8 in a node, fsdp 8) or ``mesh=tpu`` (fsdp 16 x tensor 4);
``slices=N`` puts data over DCN.
"""

from xattn_vlm import special_tokens
from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs

MESHES = {"tpu": dict(data=-1, fsdp=16, tensor=4), "gpu": dict(data=-1, fsdp=8, tensor=8)}


def get_config(arg=None):
  settings = configs.parse_arg(arg, mesh="gpu", slices=1)
  config = configs.paper_config(model_config.openflamingo_9b(), MESHES, settings,
                                interleaved_batch=256, pairs_batch=512, steps=200_000)
  config.data.max_images = 6
  # Training loads MPT-7B's own table (50432 rows, padded beyond its tokenizer) and adds the special
  # tokens in the order the trainer's tokenizer does; the preset's cut vocabulary and OpenFlamingo's
  # order are for importing the published checkpoint (models.pretrained.load_openflamingo).
  config.model.lm.vocab_size = 50432
  config.model.added_tokens = special_tokens.DEFAULT_ADDED_TOKENS
  return config
