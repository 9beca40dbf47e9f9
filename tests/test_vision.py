"""The CLIP vision tower matches Hugging Face's CLIPVisionModel / CLIPModel on tiny random weights."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from xattn_vlm.models import VisionEncoder, load_hf_vision, vision_config_from_hf
from xattn_vlm.models.config import tiny
from xattn_vlm.models.convert import load_hf_vision_weights, read_image_normalisation

TOL = dict(rtol=1e-5, atol=1e-5)
NUM_LAYERS = 2
TINY_VISION = dict(image_size=16, patch_size=8, hidden_size=24, intermediate_size=48,
                   num_hidden_layers=NUM_LAYERS, num_attention_heads=2)
MEAN, STD = (0.5, 0.25, 0.125), (0.2, 0.3, 0.4)


def _reference(model: torch.nn.Module, pixels: np.ndarray) -> dict:
  """Hugging Face outputs for channels-last pixels: every hidden state, with and without
  ``post_layernorm`` applied to all its tokens (open_clip's token output)."""
  with torch.no_grad():
    out = model(torch.from_numpy(pixels).permute(0, 3, 1, 2), output_hidden_states=True)
    post = [model.post_layernorm(h).numpy() for h in out.hidden_states]
  return dict(hidden=[h.numpy() for h in out.hidden_states], last=out.last_hidden_state.numpy(),
              post=post)


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def clip_vision(request, tmp_path_factory, pixels):
  """A saved tiny CLIPVisionModel folder and its outputs on ``pixels``."""
  torch.manual_seed(0)
  config = transformers.CLIPVisionConfig(hidden_act=request.param, **TINY_VISION)
  model = transformers.CLIPVisionModel(config).eval()
  folder = tmp_path_factory.mktemp(f"clip_vision_{request.param}")
  model.save_pretrained(folder)
  (folder / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=MEAN,
                                                                   image_std=STD)))
  return folder, _reference(model, pixels)


@pytest.fixture(scope="module")
def clip_full(tmp_path_factory, pixels):
  """A saved tiny two-tower CLIPModel folder and its vision tower's outputs on ``pixels``."""
  torch.manual_seed(1)
  text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
              vocab_size=64, max_position_embeddings=16)
  config = transformers.CLIPConfig(text_config=text, vision_config=TINY_VISION, projection_dim=8)
  model = transformers.CLIPModel(config).eval()
  folder = tmp_path_factory.mktemp("clip_full")
  model.save_pretrained(folder)
  return folder, _reference(model.vision_model, pixels)


@pytest.mark.parametrize("overrides, expected", [
    (dict(include_class_token=True), lambda ref: ref["last"]),
    (dict(), lambda ref: ref["last"][:, 1:]),
    (dict(feature_layer=0, include_class_token=True), lambda ref: ref["hidden"][0]),
    (dict(feature_layer=-2), lambda ref: ref["hidden"][NUM_LAYERS - 1][:, 1:]),
    (dict(feature_layer=1, use_post_layernorm=True), lambda ref: ref["post"][1][:, 1:]),
    (dict(use_post_layernorm=True, include_class_token=True), lambda ref: ref["post"][-1]),
], ids=["last_with_cls", "last", "embeddings", "penultimate", "block1_post_ln", "last_post_ln"])
def test_matches_hf_clip_vision_model(clip_vision, pixels, overrides, expected):
  folder, ref = clip_vision
  encoder = load_hf_vision(folder, **overrides)
  np.testing.assert_allclose(np.asarray(encoder(jnp.asarray(pixels))), expected(ref), **TOL)


def test_feature_layer_builds_only_the_blocks_it_runs(clip_vision, pixels):
  folder, ref = clip_vision
  for feature_layer, blocks in [(0, 0), (1, 1), (-1, NUM_LAYERS), (-(NUM_LAYERS + 1), 0)]:
    encoder = load_hf_vision(folder, feature_layer=feature_layer, include_class_token=True)
    assert len(encoder.layers) == blocks
    np.testing.assert_allclose(np.asarray(encoder(jnp.asarray(pixels))), ref["hidden"][blocks],
                               **TOL)


def test_full_clip_checkpoint_loads_the_vision_half(clip_full, pixels):
  folder, ref = clip_full
  cfg = vision_config_from_hf(json.loads((folder / "config.json").read_text()))
  assert (cfg.width, cfg.num_layers, cfg.image_size, cfg.patch_size) == (24, NUM_LAYERS, 16, 8)
  encoder = load_hf_vision(folder, include_class_token=True)
  np.testing.assert_allclose(np.asarray(encoder(jnp.asarray(pixels))), ref["last"], **TOL)


def test_load_weights_into_an_existing_encoder(clip_full, pixels):
  folder, ref = clip_full
  cfg = vision_config_from_hf(json.loads((folder / "config.json").read_text()),
                              use_post_layernorm=True, include_class_token=True)
  encoder = VisionEncoder(cfg, rngs=nnx.Rngs(3))
  load_hf_vision_weights(encoder, folder)
  np.testing.assert_allclose(np.asarray(encoder(jnp.asarray(pixels))), ref["post"][-1], **TOL)


def test_image_normalisation_read_from_preprocessor_config(clip_vision, clip_full):
  assert read_image_normalisation(clip_vision[0]) == dict(image_mean=MEAN, image_std=STD)
  encoder = load_hf_vision(clip_vision[0])
  assert (encoder.image_mean, encoder.image_std) == (MEAN, STD)
  assert read_image_normalisation(clip_full[0]) == {}


def test_remat_and_jit_give_the_same_features(clip_vision, pixels):
  folder, ref = clip_vision
  encoder = load_hf_vision(folder, include_class_token=True)
  remat = VisionEncoder(vision_config_from_hf(json.loads((folder / "config.json").read_text()),
                                              include_class_token=True),
                        rngs=nnx.Rngs(0), remat=True)
  nnx.update(remat, nnx.state(encoder))
  loss = lambda model, x: jnp.sum(model(x) ** 2)
  grads = nnx.jit(nnx.grad(loss))(remat, jnp.asarray(pixels))
  want = nnx.grad(loss)(encoder, jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, x: m(x))(remat, jnp.asarray(pixels))),
                             ref["last"], **TOL)
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4)


def test_every_parameter_has_logical_axes():
  encoder = VisionEncoder(tiny().vision, rngs=nnx.Rngs(0))
  for path, variable in nnx.to_flat_state(nnx.state(encoder, nnx.Param)):
    axes = variable.get_metadata()["out_sharding"]
    assert len(axes) == variable[...].ndim, path
    assert "embed" in axes or {"heads", "kv", "mlp"} & set(axes), path


@pytest.mark.parametrize("shape", [(16, 16, 3), (1, 16, 16, 1), (1, 8, 8, 3), (1, 3, 16, 16)])
def test_bad_pixels_raise(shape):
  encoder = VisionEncoder(tiny().vision, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"pixels must have shape \[N, 16, 16, 3\].*got"):
    encoder(jnp.zeros(shape))


def test_bad_configs_and_checkpoints_raise(clip_vision):
  folder, _ = clip_vision
  config = json.loads((folder / "config.json").read_text())
  with pytest.raises(ValueError, match="model_type must be one of"):
    vision_config_from_hf(dict(config, model_type="siglip_vision_model"))
  with pytest.raises(ValueError, match="feature_layer must be in"):
    load_hf_vision(folder, feature_layer=NUM_LAYERS + 1)
  with pytest.raises(ValueError, match=r"'encoder.layers.0.mlp.fc1.weight'.*\(48, 24\).*\(40, 24\)"):
    load_hf_vision_weights(VisionEncoder(vision_config_from_hf(config, mlp_dim=40),
                                         rngs=nnx.Rngs(0)), folder)
  other_act = "gelu" if config["hidden_act"] == "quick_gelu" else "quick_gelu"
  with pytest.raises(ValueError, match="activation"):
    load_hf_vision_weights(VisionEncoder(vision_config_from_hf(config, activation=other_act),
                                         rngs=nnx.Rngs(0)), folder)
  with pytest.raises(ValueError, match="num_layers: encoder 3, checkpoint 2"):
    load_hf_vision_weights(VisionEncoder(vision_config_from_hf(config, num_layers=3),
                                         rngs=nnx.Rngs(0)), folder)


def test_missing_tensor_is_named(clip_vision, tmp_path):
  folder, _ = clip_vision
  tensors = load_file(folder / "model.safetensors")
  del tensors["encoder.layers.1.self_attn.k_proj.bias"]
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  with pytest.raises(KeyError, match="encoder.layers.1.self_attn.k_proj.bias"):
    load_hf_vision(tmp_path)
