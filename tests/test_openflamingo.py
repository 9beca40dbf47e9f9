"""OpenFlamingo checkpoints -> Flamingo (``models.pretrained.load_openflamingo``), against
open_flamingo 2.0.1's own ``Flamingo`` over tiny reference models saved as the published files are
(``reference_models``): the same logits on an interleaved 2-image prompt (left padding, text before
the first image) and the same 20 greedy tokens, for each published variant; and clear errors for a
checkpoint with a missing, extra or misshapen tensor, a wrong placement or vocabulary, and a
tokenizer whose special-token ids disagree.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx

import reference_models as ref
from xattn_vlm.data.tokenizer import Tokenizer
from xattn_vlm.inference import Batch, GenerationConfig, Processor, generate_tokens
from xattn_vlm.models import config as model_config
from xattn_vlm.models import pretrained

PRESETS = {"v1_llama": model_config.openflamingo_9b_v1, "mpt1b": model_config.openflamingo_3b,
           "mpt7b": model_config.openflamingo_9b, "rpj3b": model_config.openflamingo_4b}
NEW_TOKENS = 20


def _config(variant):
  """The variant's preset, set where the tiny files differ from the published ones: the
  tokenizer's vocabulary, the block interval, the perceiver's depth, float32."""
  config = PRESETS[variant]()
  config.lm.vocab_size = ref.TOKENIZER_VOCAB
  config.xattn.every_n_layers = ref.OPENFLAMINGO_VARIANTS[variant][1]
  config.resampler.depth = ref.PERCEIVER_DEPTH
  config.dtype = "float32"
  return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """(variant, attention) -> (reference, imported model, warnings of the import), each built
  once (the reference once per variant)."""
  torch.set_num_threads(1)
  references, cache = {}, {}

  def get(variant, attention="auto"):
    if variant not in references:
      reference = ref.openflamingo(variant, tmp_path_factory.mktemp(variant))
      if variant == "v1_llama":
        # v1 saved no head: the import fills the new tokens' output rows with the mean LM row.
        # The reference gets the same rows, so that all else can be compared exactly.
        with torch.no_grad():
          head = reference.model.lang_encoder.get_output_embeddings().weight
          head[ref.EOC:ref.MEDIA + 1] = head[:ref.TOKENIZER_VOCAB].mean(0)
      references[variant] = reference
    if (variant, attention) not in cache:
      reference = references[variant]
      config = _config(variant)
      config.attention = attention
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, _ = pretrained.load_openflamingo(reference.checkpoint, reference.lm,
                                                reference.vision, config)
      cache[variant, attention] = (reference, model, [str(w.message) for w in caught])
    return cache[variant, attention]

  return get


def _ours_inputs(inputs):
  images = np.moveaxis(inputs["images"], 3, -1)  # [B, T, F, C, H, W] -> [B, T, F, H, W, C]
  return (jnp.asarray(images), jnp.asarray(inputs["input_ids"]),
          jnp.asarray(inputs["attention_mask"]))


@pytest.mark.parametrize("variant", list(ref.OPENFLAMINGO_VARIANTS))
def test_logits_match_openflamingo(built, variant, attention):
  reference, model, _ = built(variant, attention)
  inputs = ref.openflamingo_inputs()
  with torch.no_grad():
    theirs = reference.model(torch.from_numpy(inputs["images"]),
                             torch.from_numpy(inputs["input_ids"]),
                             torch.from_numpy(inputs["attention_mask"])).logits.numpy()
  forward = nnx.jit(lambda m, im, ids, mask: m(im, ids, mask))
  ours = np.asarray(forward(model, *_ours_inputs(inputs)))
  # Ours: the tokenizer's ids, then eoc and image (OpenFlamingo's ids); OpenFlamingo also <PAD>.
  assert ours.shape[-1] == ref.TOKENIZER_VOCAB + 2 == theirs.shape[-1] - 1
  real = inputs["attention_mask"].astype(bool)
  assert np.abs(theirs[real]).max() > 1.0  # not a vacuous comparison
  np.testing.assert_allclose(ours[real], theirs[real][:, :-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", list(ref.OPENFLAMINGO_VARIANTS))
def test_greedy_generation_matches_openflamingo(built, variant):
  reference, model, _ = built(variant)
  inputs = ref.openflamingo_inputs()
  with torch.no_grad():
    # Greedy as OpenFlamingo's generate runs it (stopping at <|endofchunk|>); <PAD>, which the
    # import drops, is kept out of its choices.
    theirs = reference.model.generate(
        torch.from_numpy(inputs["images"]), torch.from_numpy(inputs["input_ids"]),
        torch.from_numpy(inputs["attention_mask"]), max_new_tokens=NEW_TOKENS, num_beams=1,
        do_sample=False, suppress_tokens=[ref.PAD]).numpy()[:, inputs["input_ids"].shape[1]:]
  images, ids, mask = _ours_inputs(inputs)
  batch = Batch(input_ids=ids, attention_mask=mask, images=images,
                media_mask=jnp.asarray(inputs["images"].any(axis=(2, 3, 4, 5))))
  out = generate_tokens(model, batch, GenerationConfig(max_new_tokens=NEW_TOKENS,
                                                       stop_token_ids=(ref.EOC,)))
  for row in range(2):
    length = int(out.lengths[row])
    assert length == NEW_TOKENS or int(out.tokens[row, length - 1]) == ref.EOC
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :length]), theirs[row, :length])


def test_v1_head_rows_are_the_mean_and_the_import_says_so(built):
  _, model, messages = built("v1_llama")
  assert any("were never saved" in m and "'<|endofchunk|>', '<image>'" in m for m in messages)
  mean = np.asarray(model.lm.lm_head.kernel[...]).mean(axis=1)
  np.testing.assert_allclose(np.asarray(model.added_head[...]), np.stack([mean, mean]), rtol=1e-5,
                             atol=1e-7)
  _, _, messages = built("mpt7b")
  assert not messages


def test_vocabulary_is_the_tokenizers_and_pad_is_dropped(built):
  """The padded base table (72 rows) is cut to the tokenizer's 64; <|endofchunk|> and <image>
  keep OpenFlamingo's ids 64 and 65; <PAD> has no row."""
  reference, model, _ = built("mpt7b")
  assert model.lm.token_embed.embedding.shape[0] == ref.TOKENIZER_VOCAB
  assert (model.eoc_token_id, model.media_token_id) == (ref.EOC, ref.MEDIA)
  wte = reference.model.lang_encoder.get_input_embeddings().weight.detach().numpy()
  np.testing.assert_array_equal(np.asarray(model.added_embed.embedding[...]), wte[[ref.EOC,
                                                                                  ref.MEDIA]])


def test_features_are_taken_before_the_final_layernorm():
  for preset in ("openflamingo_3b", "openflamingo_4b", "openflamingo_9b", "openflamingo_9b_v1"):
    vision = model_config.get_model_config(preset).vision
    assert not vision.use_post_layernorm
    assert vision.include_class_token == (preset == "openflamingo_9b_v1")


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(built):
  reference, _, _ = built("mpt7b")
  return reference, torch.load(reference.checkpoint, weights_only=True)


def _import_changed(reference, state, tmp_path, config=None):
  path = tmp_path / "changed.pt"
  torch.save(state, path)
  return pretrained.load_openflamingo(path, reference.lm, reference.vision,
                                      config or _config("mpt7b"))


def test_missing_tensors_are_all_named_with_what_they_leave_unfilled(saved, tmp_path):
  reference, state = saved
  block = "lang_encoder.transformer.blocks.1.gated_cross_attn_layer"
  changed = {k: v for k, v in state.items()
             if k not in ("perceiver.layers.0.0.to_q.weight", f"{block}.ff.3.weight")}
  with pytest.raises(ValueError) as error:
    _import_changed(reference, changed, tmp_path)
  message = str(error.value)
  assert "missing tensors: ['perceiver.layers.0.0.to_q.weight'" in message
  assert f"'{block}.ff.3.weight'" in message
  assert "'resampler.layers.0.attn.to_q.kernel'" in message  # unfilled, named
  assert "'gated_blocks.0.ffw.down.kernel'" in message


def test_extra_tensors_are_named(saved, tmp_path):
  reference, state = saved
  # A media-time table (the preset has none) and an LM weight (never in OpenFlamingo's files).
  lm_weight = "lang_encoder.transformer.blocks.0.decoder_layer.attn.Wqkv.weight"
  changed = {**state, "perceiver.media_time_embs": torch.zeros(4, 1, ref.VISION_WIDTH),
             lm_weight: torch.zeros(3 * ref.WIDTH, ref.WIDTH)}
  with pytest.raises(ValueError, match=r"tensors of .*changed\.pt that map to no parameter: "
                                       r"\['lang_encoder\.transformer\.blocks\.0\.decoder_layer"
                                       r"\.attn\.Wqkv\.weight', 'perceiver\.media_time_embs'\]"):
    _import_changed(reference, changed, tmp_path)


def test_wrong_shape_is_named(saved, tmp_path):
  reference, state = saved
  changed = {**state, "perceiver.layers.1.0.to_kv.weight": torch.zeros(1024, 16)}
  with pytest.raises(ValueError, match=r"'perceiver\.layers\.1\.0\.to_kv\.weight': checkpoint has "
                                       r"\(1024, 16\), model expects \(1024, 24\)"):
    _import_changed(reference, changed, tmp_path)


def test_wrong_placement_or_vocabulary_names_the_setting(saved, tmp_path):
  reference, state = saved
  config = _config("mpt7b")
  config.xattn.every_n_layers = 1
  with pytest.raises(ValueError, match=r"gated blocks before LM layers \[1\], but "
                                       r"xattn.every_n_layers=1 \(offset 0\) places them before "
                                       r"\[0, 1\]"):
    _import_changed(reference, state, tmp_path, config)
  config = _config("mpt7b")
  config.lm.vocab_size = 60
  with pytest.raises(ValueError, match=r"has 67 rows, but an OpenFlamingo table has the "
                                       r"tokenizer's ids plus 2 or 3 \(config lm.vocab_size=60"):
    _import_changed(reference, state, tmp_path, config)


def test_a_tokenizer_with_other_special_token_ids_is_refused(built, tmp_path):
  """A tokenizer that puts <image> right after the vocabulary (this library's default order)
  would give the imported model <|endofchunk|> where an image stands."""
  reference, model, _ = built("mpt7b")
  vocab = {f"w{i}": i for i in range(ref.TOKENIZER_VOCAB)}
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w0").save_pretrained(
      tmp_path)
  with pytest.raises(ValueError, match=r"gives <image> id 64 but the model reads id 65 "
                                       r"\(added_tokens=\('<\|endofchunk\|>', '<image>'\)"):
    Processor.from_model_config(model.config, Tokenizer.from_pretrained(tmp_path))
  built_for_model = Tokenizer.from_pretrained(tmp_path, model_config=model.config)
  assert built_for_model.encode("w3 <image> w4 <|endofchunk|>") == [3, ref.MEDIA, 4, ref.EOC]
