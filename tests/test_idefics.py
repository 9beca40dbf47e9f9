"""IDEFICS checkpoints -> Flamingo (``models.pretrained.load_idefics``), against transformers'
``IdeficsForVisionText2Text``: a tiny random model (q/k norms in the resampler and the gated blocks,
a gated block every 2nd layer from layer 0, 2 additional vocabulary rows) saved with
``save_pretrained``, on prompts where text follows ``</s>``: the same logits and the same 20 greedy
tokens; and clear errors for missing or extra tensors and unsupported settings.
"""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

import reference_models as ref
from xattn_vlm.inference import Batch, GenerationConfig, generate_tokens
from xattn_vlm.models import config as model_config
from xattn_vlm.models import pretrained

NEW_TOKENS = 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  torch.set_num_threads(1)
  reference = ref.idefics(tmp_path_factory.mktemp("idefics"))
  model, config = pretrained.load_idefics(reference.checkpoint)
  return reference, model, config


def _theirs_kwargs(inputs):
  ids = inputs["input_ids"]
  return dict(input_ids=torch.from_numpy(ids).long(),
              attention_mask=torch.from_numpy(inputs["attention_mask"]).long(),
              pixel_values=torch.from_numpy(inputs["images"]),
              image_attention_mask=ref.idefics_image_attention_mask(ids, num_images=2))


def _ours(inputs):
  images = np.moveaxis(inputs["images"], 2, -1)[:, :, None]  # [B, T, 1, H, W, C]
  return (jnp.asarray(images), jnp.asarray(inputs["input_ids"]),
          jnp.asarray(inputs["attention_mask"]))


def test_config_follows_the_checkpoint(built):
  _, model, config = built
  assert model.gated_layers == (0, 2)  # before layers 0, n, 2n
  assert (model.media_token_id, model.eoc_token_id) == (ref.IDEFICS_IMAGE, None)
  assert config.xattn.document_end_token_id == ref.IDEFICS_EOS
  assert (config.vision.include_class_token, config.vision.use_post_layernorm) == (True, False)
  assert config.resampler.qk_norm and config.xattn.qk_norm and config.xattn.norm == "rmsnorm"


def test_logits_match_transformers(built):
  reference, model, _ = built
  inputs = ref.idefics_inputs()
  with torch.no_grad():
    theirs = reference.model(**_theirs_kwargs(inputs)).logits.numpy()
  ours = np.asarray(nnx.jit(lambda m, im, ids, mask: m(im, ids, mask))(model, *_ours(inputs)))
  real = inputs["attention_mask"].astype(bool)
  assert ours.shape == theirs.shape and np.abs(theirs[real]).max() > 1.0
  np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


def test_the_prompt_exercises_the_document_end_rule(built):
  """Without IDEFICS's </s> rule the logits part from transformers' right after the first </s>,
  so the comparison above checks the rule."""
  reference, model, _ = built
  inputs = ref.idefics_inputs()
  with torch.no_grad():
    theirs = reference.model(**_theirs_kwargs(inputs)).logits.numpy()
  model.config.xattn.document_end_token_id = None
  try:
    ours = np.asarray(nnx.jit(lambda m, im, ids, mask: m(im, ids, mask))(model, *_ours(inputs)))
  finally:
    model.config.xattn.document_end_token_id = ref.IDEFICS_EOS
  differs = np.abs(ours - theirs).max(-1) > 1e-3
  first_end = list(inputs["input_ids"][0]).index(ref.IDEFICS_EOS)
  assert not differs[0, :first_end + 1].any() and differs[0, first_end + 1]


def test_greedy_generation_matches_transformers(built):
  reference, model, _ = built
  inputs = ref.idefics_inputs()
  prompt = inputs["input_ids"].shape[1]
  with torch.no_grad():
    theirs = reference.model.generate(**_theirs_kwargs(inputs), max_new_tokens=NEW_TOKENS,
                                      do_sample=False, num_beams=1).numpy()[:, prompt:]
  images, ids, mask = _ours(inputs)
  batch = Batch(input_ids=ids, attention_mask=mask, images=images,
                media_mask=jnp.ones(images.shape[:2], bool))
  out = generate_tokens(model, batch, GenerationConfig(max_new_tokens=NEW_TOKENS,
                                                       stop_token_ids=(ref.IDEFICS_EOS,)))
  for row in range(2):
    length = int(out.lengths[row])
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :length]), theirs[row, :length])
  assert int(out.lengths.max()) > 3  # some continuation to compare


def _changed_folder(reference, tmp_path, change):
  folder = tmp_path / "changed"
  shutil.copytree(reference.checkpoint, folder)
  tensors = safetensors.torch.load_file(folder / "model.safetensors")
  change(tensors)
  safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
  return folder


def test_missing_and_extra_tensors_are_named(built, tmp_path):
  reference, _, _ = built

  def change(tensors):
    del tensors["model.gated_cross_attn_layers.1.cross_attn.k_layer_norm.weight"]
    del tensors["lm_head.additional_fc.weight"]
    tensors["model.perceiver_resampler.frame_embs"] = torch.zeros(2, ref.VISION_WIDTH)

  with pytest.raises(ValueError) as error:
    pretrained.load_idefics(_changed_folder(reference, tmp_path, change))
  message = str(error.value)
  for name in ("'model.gated_cross_attn_layers.1.cross_attn.k_layer_norm.weight'",
               "'lm_head.additional_fc.weight'", "no parameter: ['model.perceiver_resampler."
               "frame_embs']", "'gated_blocks.1.attn.k_norm.scale'", "'added_head'"):
    assert name in message


@pytest.mark.parametrize("key, value", [("alpha_type", "vector"), ("use_resampler", False),
                                        ("additional_vocab_size", 3)])
def test_unsupported_settings_are_named(built, key, value):
  hf_config = json.loads((built[0].checkpoint / "config.json").read_text())
  with pytest.raises(NotImplementedError, match=f"idefics config.json sets {key}={value!r}"):
    pretrained.idefics_config_from_hf({**hf_config, key: value})


def test_presets_have_the_published_shapes():
  """idefics_9b/80b as their config.json files give them (LLaMA-7B / -65B, ViT-H/14)."""
  for preset, layers, width, heads, mlp, eps in (("idefics_9b", 32, 4096, 32, 11008, 1e-6),
                                                 ("idefics_80b", 80, 8192, 64, 22016, 1e-5)):
    config = model_config.get_model_config(preset)
    hf = dict(model_type="idefics", vocab_size=32000, additional_vocab_size=2, hidden_size=width,
              intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
              rms_norm_eps=eps, cross_layer_interval=4, qk_layer_norms=True, use_resampler=True,
              vision_config=dict(embed_dim=1280, image_size=224, intermediate_size=5120,
                                 patch_size=14, num_hidden_layers=32, num_attention_heads=16,
                                 hidden_act="gelu"),
              perceiver_config=dict(resampler_n_latents=64, resampler_depth=6,
                                    resampler_n_heads=16, resampler_head_dim=96,
                                    qk_layer_norms_perceiver=True))
    from_hf = pretrained.idefics_config_from_hf(hf, dtype="bfloat16")
    assert from_hf.to_dict() == config.to_dict(), preset
