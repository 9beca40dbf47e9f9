"""Fusion modes (docs/model.md, "Fusion modes"): prefix (Frozen/ClipCap), joint (SimVLM-style
prefix LM), and the training-free inference pipelines (MAGiC decoding, Socratic prompting)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import experiment_config, leaves, tiny
from test_sequence import ids_of, image, word_tokenizer

from xattn_vlm import recipe
from xattn_vlm.data import default_tokenizer, sequence
from xattn_vlm.inference import (MagicConfig, Processor, greedy_text, magic_generate,
                                 magic_tokens, socratic_answer, socratic_prompt)
from xattn_vlm.models import config as model_config
from xattn_vlm.models import flamingo as flamingo_lib
from xattn_vlm.models import layers
from xattn_vlm.models import parameters
from xattn_vlm.models.contrastive import DualEncoder
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.models.lm import DecoderLM
from xattn_vlm.recipe import fusion as fusion_recipe
from xattn_vlm.recipe import training_free as training_free_recipe
from xattn_vlm.train import configs, stages, trainer

V = model_config.tiny().lm.vocab_size
IMG, EOC = V, V + 1
N = model_config.tiny().resampler.num_latents  # <image> tokens per image in prefix/joint


def _config(fusion: str, family: str = "gpt2"):
  """``tiny`` under ``fusion``; ``family="mpt"``: its LM with ALiBi in place of positions."""
  config = model_config.tiny()
  config.fusion = fusion
  if family == "mpt":
    config.lm = model_config.lm_config(family="mpt", vocab_size=V, num_layers=2, embed_dim=32,
                                       num_heads=4, mlp_dim=64, max_length=64)
  return config


def _trainer_config(model):
  """A trainer config holding the model config ``model`` (stages read ``config.model``)."""
  config = configs.base_config()
  config.model = model
  return config


def _paths(model, filter_) -> set:
  return {path for path, _ in nnx.to_flat_state(nnx.state(model, filter_))}


def _images(seed, batch=2, num_media=2):
  size = model_config.tiny().vision.image_size
  return jax.random.normal(jax.random.key(seed), (batch, num_media, 1, size, size, 3))


def _ids(rows):
  """Rows of ints and "I" (one image: N <image> tokens) -> int32 [B, L]."""
  return jnp.array([sequence.expand_media_tokens([IMG if x == "I" else x for x in row], IMG, N)
                    for row in rows], jnp.int32)


# Two samples, two images each: text, image, text, image, text (no added token but <image>, so
# the bare LM can read them once the images are swapped for a word).
IDS = _ids([[5, 6, "I", 7, 8, 9, "I", 10, 11], [12, "I", 13, 14, "I", 15, 16, 17, 18]])


@nnx.jit
def _forward(model, images, ids, prefix_end=None):
  return model(images, ids, prefix_end=prefix_end)


def _part_norms(grads) -> dict[str, float]:
  norms = {}
  for path, value in nnx.to_flat_state(grads):
    norms[path[0]] = norms.get(path[0], 0.0) + float(jnp.sum(jnp.square(value[...])))
  return norms


def test_fusion_setting_is_checked_and_sets_the_media_tokens():
  with pytest.raises(ValueError, match=r"config.model.fusion must be one of .* got 'early'"):
    model_config.media_tokens_per_image(_config("early"))
  with pytest.raises(ValueError, match="config.model.fusion"):
    Flamingo(_config("early"), rngs=nnx.Rngs(0))
  assert [model_config.media_tokens_per_image(_config(m)) for m in model_config.FUSION_MODES] \
      == [1, N, N]
  # Only cross-attention builds gated blocks; the others build the projection instead.
  for mode, blocks in (("xattn", 2), ("prefix", 0), ("joint", 0)):
    model = nnx.eval_shape(lambda: Flamingo(_config(mode), rngs=nnx.Rngs(0)))
    assert len(model.gated_blocks) == len(flamingo_lib.gated_layers(_config(mode))) == blocks
    assert (model.prefix_projection is None) == (mode == "xattn")


def test_prefix_latents_replace_the_image_tokens_exactly():
  """Must-show 1: with the projection's output set to the embedding of a word, the prefix model
  is the frozen LM fed that word at each <image> position."""
  model = Flamingo(_config("prefix"), rngs=nnx.Rngs(0))
  word = 42
  projection = model.prefix_projection
  projection.kernel[...] = jnp.zeros_like(projection.kernel[...])
  projection.bias[...] = model.lm.token_embed.embedding[...][word]
  logits = _forward(model, _images(1), IDS)
  expected = nnx.jit(lambda lm, ids: lm(ids))(model.lm, jnp.where(IDS == IMG, word, IDS))
  np.testing.assert_allclose(np.asarray(logits[..., :V]), np.asarray(expected), atol=1e-5,
                             rtol=0)
  # The images matter once the projection reads the latents: each run takes its own image.
  model = Flamingo(_config("prefix"), rngs=nnx.Rngs(0))
  base = _forward(model, _images(1), IDS)
  other = _forward(model, _images(1).at[:, 1].add(1.0), IDS)
  second_run_start = int(np.nonzero(np.asarray(IDS[0] == IMG))[0][N])
  np.testing.assert_array_equal(base[0, :second_run_start], other[0, :second_run_start])
  assert not np.allclose(base[0, second_run_start:], other[0, second_run_start:])
  # Exactly: the k-th <image> token of image t takes latent k of image t.
  latents = model.encode_media(_images(1))
  inputs, projected = model.input_embeddings(IDS, latents), model.prefix_projection(latents)
  for b in range(2):
    for j, p in enumerate(np.nonzero(np.asarray(IDS[b] == IMG))[0]):
      np.testing.assert_array_equal(inputs[b, p], projected[b, j // N, j % N])


def test_prefix_gradients_reach_only_the_projection_resampler_and_added_rows():
  config = _config("prefix")
  model = Flamingo(config, rngs=nnx.Rngs(2))
  ids = IDS.at[:, -1].set(EOC)
  images = _images(3)
  train = flamingo_lib.trainable_params(config)

  def loss_fn(m):
    return jnp.mean(m(images, ids) ** 2)

  grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, train)))(model)
  norms = _part_norms(grads)
  assert set(norms) == {"resampler", "prefix_projection", "added_embed", "added_head"}
  assert norms["resampler"] > 0 and norms["prefix_projection"] > 0
  # Differentiated with respect to everything, the tower still gets nothing (stop_gradient).
  every = _part_norms(nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.Param)))(model))
  assert every["vision"] == 0 and every["lm"] > 0
  # One optimizer step moves the trainable parts and leaves the LM and the tower bit-identical.
  frozen = flamingo_lib.frozen_params(config)
  assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, frozen))} == {"lm", "vision"}
  before = jax.tree.map(np.array, nnx.state(model, frozen))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=train)
  optimizer.update(model, grads)
  for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(nnx.state(model, frozen))):
    np.testing.assert_array_equal(b, np.asarray(a))
  # The trainer reads the mode's filter from the stage.
  assert _paths(model, stages.FLAMINGO.trainable(_trainer_config(config))) == _paths(model, train)
  assert _paths(model, stages.FLAMINGO.trainable(_trainer_config(_config("xattn")))) \
      != _paths(model, train)


_prefill = nnx.jit(Flamingo.prefill, static_argnames=("max_length",))
_decode_step = nnx.jit(Flamingo.decode_step)


def _decode_all(model, images, ids, mask, prompt_len):
  logits, cache = _prefill(model, images, ids[:, :prompt_len], mask[:, :prompt_len],
                           max_length=ids.shape[1])
  steps = [logits]
  for t in range(prompt_len, ids.shape[1]):
    step_logits, cache = _decode_step(model, ids[:, t:t + 1], cache)
    steps.append(step_logits)
  return jnp.concatenate(steps, axis=1)


@pytest.mark.parametrize("fusion,family", [("prefix", "gpt2"), ("joint", "gpt2"),
                                           ("joint", "mpt")])
def test_prefill_and_decode_reproduce_the_full_forward(fusion, family):
  """Must-show 3. The prompt (both images) is prefilled, then text tokens are decoded one by one;
  sample 1 is left padded. Under joint fusion the full forward's prefix is the prompt."""
  model = Flamingo(_config(fusion, family), rngs=nnx.Rngs(4))
  ids = jnp.concatenate([jnp.zeros((2, 2), jnp.int32), IDS, jnp.array([[20, 21, EOC]] * 2)],
                        axis=1).at[0, :2].set(jnp.array([3, 4]))
  mask = jnp.ones_like(ids).at[1, :2].set(0)
  prompt_len = ids.shape[1] - 3  # both images are in the prompt
  full = nnx.jit(Flamingo.__call__)(model, _images(5), ids, mask,
                                    prefix_end=jnp.full((2,), prompt_len))
  decoded = _decode_all(model, _images(5), ids, mask, prompt_len)
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(decoded)[real], np.asarray(full)[real], rtol=1e-5,
                             atol=1e-5)
  if fusion == "joint":  # the prompt really is bidirectional: a causal forward differs there
    causal = nnx.jit(Flamingo.__call__)(model, _images(5), ids, mask,
                                        prefix_end=jnp.zeros((2,), jnp.int32))
    assert not np.allclose(np.asarray(causal[:, :prompt_len - 1]),
                           np.asarray(full[:, :prompt_len - 1]), atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "mpt"])
def test_joint_attention_is_bidirectional_over_the_prefix_and_causal_after(family):
  """Must-show 2: a change at a later position never changes an earlier logit outside the
  prefix; a change inside the prefix reaches every prefix position, before it too. MPT: the
  same under ALiBi."""
  model = Flamingo(_config("joint", family), rngs=nnx.Rngs(6))
  images, length = _images(7), IDS.shape[1]
  boundary = int(np.nonzero(np.asarray(IDS[0] == IMG))[0][N - 1]) + 2  # first image + one word
  prefix_end = jnp.full((2,), boundary)
  base = np.asarray(_forward(model, images, IDS, prefix_end))
  for p in range(length):
    if IDS[0, p] == IMG:
      continue
    changed = np.asarray(_forward(model, images, IDS.at[0, p].set(IDS[0, p] + 1), prefix_end))
    np.testing.assert_array_equal(changed[1], base[1])  # the other sample
    if p >= boundary:
      np.testing.assert_array_equal(changed[0, :p], base[0, :p])
    else:
      assert all(not np.allclose(changed[0, q], base[0, q]) for q in range(boundary))
  # The first image, inside the prefix, reaches the words before it; a causal model's do not.
  moved = np.asarray(_forward(model, images.at[0, 0].add(1.0), IDS, prefix_end))
  assert not np.allclose(moved[0, 0], base[0, 0])
  causal = Flamingo(_config("prefix"), rngs=nnx.Rngs(6))
  np.testing.assert_array_equal(_forward(causal, images.at[0, 0].add(1.0), IDS)[0, 0],
                                _forward(causal, images, IDS)[0, 0])
  with pytest.raises(ValueError, match="prefix_end must be given"):
    model(images, IDS)


def test_alibi_penalises_distance_both_ways_over_a_bidirectional_prefix():
  """MPT's bias -m|q - k|: over the causal part (k <= q) it is MPT's -m(q - k); over a joint
  prefix a key after the query is penalised by its distance as one before it is, never
  rewarded."""
  slopes = layers.alibi_slopes(4)
  bias = np.asarray(layers.alibi_bias(slopes, jnp.arange(6), jnp.arange(6)))
  q, k = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
  causal = k <= q
  mpt = -np.asarray(slopes)[:, None, None] * (q - k)[None]
  np.testing.assert_allclose(bias[:, causal], mpt[:, causal], rtol=0, atol=1e-6)
  np.testing.assert_allclose(bias, np.swapaxes(bias, 1, 2), rtol=0, atol=1e-6)
  assert (bias[:, ~causal] < 0).all()


def test_joint_trains_every_parameter_the_tower_included():
  config = _config("joint")
  model = Flamingo(config, rngs=nnx.Rngs(8))
  ids = IDS.at[:, -1].set(EOC)
  labels = jnp.where(jnp.arange(ids.shape[1]) >= 8, ids, sequence.IGNORE_INDEX)
  batch = {"images": _images(9), "input_ids": ids, "attention_mask": jnp.ones_like(ids),
           "media_mask": jnp.ones((2, 2), bool), "labels": labels}
  train = stages.FLAMINGO.trainable(_trainer_config(config))
  assert train is nnx.Param
  grads = nnx.jit(nnx.grad(lambda m: stages.FLAMINGO.loss_sum(m, batch),
                           argnums=nnx.DiffState(0, train)))(model)
  norms = _part_norms(grads)
  assert set(norms) == {p[0] for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert all(norms[part] > 0 for part in ("lm", "vision", "resampler", "prefix_projection",
                                          "added_head"))
  assert nnx.state(model, flamingo_lib.frozen_params(config)) == nnx.State({})


def test_first_supervised_is_the_prefix_boundary():
  labels = jnp.array([[-100, -100, 5, 6], [-100, -100, -100, -100], [1, 2, -100, -100]])
  np.testing.assert_array_equal(stages.first_supervised(labels), [2, 4, 0])


# -- the data layer: one image, one run of N tokens ---------------------------------------------


def test_runs_are_written_by_one_function_for_examples_and_prompts():
  tok = word_tokenizer()
  shape = (1, 2, 2, 3)
  chunks = ["p", image(1), "a b", image(2), "c"]
  ex = sequence.build_example(chunks, tok, max_tokens=20, max_images=3, image_shape=shape,
                              media_tokens=3)
  expected = sequence.expand_media_tokens(
      ids_of(tok, "p", "<image>", "a", "b", "<eoc>", "<image>", "c", "<eoc>", "<eos>"),
      tok.media_token_id, 3)
  np.testing.assert_array_equal(ex["input_ids"][:len(expected)], expected)
  assert ex["num_images"] == 2
  np.testing.assert_array_equal(ex["labels"][:len(expected)] != sequence.IGNORE_INDEX,
                                [t in ids_of(tok, "a", "b", "c", "<eoc>") for t in expected])
  # A cut inside a run drops the whole run and its image; labels follow the one rule.
  for max_tokens in range(1, len(expected) + 1):
    ex = sequence.build_example(chunks, tok, max_tokens=max_tokens, max_images=3,
                                image_shape=shape, media_tokens=3)
    count = int((ex["input_ids"] == tok.media_token_id).sum())
    assert count == 3 * int(ex["num_images"]) == 3 * int(ex["media_mask"].sum())
    kept = ex["input_ids"][ex["attention_mask"].astype(bool)]
    np.testing.assert_array_equal(kept, expected[:len(kept)])
  # Answer supervision starts after the run.
  ex = sequence.build_example([image(1), "p q ", "a"], tok, max_tokens=12, max_images=1,
                              image_shape=shape, supervise="answer", media_tokens=3)
  assert list(np.nonzero(ex["labels"] != sequence.IGNORE_INDEX)[0]) == [5, 6]


def test_processor_expands_each_image_into_the_models_run():
  tokenizer = default_tokenizer()
  config = _config("prefix")
  config.lm.vocab_size = tokenizer.lm_vocab_size
  processor = Processor.from_model_config(config, tokenizer)
  pixels = np.zeros((8, 8, 3), np.uint8)
  batch = processor(["<image>a red square<image>", "a<image>"], [[pixels, pixels], [pixels]])
  counts = (batch.input_ids == tokenizer.media_token_id).sum(-1)
  np.testing.assert_array_equal(counts, [2 * N, N])
  # The length the evaluation pads to is the processor's count of the model's ids.
  assert len(processor.token_ids("<image>a red square<image>")) == batch.attention_mask[0].sum()
  model = Flamingo(config, rngs=nnx.Rngs(0))
  model(batch.images, batch.input_ids, batch.attention_mask, media_mask=batch.media_mask)
  with pytest.raises(ValueError, match="runs of exactly 4"):
    model(batch.images, batch.input_ids[:, 1:], batch.attention_mask[:, 1:])


# -- training-free fusion -------------------------------------------------------------------------


def _frozen_lm_and_towers():
  """A random tiny LM and random contrastive towers over its vocabulary (nothing trained)."""
  text = model_config.lm_config(family="gpt2", vocab_size=V, num_layers=2, embed_dim=32,
                                num_heads=4, mlp_dim=64, max_length=64)
  lm = DecoderLM(text, rngs=nnx.Rngs(10))
  towers = DualEncoder(model_config.tiny().vision, text, embed_dim=16, init_temperature=0.07,
                       rngs=nnx.Rngs(11))
  return lm, towers


def _greedy_reference(lm, ids, mask, num_new):
  """Greedy decoding by the full forward over a buffer the new tokens fill, no cache."""
  forward = nnx.jit(lambda lm, ids, mask: lm(ids, mask))
  length = ids.shape[1]
  ids = jnp.pad(ids, ((0, 0), (0, num_new)))
  mask = jnp.pad(mask, ((0, 0), (0, num_new)))
  for t in range(num_new):
    token = jnp.argmax(forward(lm, ids, mask)[:, length + t - 1], axis=-1).astype(jnp.int32)
    ids, mask = ids.at[:, length + t].set(token), mask.at[:, length + t].set(1)
  return ids[:, length:]


def test_magic_weight_zero_is_greedy_and_a_positive_weight_raises_the_similarity():
  """Must-show 4, with random towers: the re-ranking maximises log p + weight * sim at each step,
  which does not by construction make the finished caption's similarity higher than greedy's;
  on these fixed seeds it is higher on average, and for most images."""
  lm, towers = _frozen_lm_and_towers()
  b, num_new = 8, 6
  key = jax.random.key(12)
  ids = jax.random.randint(key, (b, 5), 1, V)
  mask = jnp.ones_like(ids).at[::2, :2].set(0)  # every other prompt is left padded
  ids = jnp.where(mask == 1, ids, 0)
  size = model_config.tiny().vision.image_size
  pixels = jax.random.normal(jax.random.fold_in(key, 1), (b, size, size, 3))

  greedy = _greedy_reference(lm, ids, mask, num_new)
  out = magic_tokens(lm, towers, pixels, ids, mask,
                     MagicConfig(weight=0.0, max_new_tokens=num_new))
  zero, lengths, stopped = out.tokens, out.lengths, out.stopped
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(greedy))
  assert (np.asarray(lengths) == num_new).all() and not np.asarray(stopped).any()

  def similarity(tokens):
    image_emb, text_emb = towers(pixels, tokens, jnp.ones_like(tokens))
    return np.asarray(jnp.sum(image_emb * text_emb, axis=-1))

  guided = magic_tokens(lm, towers, pixels, ids, mask,
                        MagicConfig(weight=5.0, max_new_tokens=num_new)).tokens
  assert not np.array_equal(np.asarray(guided), np.asarray(greedy))
  gain = similarity(guided) - similarity(greedy)
  assert gain.mean() > 0 and (gain > 0).sum() > b // 2


def test_magic_stops_at_a_stop_token_and_pads_after_it():
  lm, towers = _frozen_lm_and_towers()
  ids = jnp.array([[5, 6, 7]])
  size = model_config.tiny().vision.image_size
  pixels = jnp.zeros((1, size, size, 3))
  free = magic_tokens(lm, towers, pixels, ids, jnp.ones_like(ids),
                      MagicConfig(weight=1.0, max_new_tokens=5)).tokens
  stop = int(free[0, 1])
  out = magic_tokens(
      lm, towers, pixels, ids, jnp.ones_like(ids),
      MagicConfig(weight=1.0, max_new_tokens=5, stop_token_ids=(stop,), pad_token_id=0))
  tokens, lengths, stopped = out.tokens, out.lengths, out.stopped
  first = int(np.nonzero(np.asarray(free[0]) == stop)[0][0])
  np.testing.assert_array_equal(tokens[0, :first + 1], free[0, :first + 1])
  assert (np.asarray(tokens[0, first + 1:]) == 0).all()
  assert int(lengths[0]) == first + 1 and bool(stopped[0])
  with pytest.raises(ValueError, match="weight must be"):
    MagicConfig(weight=-1.0)


def test_socratic_prompt_puts_captions_and_demos_in_the_frozen_lms_prompt():
  tokenizer = default_tokenizer()
  lm = DecoderLM(model_config.lm_config(family="gpt2", vocab_size=tokenizer.lm_vocab_size,
                                        num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32,
                                        max_length=128), rngs=nnx.Rngs(0))
  processor = Processor(tokenizer, image_size=8, image_mean=(0.5,) * 3, image_std=(0.5,) * 3,
                        max_length=128)
  seen = []

  def captioner(images):
    seen.append(list(images))
    return [f"a {name} square" for name in images]

  answers = socratic_answer(lm, processor, captioner, ["red", "blue"], ["what colour?"] * 2,
                            demos=[("green", "what colour?", "green")], max_new_tokens=4)
  assert seen == [["green", "red", "blue"]]  # demos and queries captioned in one call
  prompt = socratic_prompt("a red square", "what colour?",
                           [("a green square", "what colour?", "green")])
  assert prompt == ("Context: a green square\nQuestion: what colour?\nAnswer: green\n\n"
                    "Context: a red square\nQuestion: what colour?\nAnswer:")
  expected = greedy_text(lm, processor, [prompt], max_new_tokens=4).text[0]
  assert answers[0] == expected.split("\n")[0].strip()
  with pytest.raises(ValueError, match="one per image"):
    socratic_answer(lm, processor, lambda images: [], ["red"], ["q"])
  # The shapes world's own QA layout, as the fusion comparison writes it.
  shapes = socratic_prompt("A red star.", "What colour is it?",
                           [("A blue heart.", "Shape?", "heart")],
                           template=training_free_recipe.SHAPES_QA, separator=" ")
  assert shapes == ("A blue heart. Question:Shape? Short answer:heart "
                    "A red star. Question:What colour is it? Short answer:")
  with pytest.raises(ValueError, match="must end with"):
    socratic_prompt("c", "q", template="{answer} {context} {question}")


def test_the_magic_captioner_decodes_each_image_once_in_batches_of_one_shape():
  tokenizer = default_tokenizer()
  text = model_config.lm_config(family="gpt2", vocab_size=tokenizer.lm_vocab_size, num_layers=1,
                                embed_dim=16, num_heads=2, mlp_dim=32, max_length=64)
  lm = DecoderLM(text, rngs=nnx.Rngs(0))
  vision = model_config.tiny().vision
  towers = DualEncoder(vision, text, embed_dim=16, init_temperature=0.07, rngs=nnx.Rngs(1))
  processor = Processor(tokenizer, image_size=vision.image_size, image_mean=(0.5,) * 3,
                        image_std=(0.5,) * 3, max_length=64)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (vision.image_size,) * 2 + (3,), dtype=np.uint8)
            for _ in range(3)]
  settings = dict(weight=1.0, num_candidates=4, max_new_tokens=4)
  captioner = training_free_recipe.MagicCaptioner(lm, towers, processor, prompt="An image with",
                                                  batch_size=2, **settings)
  captions = captioner([images[0], images[1], images[0], images[2]])
  assert len(captioner.captions) == 3 and captions[0] == captions[2]
  # The last batch held images[2] and a copy of it: the same as decoding it in such a batch.
  alone = magic_generate(lm, towers, processor, ["An image with"] * 2, [images[2]] * 2,
                         **settings).text[0]
  assert captions[3] == training_free_recipe.first_sentence(f"An image with{alone}")
  assert training_free_recipe.first_sentence(" A red star. Then more") == "A red star."
  assert training_free_recipe.first_sentence("no stop ") == "no stop"
  assert captioner([images[2], images[1]]) == [captions[3], captions[1]]
  assert len(captioner.captions) == 3


@pytest.mark.slow
@pytest.mark.parametrize("fusion", ["prefix", "joint"])
def test_the_trainer_trains_what_the_mode_says(tmp_path, fusion):
  """Three steps of the Flamingo stage through the one trainer (shapes-world data, runs of
  num_latents <image> tokens): prefix leaves the LM and the tower bit-identical, joint moves them."""
  config = tiny(**{"model.fusion": fusion})
  initial = leaves(trainer.create_train_state(trainer.setup(config)).params)
  final = leaves(trainer.train(config, str(tmp_path)).params)
  moved = {name for name in final if not np.array_equal(final[name], initial[name])}
  assert any(name.startswith("prefix_projection/") for name in moved)
  assert any(name.startswith("resampler/") for name in moved)
  towers_moved = {name.split("/")[0] for name in moved} & {"lm", "vision"}
  assert towers_moved == (set() if fusion == "prefix" else {"lm", "vision"})


@pytest.mark.slow
def test_the_fusion_comparison_writes_its_table_and_plot(tmp_path):
  """The comparison (``experiments/shapes_tiny.py:fusion_smoke``), cut to a few steps and
  queries, two tasks and, of the trained modes, the two that differ from the recipe's own (which
  the recipe's smoke test trains and evaluates): a row per trained mode with its parameters,
  times and scores, the training-free rows with theirs (no parameters, no step time), and the
  plot."""
  config = experiment_config("shapes_tiny", "fusion_smoke")
  config.fusion_modes = "prefix,joint,magic,socratic"
  for stage in config.stages.values():
    stage.total_steps = 4
    stage.optimizer.warmup_steps = 0
    stage.checkpoint.every_steps = 4
  config.eval.tasks = "shapes_captioning,shapes_vqa"
  config.eval.shapes.num_queries = 4
  config.eval.shapes.pool_size = 32
  config.eval.batch_size = 4
  rows = fusion_recipe.run(config, str(tmp_path))
  assert list(rows) == ["prefix", "joint", "magic", "socratic"]
  trainable = {mode: row["trainable_parameters"] for mode, row in rows.items()}
  xattn = recipe.stage_config(config, "flamingo", tmp_path).model  # the default mode
  assert trainable["prefix"] < parameters.count_parameters(xattn)["trainable"] < trainable["joint"]
  assert trainable["magic"] == trainable["socratic"] == 0
  tasks = {"shapes_captioning", "shapes_vqa"}
  for mode in ("prefix", "joint"):
    assert set(rows[mode]["results"]) == tasks
    assert all(set(by_shot) == {0, 4} for by_shot in rows[mode]["results"].values())
    assert rows[mode]["step_time"] > 0 and rows[mode]["eval_seconds"] > 0
  assert rows["magic"]["results"].keys() == {"shapes_captioning"}
  assert rows["magic"]["results"]["shapes_captioning"].keys() == {0}
  assert rows["socratic"]["results"].keys() == {"shapes_vqa"}
  for mode in ("magic", "socratic"):
    assert np.isnan(rows[mode]["step_time"]) and rows[mode]["eval_seconds"] > 0
    scores = [v for by_shot in rows[mode]["results"].values() for v in by_shot.values()]
    assert scores and all(0 <= v <= 1000 for v in scores)
  text = (tmp_path / fusion_recipe.TABLE).read_text()
  assert all(f"\n| {mode} | {trainable[mode]:,} |" in text for mode in rows)
  assert "\n| magic | 0 | – |" in text
  assert "VQA accuracy (%), 4-shot" in text
  assert (tmp_path / fusion_recipe.FIGURE).stat().st_size > 10_000
  with pytest.raises(ValueError, match="config.fusion_modes"):
    config.fusion_modes = "xattn,early"
    fusion_recipe.modes(config)


def test_training_free_modes_without_their_settings_fail_at_start():
  config = experiment_config("shapes_tiny", "fusion_smoke")
  assert fusion_recipe.modes(config) == ["xattn", "prefix", "joint", "magic", "socratic"]
  config.training_free.magic_weight = -1.0
  with pytest.raises(ValueError, match=r"config.training_free \(magic_weight.*weight must be"):
    fusion_recipe.modes(config)
  config.training_free.caption_prompt = " "
  with pytest.raises(ValueError, match="config.training_free.caption_prompt"):
    fusion_recipe.modes(config)
  del config.training_free["magic_candidates"]
  with pytest.raises(ValueError, match=r"config.training_free: .*missing \['magic_candidates'\]"):
    fusion_recipe.modes(config)
  del config.training_free
  config.fusion_modes = "xattn,prefix"
  assert fusion_recipe.modes(config) == ["xattn", "prefix"]


def test_the_fusion_table_has_a_row_per_mode_and_a_column_per_task_and_shots(tmp_path):
  rows = {mode: {"trainable_parameters": 1000 * (i + 1), "step_time": 0.25, "eval_seconds": 12.0,
                 "results": {"shapes_vqa": {0: 10.0 + i, 4: 20.0 + i},
                             "shapes_captioning": {0: 5.0, 4: 7.5}}}
          for i, mode in enumerate(("xattn", "prefix"))}
  lines = fusion_recipe.table(rows).splitlines()
  assert lines[2].startswith("| mode | trainable params | step time (s) | evaluation (s) | "
                             "captioning (CIDEr), 0-shot | captioning (CIDEr), 4-shot | "
                             "VQA accuracy (%), 0-shot | VQA accuracy (%), 4-shot |")
  assert lines[4] == "| xattn | 1,000 | 0.250 | 12 | 5.0 | 7.5 | 10.0 | 20.0 |"
  assert lines[5] == "| prefix | 2,000 | 0.250 | 12 | 5.0 | 7.5 | 11.0 | 21.0 |"
  fusion_recipe.plot(rows, tmp_path / "fusion.png")
  assert (tmp_path / "fusion.png").stat().st_size > 10_000
