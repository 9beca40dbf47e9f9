"""The Flamingo composition: the fixed semantics of docs/model.md, each pinned by a test that fails
if it breaks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from xattn_vlm.models import config as model_config
from xattn_vlm.models import flamingo as flamingo_lib
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.models.xattn import GatedCrossAttentionBlock, cross_attention_mask, media_locations

CFG = model_config.tiny()
V = CFG.lm.vocab_size
IMG, EOC = V, V + 1
T = 3  # media slots per sample


def _images(seed, batch=2, num_media=T, frames=1):
  size = CFG.vision.image_size
  return jax.random.normal(jax.random.key(seed), (batch, num_media, frames, size, size, 3))


def _open_gates(model, value=1.0):
  for block in model.gated_blocks:
    block.attn_gate[...] = jnp.asarray(value)
    block.ffw_gate[...] = jnp.asarray(value)


# Two samples: "t t <image> a a <eoc> <image> b b <eoc> <image> c"
IDS = jnp.array([
    [5, 6, IMG, 7, 8, EOC, IMG, 9, 10, EOC, IMG, 11],
    [12, IMG, 13, 14, 15, EOC, IMG, 16, EOC, IMG, 17, 18],
])


def _tiny(attention: str):
  config = model_config.tiny()
  config.attention = attention
  return config


@pytest.fixture(scope="module")
def model(attention):
  return Flamingo(_tiny(attention), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def open_model(attention):
  m = Flamingo(_tiny(attention), rngs=nnx.Rngs(1))
  _open_gates(m)
  return m


def test_media_locations_and_mask_rules():
  ids = jnp.array([[1, IMG, 2, EOC, IMG, 3]])
  media_index = media_locations(ids, IMG)
  np.testing.assert_array_equal(media_index, [[0, 1, 1, 1, 2, 2]])
  immediate = np.asarray(cross_attention_mask(media_index, 2, 1, True))[0]
  np.testing.assert_array_equal(immediate, [[0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]])
  previous = np.asarray(cross_attention_mask(media_index, 2, 1, False))[0]
  np.testing.assert_array_equal(previous, [[0, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 1]])
  # Each medium contributes num_latents keys, in media order.
  wide = np.asarray(cross_attention_mask(media_index, 2, 3, True))[0]
  np.testing.assert_array_equal(wide[2], [1, 1, 1, 0, 0, 0])


def test_gated_block_placement_follows_openflamingo():
  assert flamingo_lib.gated_layer_indices(8, 1) == list(range(8))
  assert flamingo_lib.gated_layer_indices(8, 4) == [3, 7]
  assert flamingo_lib.gated_layer_indices(80, 7) == [6, 13, 20, 27, 34, 41, 48, 55, 62, 69, 76]
  with pytest.raises(ValueError, match="every_n_layers"):
    flamingo_lib.gated_layer_indices(8, 0)


def test_gated_block_placement_offset_gives_idefics_blocks():
  """IDEFICS places its blocks before LM blocks 0, n, 2n: the same rule with offset n - 1."""
  assert flamingo_lib.gated_layer_indices(8, 4, offset=3) == [0, 4]
  assert flamingo_lib.gated_layer_indices(6, 2, offset=1) == [0, 2, 4]
  assert flamingo_lib.gated_layer_indices(8, 4, offset=1) == [2, 6]
  with pytest.raises(ValueError, match=r"xattn.offset must be in \[0, every_n_layers=4\), got 4"):
    flamingo_lib.gated_layer_indices(8, 4, offset=4)
  config = model_config.idefics_9b()
  model = nnx.eval_shape(lambda: Flamingo(config, rngs=nnx.Rngs(0)))
  assert model.gated_layers == tuple(range(0, 32, 4))


def test_document_end_rule_matches_idefics_processor():
  """After ``</s>`` a token sees no image until the next ``<image>`` (which sees its own), as
  IDEFICS's processor builds ``image_attention_mask``; without the rule nothing resets."""
  import reference_models  # torch and transformers: only this test needs them
  image, eos, num_images = reference_models.IDEFICS_IMAGE, reference_models.IDEFICS_EOS, 4
  rng = np.random.default_rng(0)
  ids = rng.choice([3, 4, 5, image, eos], size=(16, 12), p=[0.3, 0.2, 0.2, 0.15, 0.15])
  ids = np.where(np.cumsum(ids == image, axis=1) > num_images, 3, ids)  # at most 4 images
  theirs = reference_models.idefics_image_attention_mask(ids, num_images).numpy().astype(bool)
  media_index = media_locations(jnp.asarray(ids), image, document_end_token_id=eos)
  ours = np.asarray(cross_attention_mask(media_index, num_images, 1, True))
  np.testing.assert_array_equal(ours, theirs)
  assert (theirs.sum(-1) == 0).sum() > (np.cumsum(ids == image, 1) == 0).sum()  # resets happened
  np.testing.assert_array_equal(media_locations(jnp.asarray(ids), image),
                                np.cumsum(ids == image, axis=1))


@pytest.mark.parametrize("preset, media, eoc", [
    ("tiny", V, V + 1), ("openflamingo_9b", 50278, 50277), ("openflamingo_9b_v1", 32001, 32000),
    ("idefics_9b", 32001, None)])
def test_special_token_ids_come_from_added_tokens(preset, media, eoc):
  config = model_config.get_model_config(preset)
  model = nnx.eval_shape(lambda: Flamingo(config, rngs=nnx.Rngs(0)))
  assert (model.media_token_id, model.eoc_token_id) == (media, eoc)
  assert model.added_embed.embedding.shape[0] == len(config.added_tokens)


def test_added_tokens_must_name_the_image_token():
  config = model_config.tiny()
  with pytest.raises(ValueError, match="added_tokens must name '<image>'"):
    model_config.flamingo_config(lm=config.lm, vision=config.vision, resampler=config.resampler,
                                 xattn=config.xattn, added_tokens=("<|endofchunk|>",))


def test_image_token_id_follows_the_configured_order():
  """With OpenFlamingo's order the id after the vocabulary is <|endofchunk|>: it marks no image,
  and <image> is vocab + 1."""
  config = model_config.tiny()
  config.added_tokens = ("<|endofchunk|>", "<image>")
  model = Flamingo(config, rngs=nnx.Rngs(1))
  _open_gates(model)
  swapped = jnp.where(IDS == IMG, -1, IDS)
  swapped = jnp.where(swapped == EOC, IMG, jnp.where(swapped == -1, EOC, swapped))
  images = _images(11)
  np.testing.assert_array_equal(np.asarray(model._media_index(swapped)),
                                np.asarray(media_locations(IDS, IMG)))
  # The same model reads the default order's ids as text-only chunks: its outputs change.
  assert not np.allclose(np.asarray(model(images, swapped)), np.asarray(model(images, IDS)))


def test_zero_gates_equal_bare_lm_bit_for_bit(model):
  """At initialisation (gates 0) Flamingo's logits equal the LM's on the same tokens exactly."""
  images = _images(0)
  logits = nnx.jit(lambda m, im, ids: m(im, ids))(model, images, IDS)

  @nnx.jit
  def bare_lm(m, ids):
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    hidden, _ = m.lm.forward_embeddings(m.embed(ids), positions, jnp.ones_like(ids))
    return m.logits(hidden)

  np.testing.assert_array_equal(np.asarray(logits), np.asarray(bare_lm(model, IDS)))
  # Text-only ids: the frozen vocabulary's logits are the bare LM's logits, bit for bit.
  text = jnp.array([[3, 4, 5, 6, 7, 8]])
  ours = nnx.jit(lambda m, im, ids: m(im, ids))(model, _images(0, batch=1), text)[..., :V]
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(nnx.jit(lambda m, t: m.lm(t))(model,
                                                                                          text)))


def _changed_positions(model, perturb_media):
  images = _images(0)
  perturbed = images.at[:, perturb_media].add(1.0)
  a, b = model(images, IDS), model(perturbed, IDS)
  return np.abs(np.asarray(a - b)).max(axis=-1) > 1e-6  # [B, L]


def test_tokens_before_first_image_never_see_media(open_model):
  changed = _changed_positions(open_model, perturb_media=0)
  assert not changed[0, :2].any() and not changed[1, :1].any()
  assert changed[0, 2:].all() and changed[1, 1:].all()


def test_image_token_sees_its_own_image(open_model):
  """Perturbing image 2 changes nothing before its <image> token, and changes that token itself:
  the change can only come through the token's own cross-attention."""
  changed = _changed_positions(open_model, perturb_media=1)
  second_image_pos = [6, 6]
  for b, pos in enumerate(second_image_pos):
    assert not changed[b, :pos].any()
    assert changed[b, pos]


@pytest.mark.parametrize("immediate", [True, False])
def test_immediate_vs_all_previous_media(immediate, attention):
  """At the gated block: with only_attend_immediate_media a token's output depends only on the
  latents of image media_index[t]; otherwise on every image <= media_index[t]."""
  dim, dv, n = 16, 12, 2
  block = GatedCrossAttentionBlock(dim, dv, num_heads=2, head_dim=4, ff_mult=2, activation="gelu",
                                   norm_eps=1e-5, rngs=nnx.Rngs(0), attention=attention)
  block.attn_gate[...] = jnp.asarray(1.0)
  ids = IDS[:1]
  mask = cross_attention_mask(media_locations(ids, IMG), T, n, immediate)
  y = jax.random.normal(jax.random.key(1), (1, ids.shape[1], dim))
  latents = jax.random.normal(jax.random.key(2), (1, T, n, dv))
  base = block.attn(y, block.attn.project_media(latents), mask)
  bumped = block.attn(y, block.attn.project_media(latents.at[:, 0].add(1.0)), mask)
  changed = np.abs(np.asarray(base - bumped)).max(-1)[0] > 1e-6
  media_index = np.asarray(media_locations(ids, IMG))[0]
  expected = (media_index == 1) if immediate else (media_index >= 1)
  np.testing.assert_array_equal(changed, expected)
  # Tokens with media_index 0 get exactly zero cross-attention output.
  assert np.all(np.asarray(base)[0, media_index == 0] == 0.0)


def _decode_all(model, images, ids, mask, prompt_len):
  logits, cache = model.prefill(images, ids[:, :prompt_len], mask[:, :prompt_len],
                                max_length=ids.shape[1])
  steps = [logits]
  for t in range(prompt_len, ids.shape[1]):
    step_logits, cache = model.decode_step(ids[:, t:t + 1], cache)
    steps.append(step_logits)
  return jnp.concatenate(steps, axis=1), cache


_MODELS = {}


def _model_attending(immediate: bool, attention: str) -> Flamingo:
  """A model with open gates whose tokens attend to their immediate image only, or to all
  previous ones (``xattn.only_attend_immediate_media``)."""
  if (immediate, attention) not in _MODELS:
    config = _tiny(attention)
    config.xattn.only_attend_immediate_media = immediate
    _MODELS[immediate, attention] = Flamingo(config, rngs=nnx.Rngs(1))
    _open_gates(_MODELS[immediate, attention])
  return _MODELS[immediate, attention]


@pytest.mark.parametrize("immediate", [True, False])
def test_prefill_and_decode_reproduce_full_forward(immediate, attention):
  model = _model_attending(immediate, attention)
  images = _images(3)
  # Three images in the prompt, then text; sample 1 is left padded by two tokens.
  ids = jnp.concatenate([IDS, jnp.array([[20, 21, 22, 23, 24]] * 2)], axis=1).at[1, :2].set(0)
  mask = jnp.ones_like(ids).at[1, :2].set(0)
  full = model(images, ids, mask)
  prompt_len = IDS.shape[1]
  decoded, cache = _decode_all(model, images, ids, mask, prompt_len)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], rtol=1e-5,
                             atol=1e-5)
  # New tokens attend to the prompt's last image.
  np.testing.assert_array_equal(cache.media_index,
                                (ids[:, :prompt_len] == IMG).sum(-1))


def test_decoding_after_a_document_end_sees_no_image():
  """With a document-end token, new tokens see what the prompt's last token sees: nothing when
  the prompt ends after that token, the last image otherwise."""
  config = model_config.tiny()
  config.xattn.document_end_token_id = 3
  model = Flamingo(config, rngs=nnx.Rngs(2))
  ids = jnp.array([[5, IMG, 6, 3, 7], [5, IMG, 6, 7, 8]])
  _, cache = model.prefill(_images(12, num_media=1), ids, max_length=8)
  np.testing.assert_array_equal(np.asarray(cache.media_index), [0, 1])


@pytest.mark.parametrize("immediate", [True, False])
def test_decode_tokens_attend_to_the_images_the_setting_allows(immediate, attention):
  """A decoded token's logits, with the prompt's self-attention cache held fixed and one image's
  keys and values perturbed: the prompt's last image always changes them; an earlier one only
  when tokens attend to all previous images."""
  model = _model_attending(immediate, attention)
  images = _images(4)
  prompt = IDS[:, :8]  # both samples hold 2 images
  _, cache = model.prefill(images, prompt, max_length=10)
  next_token = jnp.full((2, 1), 30)
  base, _ = model.decode_step(next_token, cache)
  for image, seen in ((0, not immediate), (1, True), (2, False)):
    _, other = model.prefill(images.at[:, image].add(1.0), prompt, max_length=10)
    logits, _ = model.decode_step(next_token, cache.replace(media_kv=other.media_kv))
    changed = np.abs(np.asarray(logits - base)).max(axis=(1, 2)) > 1e-6
    np.testing.assert_array_equal(changed, [seen, seen], err_msg=f"image {image}")


def test_frozen_means_frozen():
  model = Flamingo(CFG, rngs=nnx.Rngs(2))
  _open_gates(model, 0.5)
  images, ids = _images(5), IDS

  def loss_fn(m):
    return jnp.mean(m(images, ids) ** 2)

  grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, flamingo_lib.trainable)))(model)
  grad_paths = {path for path, _ in nnx.to_flat_state(grads)}
  trainable_paths = {path for path, _ in nnx.to_flat_state(nnx.state(model, flamingo_lib.trainable))}
  assert grad_paths == trainable_paths
  assert all(p[0] in flamingo_lib.TRAINABLE_PARTS for p in grad_paths)
  assert any(p[0] == "gated_blocks" for p in grad_paths) and any(p[0] == "added_embed"
                                                                 for p in grad_paths)

  frozen_before = jax.tree.map(np.array, nnx.state(model, flamingo_lib.frozen))
  trainable_before = jax.tree.map(np.array, nnx.state(model, flamingo_lib.trainable))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=flamingo_lib.trainable)
  optimizer.update(model, grads)
  frozen_after = nnx.state(model, flamingo_lib.frozen)
  for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
    np.testing.assert_array_equal(before, np.asarray(after))
  moved = [not np.array_equal(b, np.asarray(a)) for b, a in
           zip(jax.tree.leaves(trainable_before),
               jax.tree.leaves(nnx.state(model, flamingo_lib.trainable)))]
  assert any(moved)
  # Optimizer state exists for trainable parameters only.
  opt_paths = {path[path.index("mu") + 1:] for path, _ in nnx.to_flat_state(nnx.state(optimizer))
               if "mu" in path}
  assert opt_paths == trainable_paths


def test_video_frames_are_read_in_order(open_model):
  """Every frame of a video reaches the tokens after its <image>, and with a frame table the
  frames' order matters; more frames than the table holds interpolate it."""
  assert open_model.resampler.frame_embs is not None
  frames = CFG.resampler.max_num_frames
  video = _images(6, frames=frames)
  base = np.asarray(open_model(video, IDS))
  for frame in range(frames):
    bumped = np.asarray(open_model(video.at[:, 0, frame].add(1.0), IDS))
    changed = np.abs(bumped - base).max(-1) > 1e-6
    np.testing.assert_array_equal(changed[0], np.arange(IDS.shape[1]) >= 2)
  reversed_frames = np.asarray(open_model(video[:, :, ::-1], IDS))
  assert np.abs(reversed_frames - base).max() > 1e-6
  longer = _images(7, frames=frames + 2)
  out = np.asarray(open_model(longer, IDS))
  assert np.isfinite(out).all()
  assert np.abs(out - np.asarray(open_model(longer[:, :, :frames], IDS))).max() > 1e-6


def test_vision_features_skip_the_tower(open_model):
  images = _images(8)
  b, t, f = images.shape[:3]
  features = open_model.vision(images.reshape((b * t * f,) + images.shape[3:]))
  features = features.reshape((b, t, f) + features.shape[1:])
  np.testing.assert_allclose(np.asarray(open_model(None, IDS, vision_features=features)),
                             np.asarray(open_model(images, IDS)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (lambda im, ids: (im[0, 0], ids), "images must be float"),
    (lambda im, ids: (im.astype(jnp.int32), ids), "dtype"),
    (lambda im, ids: (im.at[0, 0, 0, 0, 0, 0].set(jnp.nan), ids), "non-finite"),
    (lambda im, ids: (im[:, :2], ids), r"sample 0 has 3 <image> tokens .* only 2 media"),
    (lambda im, ids: (im, jnp.zeros((2, CFG.lm.max_length + 1), jnp.int32)), "exceeds the LM"),
    (lambda im, ids: (im, ids[0]), "input_ids must be"),
])
def test_bad_input_names_the_argument(model, bad, match):
  images, ids = bad(_images(9), IDS)
  with pytest.raises(ValueError, match=match):
    model(images, ids)


def test_media_mask_count_mismatch(model):
  media_mask = jnp.array([[True, True, True], [True, True, False]])
  with pytest.raises(ValueError, match="sample 1 has 3 <image> tokens in input_ids but 2 images"):
    model(_images(10), IDS, media_mask=media_mask)


@pytest.mark.parametrize("name", sorted(model_config.PRESETS))
def test_every_preset_eval_shape_and_trainable_split(name):
  from xattn_vlm.models import parameters
  counts = parameters.count_parameters(model_config.get_model_config(name))
  assert counts["trainable"] == (counts["resampler"] + counts["gated_blocks"] + counts["added"])
  assert counts["frozen"] == counts["lm"] + counts["vision"]
  assert counts["trainable"] > 0 and counts["frozen"] > counts["gated_blocks"]


@pytest.mark.parametrize("name, num_layers, gated", [
    ("flamingo_3b", 24, list(range(24))),            # a gated block before every layer
    ("flamingo_9b", 40, list(range(3, 40, 4))),      # every 4th
    ("flamingo_80b", 80, list(range(6, 80, 7))),     # every 7th
])
def test_paper_presets_have_the_papers_resampler_and_gated_block_spacing(name, num_layers, gated):
  """Flamingo (Alayrac et al. 2022, appendix B): a 6-layer resampler with 64 latents, and gated
  cross-attention every 1st, 4th and 7th LM layer in the 3B, 9B and 80B models."""
  config = model_config.get_model_config(name)
  model = nnx.eval_shape(lambda: Flamingo(config, rngs=nnx.Rngs(0)))
  assert config.lm.num_layers == num_layers
  assert len(model.resampler.layers) == 6
  assert model.resampler.latents.shape == (64, config.resampler.width)
  assert list(model.gated_layers) == gated and len(model.gated_blocks) == len(gated)
