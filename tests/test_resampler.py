"""Perceiver resampler semantics (docs/model.md, "Resampler"): shapes, independence of media, video
frames flattened into one medium, frame-time embeddings interpolated for longer clips."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xattn_vlm.models import PerceiverResampler
from xattn_vlm.models import get_model_config
from xattn_vlm.models.config import resampler_config
from xattn_vlm.models.resampler import interpolate_frame_embeddings

# Every test uses B = T = 2 (F = 1, 2 or 5) so that few shapes are compiled.
B, T, DIM, PATCHES = 2, 2, 12, 3
TOL = dict(rtol=1e-6, atol=1e-6)


def _config(**overrides):
  kw = dict(depth=2, num_latents=4, num_heads=2, head_dim=6, ff_mult=2, max_num_media=3,
            max_num_frames=2)
  return resampler_config(**{**kw, **overrides})


@pytest.fixture(scope="module")
def resampler(attention):
  model = PerceiverResampler(_config(), DIM, rngs=nnx.Rngs(0), attention=attention)
  # Frame and media-time embeddings large enough that using the wrong row shows in the output.
  model.frame_embs[...] = jax.random.normal(jax.random.key(1), model.frame_embs.shape)
  model.media_time_embs[...] = jax.random.normal(jax.random.key(2), model.media_time_embs.shape)
  return model


def _features(*shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape + (DIM,))


_forward = nnx.jit(lambda model, features, media_mask=None: model(features, media_mask))


def test_output_shape(resampler):
  out = _forward(resampler, _features(B, T, 2, PATCHES))
  assert out.shape == (B, T, 4, DIM)
  assert np.isfinite(np.asarray(out)).all()


def test_media_are_resampled_independently(resampler):
  x = _features(B, T, 2, PATCHES)
  perturbed = x.at[:, 0].add(_features(B, 2, PATCHES, seed=5))
  out, out_perturbed = _forward(resampler, x), _forward(resampler, perturbed)
  np.testing.assert_allclose(out_perturbed[:, 1], out[:, 1], rtol=0, atol=1e-7)
  assert not np.allclose(out_perturbed[:, 0], out[:, 0], atol=1e-3)


def test_media_time_embedding_distinguishes_slots(resampler):
  x = jnp.broadcast_to(_features(B, 1, 1, PATCHES), (B, T, 1, PATCHES, DIM))
  out = _forward(resampler, x)
  assert not np.allclose(out[:, 0], out[:, 1], atol=1e-3)


def test_without_media_time_embeddings_slots_are_alike_and_unbounded():
  model = PerceiverResampler(_config(max_num_media=None), DIM, rngs=nnx.Rngs(0))
  assert model.media_time_embs is None
  x = jnp.broadcast_to(_features(B, 1, 1, PATCHES), (B, 5, 1, PATCHES, DIM))  # 5 > 3 slots
  out = _forward(model, x)
  for slot in range(1, 5):
    np.testing.assert_allclose(out[:, slot], out[:, 0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["openflamingo_3b", "openflamingo_4b", "openflamingo_9b",
                                    "openflamingo_9b_v1", "idefics_9b", "idefics_80b"])
def test_published_presets_have_no_time_embeddings(preset):
  """As OpenFlamingo's and IDEFICS's resamplers (max_num_media and max_num_frames None), whose
  checkpoints carry neither table."""
  config = get_model_config(preset)
  model = nnx.eval_shape(lambda: PerceiverResampler(config.resampler, config.vision.width,
                                                    rngs=nnx.Rngs(0)))
  assert model.media_time_embs is None and model.frame_embs is None


def test_without_frame_embeddings_frame_order_does_not_matter():
  """No frame table: the frames of a video are one unordered key set, so swapping them changes
  nothing (with the table it does)."""
  video = _features(B, T, 2, PATCHES, seed=7)
  swapped = video[:, :, ::-1]
  plain = PerceiverResampler(_config(max_num_frames=None), DIM, rngs=nnx.Rngs(0))
  assert plain.frame_embs is None
  np.testing.assert_allclose(_forward(plain, video), _forward(plain, swapped), rtol=0, atol=1e-6)
  model = PerceiverResampler(_config(), DIM, rngs=nnx.Rngs(0))
  model.frame_embs[...] = jax.random.normal(jax.random.key(1), model.frame_embs.shape)
  assert not np.allclose(_forward(model, video), _forward(model, swapped), atol=1e-3)


def test_qk_norm_normalises_each_head():
  """IDEFICS's per-head q/k LayerNorm: scaling one head's query projection changes nothing
  (the norm removes it), while it does without the norm."""
  x = _features(B, T, 1, PATCHES, seed=8)
  outputs = []
  for qk_norm in (True, False):
    model = PerceiverResampler(_config(qk_norm=qk_norm), DIM, rngs=nnx.Rngs(0))
    before = _forward(model, x)
    model.layers[0].attn.to_q.kernel[...] = model.layers[0].attn.to_q.kernel[...] * 3.0
    model.layers[0].attn.to_k.kernel[...] = model.layers[0].attn.to_k.kernel[...] * 3.0
    outputs.append(np.abs(np.asarray(_forward(model, x) - before)).max())
  assert outputs[0] < 1e-4 and outputs[1] > 1e-2  # (LayerNorm's eps keeps a trace)


def test_one_frame_video_equals_the_image_path(resampler):
  images = _features(B, T, PATCHES)  # [B, T, P, D]
  np.testing.assert_array_equal(_forward(resampler, images),
                                _forward(resampler, images[:, :, None]))


def test_video_frames_are_one_key_sequence(resampler):
  video = _features(B, T, 2, PATCHES)
  out = _forward(resampler, video)
  assert out.shape == (B, T, 4, DIM)  # two frames, still num_latents tokens
  swapped = _forward(resampler, video[:, :, ::-1])  # frame-time embeddings make frame order matter
  assert not np.allclose(out, swapped, atol=1e-3)


def test_masked_frames_are_ignored(resampler):
  video = _features(B, T, 2, PATCHES)
  last_frame_masked = jnp.broadcast_to(jnp.array([True, False]), (B, T, 2))
  np.testing.assert_allclose(_forward(resampler, video, last_frame_masked),
                             _forward(resampler, video[:, :, :1]), **TOL)
  np.testing.assert_allclose(_forward(resampler, video, jnp.ones((B, T), bool)),
                             _forward(resampler, video), **TOL)


def test_interpolation_is_the_identity_up_to_max_num_frames():
  table = jax.random.normal(jax.random.key(0), (4, 5))
  np.testing.assert_array_equal(interpolate_frame_embeddings(table, 4), table)
  np.testing.assert_array_equal(interpolate_frame_embeddings(table, 2), table[:2])


def test_interpolation_hits_the_learned_rows_at_both_ends():
  table = jax.random.normal(jax.random.key(0), (3, 5))
  out = interpolate_frame_embeddings(table, 5)  # points 0, .5, 1, 1.5, 2 of the table
  assert out.shape == (5, 5)
  np.testing.assert_allclose(out[0], table[0], rtol=0, atol=0)
  np.testing.assert_allclose(out[-1], table[-1], rtol=0, atol=0)
  np.testing.assert_allclose(out[2], table[1], **TOL)
  np.testing.assert_allclose(out[1], (table[0] + table[1]) / 2, **TOL)
  np.testing.assert_allclose(out[3], (table[1] + table[2]) / 2, **TOL)


def test_more_frames_than_trained_runs_with_interpolated_embeddings(resampler):
  frames = 5  # max_num_frames is 2
  out = _forward(resampler, _features(B, T, frames, PATCHES))
  assert out.shape == (B, T, 4, DIM)
  assert np.isfinite(np.asarray(out)).all()


def test_width_different_from_input_dim():
  model = PerceiverResampler(_config(width=8), DIM, rngs=nnx.Rngs(0))
  assert model.input_proj is not None and model.latents.shape == (4, 8)
  out = _forward(model, _features(B, T, 1, PATCHES))
  assert out.shape == (B, T, 4, 8)
  assert PerceiverResampler(_config(), DIM, rngs=nnx.Rngs(0)).input_proj is None


def test_logical_axes(resampler):
  assert resampler.latents.get_metadata()["out_sharding"] == ("latents", "embed")
  assert resampler.media_time_embs.get_metadata()["out_sharding"] == ("media", "embed")
  for path, variable in nnx.to_flat_state(nnx.state(resampler, nnx.Param)):
    axes = variable.get_metadata()["out_sharding"]
    assert len(axes) == variable[...].ndim, path
    assert {"embed", "heads", "kv", "mlp"} & set(axes), path


def test_bad_inputs_raise(resampler):
  with pytest.raises(ValueError, match="more than max_num_media=3"):
    resampler(_features(1, 4, 1, PATCHES))
  with pytest.raises(ValueError, match=r"features must have shape \[B, T, F, P, 12\]"):
    resampler(jax.random.normal(jax.random.key(0), (1, 1, 1, PATCHES, DIM + 1)))
  with pytest.raises(ValueError, match=r"features must have shape"):
    resampler(_features(1, PATCHES))
  with pytest.raises(ValueError, match=r"media_mask must have shape \[B, T, F\]"):
    resampler(_features(1, 2, 2, PATCHES), jnp.ones((1, 3), bool))
