"""``python -m xattn_vlm.convert`` end to end, over tiny reference models saved as the published
files are (``reference_models``): OpenFlamingo MPT-1B (MosaicGPT) and v1 LLaMA (its LM as
``pytorch_model.bin``), and IDEFICS, each converted by the command, then read back by
``xattn_vlm.from_pretrained``, give the reference model's logits (1e-4) and its 20 greedy
tokens; ``from_pretrained`` on the published files gives the same parameters as the conversion;
``prompt`` (with ``--image_mode=crop``) and ``evaluate`` run on a converted directory;
the trainer fine-tunes from one (``config.init.flamingo_workdir``). A missing, extra or misshapen
tensor, or a tokenizer whose special-token ids disagree with the weights, is one line on stderr
naming it, exit code 2, and no output directory.
"""

import concurrent.futures
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import tokenizers
import torch
import transformers
from flax import nnx

import reference_models as ref
import xattn_vlm
from helpers import REPO, leaves, tiny
from xattn_vlm import checkpoint
from xattn_vlm.inference import Batch, GenerationConfig, generate, generate_tokens
from xattn_vlm.models import config as model_config
from xattn_vlm.models import convert
from xattn_vlm.models import scan
from xattn_vlm.train import trainer

pytestmark = pytest.mark.slow

NEW_TOKENS = 20
# The tiny references' preset fields that differ from the published models'.
TINY = {"lm.vocab_size": ref.TOKENIZER_VOCAB, "dtype": "float32",
        "resampler.depth": ref.PERCEIVER_DEPTH}
PRESETS = {"mpt1b": "openflamingo_3b", "v1_llama": "openflamingo_9b_v1",
           "mpt7b": "openflamingo_9b", "rpj3b": "openflamingo_4b"}


def write_tokenizer(folder, words=()):
  """A word-level tokenizer of the references' 64 ids (``w0``..``w63``, EOS ``w2`` as the LMs
  and IDEFICS have it), plus ``words`` at the following ids; saved as a Hugging Face folder."""
  vocab = {f"w{i}": i for i in range(ref.TOKENIZER_VOCAB)}
  vocab.update({w: ref.TOKENIZER_VOCAB + k for k, w in enumerate(words)})
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w2").save_pretrained(
      folder)


def run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        timeout=600, env=env)


def run_all(commands):
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    return list(pool.map(lambda args: run(*args), commands))


def openflamingo_command(reference, variant, output, checkpoint_pt=None, tokenizer=None):
  every_n = ref.OPENFLAMINGO_VARIANTS[variant][1]
  command = ["xattn_vlm.convert", "--from=openflamingo", f"--preset={PRESETS[variant]}",
             f"--checkpoint={checkpoint_pt or reference.checkpoint}", f"--lm={reference.lm}",
             f"--vision={reference.vision}", f"--output={output}",
             f"--model.xattn.every_n_layers={every_n}",
             *(f"--model.{key}={value}" for key, value in TINY.items())]
  return command + ([f"--tokenizer={tokenizer}"] if tokenizer else [])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> (reference, converted directory): each reference converted by the command (run two
  at a time)."""
  torch.set_num_threads(1)
  root = tmp_path_factory.mktemp("convert")
  references, commands = {}, []
  for variant in PRESETS:
    reference = ref.openflamingo(variant, root / variant)
    if variant != "v1_llama":  # the tokenizer in the LM folder, where --tokenizer defaults to
      write_tokenizer(reference.lm)
      tokenizer = None
    else:  # LLaMA-7B as most conversions published it: pytorch_model.bin, a torch pickle
      tokenizer = root / "llama_tokenizer"
      write_tokenizer(tokenizer)
      weights = reference.lm / "model.safetensors"
      torch.save(safetensors.torch.load_file(weights), reference.lm / "pytorch_model.bin")
      weights.unlink()
    references[variant] = reference
    commands.append(openflamingo_command(reference, variant, root / f"{variant}_out",
                                         tokenizer=tokenizer))
  reference = ref.idefics(root / "idefics")
  write_tokenizer(reference.checkpoint)
  references["idefics"] = reference
  commands.append(["xattn_vlm.convert", "--from=idefics", f"--checkpoint={reference.checkpoint}",
                   f"--output={root / 'idefics_out'}"])
  for (name, reference), result in zip(references.items(), run_all(commands)):
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {root / f'{name}_out'}" in result.stdout
  # v1 saved no head: the conversion fills the new tokens' output rows with the mean LM row.
  # The reference gets the same rows, so that all else can be compared exactly.
  with torch.no_grad():
    head = references["v1_llama"].model.lang_encoder.get_output_embeddings().weight
    head[ref.EOC:ref.MEDIA + 1] = head[:ref.TOKENIZER_VOCAB].mean(0)
  return {name: (reference, root / f"{name}_out") for name, reference in references.items()}


def _openflamingo_batch(inputs):
  images = jnp.asarray(np.moveaxis(inputs["images"], 3, -1))  # [B, T, F, H, W, C]
  return Batch(input_ids=jnp.asarray(inputs["input_ids"]),
               attention_mask=jnp.asarray(inputs["attention_mask"]), images=images,
               media_mask=jnp.asarray(inputs["images"].any(axis=(2, 3, 4, 5))))


def _idefics_batch(inputs):
  images = jnp.asarray(np.moveaxis(inputs["images"], 2, -1)[:, :, None])  # [B, T, 1, H, W, C]
  return Batch(input_ids=jnp.asarray(inputs["input_ids"]),
               attention_mask=jnp.asarray(inputs["attention_mask"]), images=images,
               media_mask=jnp.ones(images.shape[:2], bool))


def _reference_outputs(name, reference):
  """(inputs as a Batch, the reference's logits [B, L, V], its greedy tokens [B, NEW_TOKENS])."""
  if name == "idefics":
    inputs = ref.idefics_inputs()
    kwargs = dict(input_ids=torch.from_numpy(inputs["input_ids"]).long(),
                  attention_mask=torch.from_numpy(inputs["attention_mask"]).long(),
                  pixel_values=torch.from_numpy(inputs["images"]),
                  image_attention_mask=ref.idefics_image_attention_mask(inputs["input_ids"], 2))
    with torch.no_grad():
      logits = reference.model(**kwargs).logits.numpy()
      tokens = reference.model.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                        num_beams=1).numpy()
    return _idefics_batch(inputs), logits, tokens[:, inputs["input_ids"].shape[1]:]
  inputs = ref.openflamingo_inputs()
  args = [torch.from_numpy(inputs[k]) for k in ("images", "input_ids", "attention_mask")]
  with torch.no_grad():
    # <PAD>, which the import drops, is kept out of the reference's logits and choices.
    logits = reference.model(*args).logits.numpy()[..., :-1]
    tokens = reference.model.generate(*args, max_new_tokens=NEW_TOKENS, num_beams=1,
                                      do_sample=False, suppress_tokens=[ref.PAD]).numpy()
  return _openflamingo_batch(inputs), logits, tokens[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("name", [*PRESETS, "idefics"])
def test_converted_model_matches_the_reference(converted, name):
  reference, output = converted[name]
  model, processor, tokenizer = xattn_vlm.from_pretrained(output)
  assert processor.tokenizer is tokenizer and tokenizer.media_token_id == reference.media_token_id
  batch, theirs, their_tokens = _reference_outputs(name, reference)
  forward = nnx.jit(lambda m, images, ids, mask, media: m(images, ids, mask, media_mask=media))
  ours = np.asarray(forward(model, batch.images, batch.input_ids, batch.attention_mask,
                            batch.media_mask))
  real = np.asarray(batch.attention_mask).astype(bool)
  assert ours.shape == theirs.shape and np.abs(theirs[real]).max() > 1.0
  np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-4, atol=1e-4)

  stop = ref.IDEFICS_EOS if name == "idefics" else ref.EOC
  out = generate_tokens(model, batch, GenerationConfig(max_new_tokens=NEW_TOKENS,
                                                       stop_token_ids=(stop,)))
  for row in range(2):
    length = int(out.lengths[row])
    assert length == NEW_TOKENS or int(out.tokens[row, length - 1]) == stop
    np.testing.assert_array_equal(np.asarray(out.tokens[row, :length]),
                                  their_tokens[row, :length])
  assert int(out.lengths.max()) > 3


def test_from_pretrained_reads_the_published_files_as_the_conversion_does(converted):
  for name, kwargs in (("mpt1b", None), ("idefics", {})):
    reference, output = converted[name]
    if kwargs is None:
      assert checkpoint.saved_config(str(output)).converted_from.preset == "openflamingo_3b"
      config = model_config.openflamingo_3b()
      config.update_from_flattened_dict(TINY)
      config.xattn.every_n_layers = ref.OPENFLAMINGO_VARIANTS[name][1]
      kwargs = dict(lm=reference.lm, vision=reference.vision, config=config)
    direct, _, tokenizer = xattn_vlm.from_pretrained(reference.checkpoint, **kwargs)
    saved, _, _ = xattn_vlm.from_pretrained(output)
    assert checkpoint.config_json(direct.config) == checkpoint.config_json(saved.config)
    expected = leaves(nnx.state(saved, nnx.Param))
    got = leaves(nnx.state(direct, nnx.Param))
    assert got.keys() == expected.keys()
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{name}: {key}")
    assert tokenizer.encode("w3 <image> w4") == [3, reference.media_token_id, 4]


def test_prompt_and_evaluate_read_a_converted_directory(converted, tmp_path):
  _, output = converted["mpt1b"]
  image = tmp_path / "a.png"
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), np.uint8)).save(image)
  text = "<image>w5 w6 w7"
  shown, evaluated = run_all([
      ("xattn_vlm.prompt", f"--checkpoint={output}", f"--image={image}", f"--text={text}",
       "--max_new_tokens=5", "--num_beams=1", "--image_mode=crop"),
      ("xattn_vlm.evaluate", f"--checkpoint={output}", f"--output_dir={tmp_path / 'eval'}",
       "--eval.tasks=shapes_vqa", "--eval.shots=0", "--eval.trials=1",
       "--eval.num_beams=1", "--eval.batch_size=8", "--eval.shapes.num_queries=4",
       "--eval.shapes.pool_size=8")])
  assert shown.returncode == 0, shown.stderr[-3000:]
  model, processor, _ = xattn_vlm.from_pretrained(output, image_mode="crop")
  assert processor.image_mode == "crop"
  expected = generate(model, processor, [text], [[image]], max_new_tokens=5, num_beams=1).text[0]
  assert shown.stdout.strip().splitlines()[-1] == expected.strip() and expected.strip()
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  results = json.loads((tmp_path / "eval" / "results.json").read_text())
  assert results["metadata"]["queries"] == {"shapes_vqa": 4}
  predictions = (tmp_path / "eval" / "predictions" / "shapes_vqa" / "0shot_trial0.jsonl")
  outputs = [json.loads(line)["output"] for line in predictions.read_text().splitlines()]
  assert len(outputs) == 4 and all(outputs)  # the converted model's words, decoded


def test_the_trainer_fine_tunes_a_converted_model(converted, tmp_path):
  _, output = converted["mpt1b"]
  config = tiny("flamingo", total_steps=1, **{"init.flamingo_workdir": str(output),
                                              "data.tokenizer": str(output / "tokenizer"),
                                              "checkpoint.every_steps": 1})
  config.model = checkpoint.saved_config(str(output)).model
  state = trainer.train(config, str(tmp_path / "run"))
  start = leaves(nnx.state(checkpoint.load_flamingo(str(output)), nnx.Param))
  after = leaves(jax.device_get(state.params))
  assert after.keys() == start.keys() and int(state.step) == 1
  for key in start:
    if key.startswith(("lm/", "vision/")):  # frozen: the converted weights, unchanged
      np.testing.assert_array_equal(after[key], start[key], err_msg=key)
  assert not np.array_equal(after["resampler/latents"], start["resampler/latents"])
  # The run's model and tokenizer come back as they went in: the converted one's.
  model, _, tokenizer = xattn_vlm.from_pretrained(tmp_path / "run")
  assert tokenizer.encode("w3 <image> w9") == [3, ref.MEDIA, 9]
  assert leaves(nnx.state(model, nnx.Param)).keys() == start.keys()

  config.model.xattn.every_n_layers = 2
  with pytest.raises(ValueError, match=r"config\.init\.flamingo_workdir=.* holds a different "
                                       r"model: config\.model\.xattn\.every_n_layers: saved 1, "
                                       r"now 2"):
    trainer.train(config, str(tmp_path / "other"))


def test_a_scanned_run_takes_converted_and_hugging_face_weights_into_stacked_blocks(
    converted, tmp_path):
  """``model.scan_layers``: the trainer restores an unrolled converted model (and reads a Hugging
  Face LM folder) into the stacked layout, bit for bit."""
  reference, output = converted["mpt1b"]
  hf_lm = nnx.state(convert.load_hf_lm(reference.lm), nnx.Param)
  for name, init, lm in (
      ("converted", {"init.flamingo_workdir": str(output)},
       nnx.state(checkpoint.load_flamingo(str(output)), nnx.Param)["lm"]),
      ("hugging_face", {"init.lm_hf_path": str(reference.lm)}, hf_lm)):
    expected = leaves(scan.layout(lm, scanned=True))
    assert "blocks/attn/query/kernel" in expected
    config = tiny("flamingo", total_steps=1, **init, **{
        "data.tokenizer": str(output / "tokenizer"), "checkpoint.every_steps": 1})
    config.model = checkpoint.saved_config(str(output)).model
    if name == "hugging_face":
      config.model.lm = convert.read_lm_config(reference.lm)
    config.model.scan_layers = True
    after = leaves(jax.device_get(trainer.train(config, str(tmp_path / name)).params["lm"]))
    assert after.keys() == expected.keys()
    for key, value in expected.items():
      np.testing.assert_array_equal(after[key], value, err_msg=f"{name}: {key}")


# -- failures -------------------------------------------------------------------------------------


def test_failures_name_the_problem_exit_2_and_write_nothing(tmp_path):
  """mpt7b-style files changed four ways; each conversion fails as one line naming the problem."""
  reference = ref.openflamingo("mpt7b", tmp_path / "mpt7b")
  write_tokenizer(reference.lm)
  swapped = tmp_path / "swapped_tokenizer"
  write_tokenizer(swapped, words=("<image>", "<|endofchunk|>"))
  state = torch.load(reference.checkpoint, weights_only=True)
  block = "lang_encoder.transformer.blocks.1.gated_cross_attn_layer"
  changed = {
      "missing": {k: v for k, v in state.items() if k != f"{block}.ff.3.weight"},
      "extra": {**state, "perceiver.media_time_embs": torch.zeros(4, 1, ref.VISION_WIDTH)},
      "shape": {**state, "perceiver.layers.1.0.to_kv.weight": torch.zeros(1024, 16)},
  }
  cases = {}
  for case, tensors in changed.items():
    torch.save(tensors, tmp_path / f"{case}.pt")
    cases[case] = openflamingo_command(reference, "mpt7b", tmp_path / f"{case}_out",
                                       checkpoint_pt=tmp_path / f"{case}.pt")
  cases["tokenizer"] = openflamingo_command(reference, "mpt7b", tmp_path / "tokenizer_out",
                                            tokenizer=swapped)
  expected = {
      "missing": [f"missing tensors: ['{block}.ff.3.weight']",
                  "parameters no tensor filled: ['gated_blocks.0.ffw.down.kernel']"],
      "extra": ["map to no parameter: ['perceiver.media_time_embs']"],
      "shape": ["'perceiver.layers.1.0.to_kv.weight': checkpoint has (1024, 16), model expects "
                "(1024, 24)"],
      "tokenizer": [f"tokenizer='{swapped}' gives <|endofchunk|> id {ref.EOC + 1}, but the "
                    f"checkpoint holds its row at id {ref.EOC}"],
  }
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    results = run_all(list(cases.values()))
  for (case, command), result in zip(cases.items(), results):
    assert result.returncode == 2, (case, result.stderr[-3000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xattn-convert: error: "), (case, lines)
    for text in expected[case]:
      assert text in lines[0], (case, lines[0])
    assert not (tmp_path / f"{case}_out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{case}_out")], case
