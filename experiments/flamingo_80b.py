"""Flamingo-80B (Alayrac et al. 2022): Chinchilla-70B-shaped frozen LM, a gated block every 7th
layer, a 6-layer resampler, 320px images; M3W-style interleaved documents (weight 1.0) and
image-text pairs (0.2, ALIGN/LTIP-like); AdamW, warmup then constant 1e-4.

COMMAND (TPU v5p-2048, 1024 chips: run on every host of the pod; paths are yours):
  python -m xattn_vlm.train --multiprocess --config=experiments/flamingo_80b.py:mesh=tpu \
      --workdir=gs://BUCKET/flamingo_80b --config.data.tokenizer=/ckpt/lm \
      --config.init.lm_hf_path=/ckpt/lm --config.init.vision_hf_path=/ckpt/vit \
      --config.data.datasets.interleaved.path=/data/m3w \
      --config.data.datasets.interleaved.image_root=/data/m3w_images \
      --config.data.datasets.pairs.path=/data/pairs_tars
COMMAND (GPU, 128 nodes x 8 H100 under SLURM, one process per node):
  srun --nodes=128 --ntasks-per-node=1 python -m xattn_vlm.train --multiprocess \
      --config=experiments/flamingo_80b.py:mesh=gpu --workdir=/shared/flamingo_80b [same overrides]
Presets: ``mesh=tpu`` (data -1 x fsdp 128 x tensor 8; add ``slices=N`` for N slices, data over
DCN) or ``mesh=gpu`` (tensor 8 inside a node, fsdp 128 across nodes).
"""

from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs

MESHES = {"tpu": dict(data=-1, fsdp=128, tensor=8), "gpu": dict(data=-1, fsdp=128, tensor=8)}


def get_config(arg=None):
  settings = configs.parse_arg(arg, mesh="tpu", slices=1)
  return configs.paper_config(model_config.flamingo_80b(), MESHES, settings,
                              interleaved_batch=256, pairs_batch=512, steps=500_000)
