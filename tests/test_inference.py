"""Inference: the processor's batches and errors, cached vs recomputed generation, left padding,
beam search, scoring of continuations and sharded parameters.

One random tiny model with its gates opened (so images change the logits) and fixed batch shapes,
so the compiled loops are shared between tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from xattn_vlm.data import default_tokenizer
from xattn_vlm.inference import (Batch, GenerationConfig, InferenceModel, Processor, generate,
                                 generate_tokens, score)
from xattn_vlm.inference import decoding
from xattn_vlm.models import config as model_config
from xattn_vlm.models.flamingo import Flamingo

NEW = 6  # max_new_tokens
LENGTH = 36  # padded prompt length
SLOTS = 5  # padded image slots


@pytest.fixture(scope="module")
def tokenizer():
  return default_tokenizer()


@pytest.fixture(scope="module")
def config(tokenizer):
  cfg = model_config.tiny()
  cfg.lm.vocab_size = tokenizer.lm_vocab_size
  return cfg


@pytest.fixture(scope="module")
def model(config):
  m = nnx.jit(lambda: Flamingo(config, rngs=nnx.Rngs(0)))()
  for block in m.gated_blocks:
    block.attn_gate[...] = jnp.asarray(1.0)
    block.ffw_gate[...] = jnp.asarray(1.0)
  return m


@pytest.fixture(scope="module")
def split(model):
  return InferenceModel(model)


@pytest.fixture(scope="module")
def processor(config, tokenizer):
  return Processor.from_model_config(config, tokenizer)


def _image(seed):
  return np.random.default_rng(seed).integers(0, 256, (20, 12, 3), dtype=np.uint8)


# 0, 1 and 5 images, different lengths; the last two in the interleaved-list form.
PROMPTS = [
    "A photo of a red star.<|endofchunk|>A photo of",
    [_image(0), "Output: a blue"],
    [_image(1), "a red star.<|endofchunk|>", _image(2), "a green circle.<|endofchunk|>",
     _image(3), "two squares.<|endofchunk|>", _image(4), "a cross.<|endofchunk|>", _image(5),
     "Output:"],
]


@pytest.fixture(scope="module")
def batch(processor):
  return processor(PROMPTS, pad_to_length=LENGTH, max_images=SLOTS)


def _config(tokenizer, **kw):
  return GenerationConfig(max_new_tokens=NEW, stop_token_ids=(tokenizer.eoc_token_id,
                                                              tokenizer.eos_token_id),
                          pad_token_id=tokenizer.pad_token_id,
                          suppress_token_ids=(tokenizer.media_token_id,), **kw)


@pytest.fixture(scope="module")
def greedy(split, batch, tokenizer):
  return jax.device_get(generate_tokens(split, batch, _config(tokenizer)))


# -- processor ---------------------------------------------------------------------------------


def test_processor_left_pads_and_places_images(processor, batch, tokenizer):
  counts = [0, 1, 5]
  assert batch.input_ids.shape == (3, LENGTH)
  assert batch.images.shape == (3, SLOTS, 1, 16, 16, 3)
  np.testing.assert_array_equal(batch.media_mask.sum(1), counts)
  np.testing.assert_array_equal((batch.input_ids == tokenizer.media_token_id).sum(1), counts)
  assert np.all(batch.attention_mask[:, -1] == 1)  # left padding: every prompt ends last
  for row, mask in zip(batch.input_ids, batch.attention_mask):
    first = np.argmax(mask)
    assert mask[first:].all() and not mask[:first].any()
  assert not batch.images[~batch.media_mask].any()  # padded slots are zeros
  # Text with placeholders plus an image list is the same prompt as the interleaved list.
  again = processor(["<image>Output: a blue"], [[_image(0)]])
  np.testing.assert_array_equal(again.input_ids[0], batch.input_ids[1][batch.attention_mask[1] > 0])
  np.testing.assert_array_equal(again.images[0, 0], batch.images[1, 0])


@pytest.mark.parametrize("prompts, images, message", [
    (["a", "<image>x<image>y"], [[], [_image(0)]], r"prompt 1 has 2 <image> placeholders but 1 "),
    (["<image>x"], [[_image(0), _image(1)]], r"prompt 0 has 1 <image> placeholders but 2 "),
    (["a", [_image(0), "b"], ""], None, r"prompt 2 is empty \(0 tokens\)"),
    (["a", "red " * 70], None, r"prompt 1 has \d+ tokens, more than the model's context of 64"),
])
def test_processor_errors_name_the_prompt_and_counts(processor, prompts, images, message):
  with pytest.raises(ValueError, match=message):
    processor(prompts, images)


def test_processor_refuses_a_tokenizer_of_another_vocabulary(config, tokenizer):
  """The model takes <image> as id lm.vocab_size: a tokenizer of another size would go unseen."""
  other = config.copy_and_resolve_references()
  other.lm.vocab_size = tokenizer.lm_vocab_size + 64
  with pytest.raises(ValueError, match=rf"lm\.vocab_size={other.lm.vocab_size} must equal the "
                                       rf"tokenizer's vocabulary \({tokenizer.lm_vocab_size}\) "
                                       r"in the model's config"):
    Processor.from_model_config(other, tokenizer)


def test_processor_unreadable_image_names_the_prompt(processor, tmp_path):
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"not a jpeg")
  with pytest.raises(ValueError, match=r"prompt 1: image 0 \(.*corrupt.jpg\) cannot be read"):
    processor(["a", [corrupt, "b"]])
  with pytest.raises(ValueError, match=r"prompt 0: image 1 \(.*missing.jpg\) cannot be read"):
    processor(["<image>a<image>b"], [[_image(0), str(tmp_path / "missing.jpg")]])


# -- generation --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_media_split(config):
  """The model attending to every earlier image (``only_attend_immediate_media=False``), gates
  open: decoding then keeps every image's keys and values instead of the last one's."""
  cfg = model_config.tiny()
  cfg.lm.vocab_size = config.lm.vocab_size
  cfg.xattn.only_attend_immediate_media = False
  m = nnx.jit(lambda: Flamingo(cfg, rngs=nnx.Rngs(0)))()
  for block in m.gated_blocks:
    block.attn_gate[...] = jnp.asarray(1.0)
    block.ffw_gate[...] = jnp.asarray(1.0)
  return InferenceModel(m)


def test_attending_to_all_media_generates_as_the_full_forward(all_media_split, split, batch,
                                                              tokenizer, greedy):
  cached = jax.device_get(generate_tokens(all_media_split, batch, _config(tokenizer)))
  full = jax.device_get(generate_tokens(all_media_split, batch,
                                        _config(tokenizer, use_cache=False)))
  np.testing.assert_array_equal(cached.tokens, full.tokens)
  np.testing.assert_allclose(cached.log_probs, full.log_probs, atol=1e-4)
  # The same weights attending to the last image only decode differently on multi-image prompts.
  assert not np.allclose(cached.log_probs[2], greedy.log_probs[2], atol=1e-3)


def test_cached_generation_equals_recomputed_generation(split, batch, tokenizer, greedy):
  """Prefill + decode steps (LM KV cache, cross-attention keys/values computed once) pick the same
  tokens as running the full forward over the prompt and the tokens so far at every step."""
  full = jax.device_get(generate_tokens(split, batch, _config(tokenizer, use_cache=False)))
  np.testing.assert_array_equal(greedy.tokens, full.tokens)
  np.testing.assert_allclose(greedy.log_probs, full.log_probs, atol=1e-4)
  np.testing.assert_array_equal(greedy.lengths, full.lengths)


def test_images_change_the_generation(split, batch, tokenizer, greedy):
  """The gates are open, so the test above really exercises the cross-attention caches."""
  other = Batch(batch.input_ids, batch.attention_mask, -batch.images, batch.media_mask)
  flipped = jax.device_get(generate_tokens(split, other, _config(tokenizer)))
  np.testing.assert_allclose(greedy.log_probs[0], flipped.log_probs[0], atol=1e-5)  # no image
  assert not np.allclose(greedy.log_probs[1:], flipped.log_probs[1:], atol=1e-3)


def test_decode_state_does_not_grow_with_the_images(split, processor, tokenizer):
  """After prefill only the last image's cross-attention keys/values stay in the loop state, so a
  decode step costs the same for 1 and 5 image slots (nothing is compiled here, only traced)."""

  def loop_state(max_images):
    batch = processor([[_image(0), "Output:"]], pad_to_length=LENGTH, max_images=max_images)

    def run(params):
      logits, state, step = decoding.start_cached(split.graph.merge(params), batch.images,
                                                  batch.input_ids, batch.attention_mask, NEW)
      return decoding.sample_loop(logits, state, step, _config(tokenizer), jax.random.key(0))

    (loop,) = [e for e in jax.make_jaxpr(run)(split.params).eqns if e.primitive.name == "while"]
    return [v.aval for v in loop.invars]

  assert loop_state(1) == loop_state(SLOTS)


def test_decode_state_reproduces_the_full_forward(model, batch):
  """Generation's cached path (prefill logits of the last position only, heads-first caches, the
  cross-attention keys/values of each prompt's last image only) gives the training forward's
  logits at the prompt's last position and at every fed token, within 1e-5."""
  fed = np.array([[7, 8, 9]] * len(PROMPTS), np.int32)
  ids = np.concatenate([batch.input_ids, fed], axis=1)
  mask = np.concatenate([batch.attention_mask, np.ones_like(fed)], axis=1)
  full = nnx.jit(lambda m, x, i, a: m(x, i, a))(model, batch.images, ids, mask)

  @nnx.jit
  def cached(m):
    logits, cache, step = decoding.start_cached(m, batch.images, batch.input_ids,
                                                batch.attention_mask, fed.shape[1])
    steps = [logits]
    for t in range(fed.shape[1]):
      logits, cache = step(jnp.asarray(fed[:, t]), cache)
      steps.append(logits)
    return jnp.stack(steps, axis=1), cache

  decoded, cache = cached(model)
  assert all(k.shape[2] == v.shape[2] == model.config.resampler.num_latents
             for k, v in cache.media_kv)
  np.testing.assert_allclose(np.asarray(decoded), np.asarray(full)[:, LENGTH - 1:], rtol=1e-5,
                             atol=1e-5)


def test_left_padding_changes_no_output(split, processor, tokenizer, greedy):
  for i, prompt in enumerate(PROMPTS):
    alone = processor([prompt])
    assert alone.attention_mask.all()
    out = jax.device_get(generate_tokens(split, alone, _config(tokenizer)))
    np.testing.assert_array_equal(out.tokens[0], greedy.tokens[i])
    np.testing.assert_allclose(out.log_probs[0], greedy.log_probs[i], atol=1e-4)


@nnx.jit(static_argnames=("config",))
def _beam_search(model, images, input_ids, attention_mask, config):
  """Beam search whatever num_beams (``generate_tokens`` runs greedy decoding for one beam)."""
  logits, state, step = decoding.start_cached(model, images, input_ids, attention_mask,
                                              config.max_new_tokens)
  return decoding.beam_search(logits, state, step, config)


def test_beam_search(model, split, batch, tokenizer, greedy):
  one = jax.device_get(_beam_search(model, batch.images, batch.input_ids, batch.attention_mask,
                                    _config(tokenizer, num_beams=1)))
  np.testing.assert_array_equal(one.tokens, greedy.tokens)
  np.testing.assert_allclose(one.log_probs, greedy.log_probs, atol=1e-5)
  beam = jax.device_get(generate_tokens(split, batch, _config(tokenizer, num_beams=3)))
  total = beam.log_probs.sum(-1)
  np.testing.assert_allclose(beam.scores, total, rtol=1e-5)  # length_penalty 0: the total
  assert np.all(total >= greedy.log_probs.sum(-1) - 1e-4)
  # Positions past each sequence's length hold padding and no log-prob.
  past = np.arange(NEW) >= beam.lengths[:, None]
  assert np.all(beam.tokens[past] == tokenizer.pad_token_id) and not beam.log_probs[past].any()


def test_generate_returns_text_up_to_the_stop_token(model, processor, tokenizer, greedy):
  out = generate(model, processor, PROMPTS, max_new_tokens=NEW, pad_to_length=LENGTH,
                 max_images=SLOTS)
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  for text, tokens, length, stopped in zip(out.text, out.tokens, out.lengths, out.stopped):
    kept = tokens[:length - int(stopped)]
    assert text == tokenizer.decode(kept)
    assert tokenizer.media_token_id not in tokens
    if stopped:
      assert tokens[length - 1] in (tokenizer.eoc_token_id, tokenizer.eos_token_id)


def test_top_k_and_top_p_filters():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1]]))
  kept = lambda x: np.isfinite(np.asarray(x))[0].tolist()
  assert kept(decoding.filter_logits(logits, 2, 1.0)) == [True, True, True, False]  # ties stay
  assert kept(decoding.filter_logits(logits, 0, 0.5)) == [True, False, False, False]
  assert kept(decoding.filter_logits(logits, 0, 0.6)) == [True, True, True, False]
  assert kept(decoding.filter_logits(logits, 1, 0.99)) == [True, False, False, False]


def test_sampling_with_top_k_1_is_greedy(split, batch, tokenizer, greedy):
  sampled = jax.device_get(generate_tokens(split, batch, _config(tokenizer, do_sample=True,
                                                                  top_k=1), rng=3))
  np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_sampling_is_seeded_and_reports_the_models_log_probs(split, batch, tokenizer):
  """Same seed, same tokens; another seed, other tokens; cached and recomputed sampling agree;
  each token's reported log-prob is the model's own, before temperature and filtering."""
  cfg = _config(tokenizer, do_sample=True, temperature=2.0)
  first = jax.device_get(generate_tokens(split, batch, cfg, rng=7))
  again = jax.device_get(generate_tokens(split, batch, cfg, rng=7))
  other = jax.device_get(generate_tokens(split, batch, cfg, rng=8))
  recomputed = jax.device_get(generate_tokens(
      split, batch, _config(tokenizer, do_sample=True, temperature=2.0, use_cache=False), rng=7))
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.tokens, recomputed.tokens)
  assert not np.array_equal(first.tokens, other.tokens)
  logits = split.graph.merge(split.params)(batch.images, batch.input_ids, batch.attention_mask)
  expected = jax.nn.log_softmax(logits[:, -1])[np.arange(3), first.tokens[:, 0]]
  np.testing.assert_allclose(first.log_probs[:, 0], expected, atol=1e-5)


def test_sampled_first_tokens_follow_the_filtered_distribution(split, processor, tokenizer):
  """512 copies of one prompt, temperature 2 and top-k 4: every first token is among the 4 most
  likely, with the frequencies of softmax(logits / 2) renormalised over them (chi-square at
  p = 0.001, 3 degrees of freedom)."""
  copies = processor([PROMPTS[1]] * 512, pad_to_length=LENGTH, max_images=SLOTS)
  out = jax.device_get(generate_tokens(split, copies, _config(tokenizer, do_sample=True,
                                                               temperature=2.0, top_k=4), rng=0))
  logits = split.graph.merge(split.params)(copies.images[:1], copies.input_ids[:1],
                                           copies.attention_mask[:1])[0, -1]
  logits = np.asarray(logits, np.float64) / 2.0
  logits[tokenizer.media_token_id] = -np.inf
  top = np.argsort(-logits)[:4]
  probs = np.exp(logits[top] - logits[top].max())
  probs /= probs.sum()
  counts = np.array([(out.tokens[:, 0] == t).sum() for t in top])
  assert counts.sum() == 512
  expected = 512 * probs
  assert ((counts - expected) ** 2 / expected).sum() < 16.27


def test_generation_config_errors_name_the_argument():
  with pytest.raises(ValueError, match="num_beams=1"):
    GenerationConfig(do_sample=True, num_beams=3)
  with pytest.raises(ValueError, match="top_p must be in"):
    GenerationConfig(top_p=0.0)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    GenerationConfig(max_new_tokens=0)


# -- scoring -----------------------------------------------------------------------------------


def test_scores_equal_log_probs_of_one_full_forward(model, split, processor, batch):
  continuations = [" red star.", " blue", " two green squares<|endofchunk|>"]
  scores = score(split, processor, PROMPTS, continuations, pad_to_length=LENGTH,
                 max_images=SLOTS, candidate_batch_size=2)
  # Reference: each prompt followed by each continuation, through the training forward.
  ids = [processor.tokenizer.encode(c) for c in continuations]
  width = max(map(len, ids))
  rows, masks, images = [], [], []
  for b in range(len(PROMPTS)):
    for c in ids:
      rows.append(np.concatenate([batch.input_ids[b], c, np.zeros(width - len(c), np.int32)]))
      masks.append(np.concatenate([batch.attention_mask[b], np.ones(len(c), np.int32),
                                   np.zeros(width - len(c), np.int32)]))
      images.append(batch.images[b])
  logits = nnx.jit(lambda m, x, i, a: m(x, i, a))(model, np.stack(images), np.stack(rows),
                                                   np.stack(masks))
  log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  expected = np.zeros((len(PROMPTS), len(continuations)))
  for r, row in enumerate(rows):
    b, c = divmod(r, len(continuations))
    for j in range(len(ids[c])):
      expected[b, c] += log_probs[r, LENGTH - 1 + j, row[LENGTH + j]]
  np.testing.assert_allclose(scores.log_probs, expected, atol=1e-4)
  np.testing.assert_array_equal(scores.num_tokens, np.tile([len(c) for c in ids], (3, 1)))


# -- sharding ----------------------------------------------------------------------------------


def test_sharded_parameters_give_the_same_generation(model, batch, tokenizer, greedy):
  """Params sharded over a (data 1, fsdp 2, tensor 4) mesh with Auto axes: the same compiled
  generation code runs and gives the unsharded tokens."""
  mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": "tensor"}
  graphdef, state = nnx.split(model)

  def shard(variable):
    value = variable.get_value()
    axes = variable.get_metadata().get("out_sharding") or (None,) * value.ndim
    spec = [rules[a] if a in rules and dim % mesh.shape[rules[a]] == 0 else None
            for a, dim in zip(axes, value.shape)]
    return variable.replace(jax.device_put(value, NamedSharding(mesh, PartitionSpec(*spec))))

  state = jax.tree.map(shard, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  sharded = nnx.merge(graphdef, state)
  kernel = sharded.lm.blocks[0].mlp.up.kernel.get_value()
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  out = jax.device_get(generate_tokens(sharded, batch, _config(tokenizer)))
  np.testing.assert_array_equal(out.tokens, greedy.tokens)
  np.testing.assert_allclose(out.log_probs, greedy.log_probs, atol=1e-4)
