"""Flamingo-3B (Alayrac et al. 2022): a 1.4B frozen LM (24 x 2048), a gated block before every
layer, a 6-layer resampler, 320px images; interleaved documents (1.0) and image-text pairs (0.2).

COMMAND (TPU v5p-64, 32 chips: on every host):
  python -m xattn_vlm.train --multiprocess --config=experiments/flamingo_3b.py:mesh=tpu \
      --workdir=gs://BUCKET/flamingo_3b --config.data.tokenizer=/ckpt/lm \
      --config.init.lm_hf_path=/ckpt/lm --config.init.vision_hf_path=/ckpt/vit \
      --config.data.datasets.interleaved.path=/data/m3w \
      --config.data.datasets.interleaved.image_root=/data/m3w_images \
      --config.data.datasets.pairs.path=/data/pairs_tars
COMMAND (GPU, 4 nodes x 8 H100 under SLURM):
  srun --nodes=4 --ntasks-per-node=1 python -m xattn_vlm.train --multiprocess \
      --config=experiments/flamingo_3b.py:mesh=gpu --workdir=/shared/flamingo_3b [same overrides]
Presets: ``mesh=tpu`` (fsdp 16), ``mesh=gpu`` (fsdp 8 in a node); ``slices=N`` puts data over DCN.
"""

from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs

MESHES = {"tpu": dict(data=-1, fsdp=16, tensor=1), "gpu": dict(data=-1, fsdp=8, tensor=1)}


def get_config(arg=None):
  settings = configs.parse_arg(arg, mesh="tpu", slices=1)
  return configs.paper_config(model_config.flamingo_3b(), MESHES, settings,
                              interleaved_batch=256, pairs_batch=512, steps=500_000)
