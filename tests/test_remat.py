"""Remat policies by name (``config.model.remat``): each one only changes what the backward pass
recomputes, so losses and gradients equal those without remat; a bad name fails clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xattn_vlm.models import config as model_config
from xattn_vlm.models import remat as remat_lib
from xattn_vlm.models.contrastive import DualEncoder
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.train import stages

CFG = model_config.tiny()
IMG, EOC = CFG.lm.vocab_size, CFG.lm.vocab_size + 1
SIZE = CFG.vision.image_size
IDS = jnp.array([[5, IMG, 7, 8, EOC, IMG, 9, 10], [IMG, 12, 13, EOC, 3, IMG, 16, 17]])
FLAMINGO_BATCH = {
    "images": jax.random.normal(jax.random.key(0), (2, 2, 1, SIZE, SIZE, 3)),
    "input_ids": IDS,
    "attention_mask": jnp.ones_like(IDS),
    "labels": IDS,
    "media_mask": jnp.ones((2, 2), bool),
}
PAIRS_BATCH = {
    "images": jax.random.normal(jax.random.key(1), (3, 1, 1, SIZE, SIZE, 3)),
    "input_ids": jnp.array([[5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 13]]),
    "attention_mask": jnp.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]),
}


def _flamingo(remat):
  cfg = model_config.tiny()
  cfg.remat = remat
  model = Flamingo(cfg, rngs=nnx.Rngs(0))
  for block in model.gated_blocks:  # open the gates so the gated blocks shape the loss
    block.attn_gate[...] = jnp.asarray(0.5)
    block.ffw_gate[...] = jnp.asarray(0.5)
  return model, stages.FLAMINGO.loss_sum, FLAMINGO_BATCH


def _dual_encoder(remat):
  text = model_config.lm_config(family="gpt2", vocab_size=32, num_layers=2, embed_dim=16,
                                num_heads=2, mlp_dim=32, max_length=8)
  model = DualEncoder(CFG.vision, text, embed_dim=8, init_temperature=0.07, rngs=nnx.Rngs(0),
                      remat=remat)
  return model, stages.VISION_PRETRAIN.loss_sum, PAIRS_BATCH


def _loss_and_grads(build, remat):
  model, loss_sum, batch = build(remat)
  loss, grads = nnx.jit(nnx.value_and_grad(loss_sum))(model, batch)
  return float(loss), jax.tree.leaves(grads)


@pytest.mark.parametrize("build", [_flamingo, _dual_encoder], ids=["flamingo", "dual_encoder"])
def test_every_policy_gives_the_loss_and_grads_of_no_remat(build):
  want_loss, want_grads = _loss_and_grads(build, "none")
  assert any(np.abs(g).max() > 0 for g in want_grads)
  for name in remat_lib.POLICIES:  # every name but "none"
    loss, grads = _loss_and_grads(build, name)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6, atol=1e-6, err_msg=str(name))
    assert len(grads) == len(want_grads)
    for got, want in zip(grads, want_grads):
      # float32 rounding of a gradient entry scales with its tensor's largest entries (the sums
      # that formed it), not with the entry itself: a tiny entry of a large tensor may move more.
      scale = max(1.0, float(np.abs(want).max()))
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale, err_msg=str(name))


def test_booleans_name_full_and_none_and_a_bad_name_raises():
  assert remat_lib.policy_name(True) == "full" and remat_lib.policy_name(False) == "none"
  with pytest.raises(ValueError, match=r"config\.model\.remat: expected one of .*'none', 'full', "
                                       r"'dots_saveable'.*got 'dots'"):
    _flamingo("dots")
