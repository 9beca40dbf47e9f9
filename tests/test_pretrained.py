"""flamingo_from_pretrained: both towers from local Hugging Face folders, new parts initialised."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from xattn_vlm.models import config as model_config
from xattn_vlm.models import flamingo_from_pretrained


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  torch.manual_seed(0)
  lm_dir = tmp_path_factory.mktemp("gpt2")
  hf_lm = transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
  hf_lm.save_pretrained(lm_dir)
  vision_dir = tmp_path_factory.mktemp("clip")
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      image_size=16, patch_size=8)).save_pretrained(vision_dir)
  return hf_lm, lm_dir, vision_dir


def test_flamingo_from_pretrained_matches_the_hf_lm_at_init(folders):
  hf_lm, lm_dir, vision_dir = folders
  model, cfg = flamingo_from_pretrained(lm_dir, vision_dir, model_config.tiny())
  assert (cfg.lm.vocab_size, cfg.lm.num_layers, cfg.vision.width) == (64, 2, 24)
  ids = np.array([[3, 4, 64, 5, 6, 65, 7]])  # 64 = <image>, 65 = <|endofchunk|>
  images = jnp.ones((1, 1, 1, 16, 16, 3))
  logits = nnx.jit(lambda m, im, i: m(im, i))(model, images, jnp.asarray(ids))
  assert logits.shape == (1, 7, 66)
  # Gates start at 0: on tokens before the first image the logits are GPT-2's.
  with torch.no_grad():
    ref = hf_lm(torch.tensor(ids[:, :2])).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits)[:, :2, :64], ref, rtol=1e-5, atol=1e-5)
