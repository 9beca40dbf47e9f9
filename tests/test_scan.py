"""``scan_layers``: the LM's blocks stacked and run under ``lax.scan`` give the unrolled model's
logits and gradients, in the bare LM and in a Flamingo whose gated blocks are scanned with the LM
blocks after them as groups (a gated block every 3rd of 7 or 10 LM layers: the blocks before the
first, the groups, a shorter last group), and decode with a cache as the unrolled model does."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xattn_vlm.models import config as model_config
from xattn_vlm.models import layers
from xattn_vlm.models import scan
from xattn_vlm.models.flamingo import Flamingo, gated_layers
from xattn_vlm.models.lm import DecoderLM
from xattn_vlm.models.resampler import PerceiverResampler
from xattn_vlm.models.vision import VisionEncoder



def _lm_config(family: str):
  return model_config.lm_config(family=family, vocab_size=64, num_layers=5, embed_dim=16,
                                num_heads=4, num_kv_heads=2 if family == "llama" else None,
                                mlp_dim=32, max_length=16)


def _stacked(blocks) -> dict:
  """The unrolled blocks' parameters stacked as the scanned layout holds them."""
  states = [nnx.to_pure_dict(nnx.state(block, nnx.Param)) for block in blocks]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def _assert_close(got, expected, what, tol=1e-6):
  """Equal within float32 rounding: ``tol`` of each array's largest magnitude (at least
  ``tol``); a scan sums in another order than the unrolled loop."""
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
    scale = max(1.0, float(np.abs(np.asarray(b)).max()))
    np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale,
                               err_msg=f"{what} {jax.tree_util.keystr(path)}")


def _lm_parameters_and_gradients(lm, ids, weights, remat="none"):
  lm.remat = remat
  graphdef, params, rest = nnx.split(lm, nnx.Param, ...)
  loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(ids) * weights)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, nnx.to_pure_dict(grads)


def test_scanned_lm_equals_unrolled_in_logits_and_gradients():
  rng = np.random.default_rng(0)
  for family in ("gpt2", "llama"):
    cfg = _lm_config(family)
    unrolled = DecoderLM(cfg, rngs=nnx.Rngs(0))
    scanned = DecoderLM(cfg, rngs=nnx.Rngs(0), scan_layers=True)
    kernel = nnx.state(scanned.blocks, nnx.Param)["mlp"]["up"]["kernel"]
    assert kernel.shape == (5, 16, 32)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "mlp")
    _assert_close(nnx.to_pure_dict(nnx.state(scanned.blocks, nnx.Param)),
                  _stacked(unrolled.blocks), f"{family} initial")
    ids = jnp.asarray(rng.integers(0, 64, (2, 12)), jnp.int32)
    graphdef, state = nnx.split(scanned)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(ids))(state))
    assert jaxpr.count("scan[") == 1  # every block in one scan
    weights = jnp.asarray(rng.normal(size=(2, 12, 64)), jnp.float32)
    for remat in ("none", "full"):
      value, grads = _lm_parameters_and_gradients(unrolled, ids, weights, remat)
      scanned_value, scanned_grads = _lm_parameters_and_gradients(scanned, ids, weights, remat)
      np.testing.assert_allclose(scanned_value, value, rtol=1e-6)
      assert np.abs(np.asarray(grads["blocks"][0]["mlp"]["up"]["kernel"])).max() > 0
      _assert_close(scanned_grads["blocks"],
                    jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[grads["blocks"][i] for i in range(cfg.num_layers)]),
                    f"{family} remat={remat} gradient")
      rest = lambda g: {k: v for k, v in g.items() if k != "blocks"}
      _assert_close(rest(scanned_grads), rest(grads), f"{family} remat={remat} gradient")


def test_scanned_lm_decodes_with_a_cache_as_its_full_forward():
  lm = DecoderLM(_lm_config("llama"), rngs=nnx.Rngs(1), scan_layers=True)
  ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 9)), jnp.int32)
  mask = jnp.ones_like(ids)
  positions = layers.default_positions(mask)
  full = np.asarray(nnx.jit(lambda lm, ids: lm(ids))(lm, ids))

  @nnx.jit
  def step(lm, ids, positions, mask, cache):
    hidden, cache = lm.forward_embeddings(lm.embed_tokens(ids), positions, mask, cache)
    return lm.logits(hidden), cache

  cache = lm.init_cache(batch_size=2, max_length=12)
  logits, cache = step(lm, ids[:, :6], positions[:, :6], mask[:, :6], cache)
  pieces = [np.asarray(logits)]
  for t in range(6, 9):
    logits, cache = step(lm, ids[:, t:t + 1], positions[:, t:t + 1], mask[:, t:t + 1], cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)


def test_scanned_vision_tower_and_resampler_equal_unrolled():
  config = model_config.tiny()
  rng = np.random.default_rng(3)
  pixels = jnp.asarray(rng.normal(size=(3, 16, 16, 3)), jnp.float32)
  features = jnp.asarray(rng.normal(size=(2, 2, 1, 5, config.vision.width)), jnp.float32)
  media_mask = jnp.asarray([[True, True], [True, False]])
  parts = {
      "vision": (lambda scan_layers: VisionEncoder(config.vision, rngs=nnx.Rngs(0),
                                                   scan_layers=scan_layers),
                 lambda module: module(pixels)),
      "resampler": (lambda scan_layers: PerceiverResampler(
          config.resampler, config.vision.width, rngs=nnx.Rngs(0), scan_layers=scan_layers),
                    lambda module: module(features, media_mask)),
  }
  for name, (build, call) in parts.items():
    results = {}
    for scan_layers in (False, True):
      module = build(scan_layers)
      graphdef, params = nnx.split(module, nnx.Param)
      weights = jnp.asarray(rng.normal(size=call(module).shape), jnp.float32) \
          if not scan_layers else weights
      loss = lambda p: jnp.sum(call(nnx.merge(graphdef, p)) * weights)
      value, grads = jax.jit(jax.value_and_grad(loss))(params)
      results[scan_layers] = nnx.to_pure_dict(params), value, nnx.to_pure_dict(grads)
    (params, value, grads), (scanned_params, scanned_value, scanned_grads) = results.values()
    mlp = scanned_params["layers"]["mlp"] if name == "vision" else \
        scanned_params["layers"]["ff"]["mlp"]
    assert np.shape(mlp["up"]["kernel"])[0] == len(params["layers"]) > 1
    _assert_close(scanned_params, scan.layout(params, True), f"{name} initial")
    np.testing.assert_allclose(scanned_value, value, rtol=1e-6)
    _assert_close(scanned_grads, scan.layout(grads, True), f"{name} gradient")


@pytest.mark.parametrize("num_layers, gated, scans", [
    (7, (2, 5), 3),  # runs of 2 | 3 | 2 blocks: one group only, each run scanned apart
    (10, (2, 5, 8), 4),  # 2 | two groups of 3 in one scan (the group's blocks an inner scan) | 2
])
def test_scanned_flamingo_with_a_remainder_group_equals_unrolled(num_layers, gated, scans):
  config = model_config.tiny()
  config.lm.num_layers = num_layers
  config.xattn.every_n_layers = 3
  assert tuple(gated_layers(config)) == gated
  models = {}
  for scan_layers in (False, True):
    config.scan_layers = scan_layers
    model = Flamingo(config, rngs=nnx.Rngs(0))
    for block in model.gated_blocks:  # open gates: the images reach the logits
      block.attn_gate[...] = jnp.asarray(0.7)
      block.ffw_gate[...] = jnp.asarray(0.7)
    models[scan_layers] = model
  rng = np.random.default_rng(2)
  media = model_config.special_tokens.added_token_ids(96, config.added_tokens)[0]
  ids = rng.integers(0, 96, (2, 10)).astype(np.int32)
  ids[:, 1] = media
  ids[:, 5] = media
  images = jnp.asarray(rng.normal(size=(2, 2, 1, 16, 16, 3)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, 10, 98)), jnp.float32)
  graphdef, state = nnx.split(models[True])
  jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(images, jnp.asarray(ids)))(state))
  assert jaxpr.count("scan[") == scans + 2  # and one each for the vision tower and resampler
  results = {}
  for scan_layers, model in models.items():
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(images, jnp.asarray(ids)) * weights)
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    results[scan_layers] = value, nnx.to_pure_dict(grads)
  (value, grads), (scanned_value, scanned_grads) = results[False], results[True]
  np.testing.assert_allclose(scanned_value, value, rtol=1e-6)
  forward = nnx.jit(lambda model, images: model(images, jnp.asarray(ids)))
  assert not np.allclose(forward(models[False], images),
                         forward(models[False], jnp.zeros_like(images)))  # the images matter
  assert np.abs(np.asarray(grads["resampler"]["layers"][0]["ff"]["mlp"]["up"]["kernel"])).max() > 0
  assert jax.tree.structure(scanned_grads) == jax.tree.structure(scan.layout(grads, True))
  # Through the scanned resampler, 7-10 LM blocks and the gated blocks: up to 1.5e-6 here.
  _assert_close(scanned_grads, scan.layout(grads, True), "gradient", tol=3e-6)
  # Prefill + decode (the blocks one by one, with a cache) equals the scanned full forward.
  model = models[True]
  full = np.asarray(forward(model, images))
  logits, cache = nnx.jit(lambda m, i, x: m.prefill(i, x, max_length=10))(
      model, images, jnp.asarray(ids[:, :8]))
  pieces = [np.asarray(logits)]
  for t in (8, 9):
    logits, cache = nnx.jit(lambda m, x, c: m.decode_step(x, c))(
        model, jnp.asarray(ids[:, t:t + 1]), cache)
    pieces.append(np.asarray(logits))
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
