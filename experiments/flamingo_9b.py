"""Flamingo-9B (Alayrac et al. 2022): a 7B frozen LM (40 x 4096), a gated block every 4th layer,
a 6-layer resampler, 320px images; interleaved documents (1.0) and image-text pairs (0.2).

COMMAND (TPU v5p-256, 128 chips: on every host):
  python -m xattn_vlm.train --multiprocess --config=experiments/flamingo_9b.py:mesh=tpu \
      --workdir=gs://BUCKET/flamingo_9b --config.data.tokenizer=/ckpt/lm \
      --config.init.lm_hf_path=/ckpt/lm --config.init.vision_hf_path=/ckpt/vit \
      --config.data.datasets.interleaved.path=/data/m3w \
      --config.data.datasets.interleaved.image_root=/data/m3w_images \
      --config.data.datasets.pairs.path=/data/pairs_tars
COMMAND (GPU, 16 nodes x 8 H100 under SLURM):
  srun --nodes=16 --ntasks-per-node=1 python -m xattn_vlm.train --multiprocess \
      --config=experiments/flamingo_9b.py:mesh=gpu --workdir=/shared/flamingo_9b [same overrides]
Presets: ``mesh=tpu`` (fsdp 32 x tensor 4), ``mesh=gpu`` (tensor 8 in a node, fsdp 16);
``slices=N`` puts data over DCN.
"""

from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs

MESHES = {"tpu": dict(data=-1, fsdp=32, tensor=4), "gpu": dict(data=-1, fsdp=16, tensor=8)}


def get_config(arg=None):
  settings = configs.parse_arg(arg, mesh="tpu", slices=1)
  return configs.paper_config(model_config.flamingo_9b(), MESHES, settings,
                              interleaved_batch=256, pairs_batch=512, steps=500_000)
