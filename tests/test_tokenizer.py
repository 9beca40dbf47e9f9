"""Tokenizer: added tokens at lm_vocab_size + k in the model config's order, round trips, the cached
default BPE, HF folders."""

import numpy as np
import pytest
import tokenizers
import transformers

from xattn_vlm import special_tokens
from xattn_vlm.data.shapes import tokenizer as shapes_tokenizer
from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.data.shapes.tokenizer import default_tokenizer
from xattn_vlm.data.tokenizer import Tokenizer
from xattn_vlm.inference import Processor
from xattn_vlm.models import config as model_config

TEXTS = ["A large red striped star on the left.",
         "Question:What colour is the circle? Short answer:blue",
         "<image>This is a dax.<|endofchunk|><image>What is this? It is a dax.<|endofchunk|>",
         "  odd   spacing, UPPER case, digits 12345 and unicode: café ☃ 形状<|endoftext|>"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tok(cache):
  return default_tokenizer(cache_dir=cache)


def test_default_tokenizer_special_tokens(tok):
  assert tok.lm_vocab_size == shapes_tokenizer.VOCAB_SIZE == 1024
  assert tok.vocab_size == tok.lm_vocab_size + 2
  assert (tok.media_token_id, tok.eoc_token_id) == (tok.lm_vocab_size, tok.lm_vocab_size + 1)
  assert tok.encode("<image>") == [tok.media_token_id]
  assert tok.encode("<|endofchunk|>") == [tok.eoc_token_id]
  assert tok.encode("<|endoftext|>") == [tok.eos_token_id] == [0]
  assert tok.pad_token_id == tok.eos_token_id and tok.bos_token_id is None
  assert tok.decode([tok.media_token_id, tok.eoc_token_id]) == "<image><|endofchunk|>"
  # The world's words are single tokens: the BPE really was learned on its text.
  assert len(tok.encode(" triangle")) == 1 and len(tok.encode(" purple")) == 1


def test_round_trip_and_skipping_special_tokens(tok):
  for text in TEXTS + [shapes_world.text_example("test", 1, i)["text"] for i in range(20)]:
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(np.asarray(ids, np.int32)) == text
  assert tok.decode(tok.encode(TEXTS[2]), skip_special_tokens=True) == (
      "This is a dax.What is this? It is a dax.")
  with pytest.raises(ValueError, match=r"ids must be in \[0, vocab_size=1026\), got \[1026\]"):
    tok.decode([5, 1026])
  with pytest.raises(ValueError, match="1-D"):
    tok.decode([[1, 2]])


def test_default_tokenizer_is_deterministic_and_cached(cache, tok, tmp_path, monkeypatch):
  other = default_tokenizer(cache_dir=tmp_path)
  (first,) = cache.glob("shapes_bpe_*.json")
  (second,) = tmp_path.glob("shapes_bpe_*.json")
  assert first.name == second.name and first.read_bytes() == second.read_bytes()
  assert other.encode(TEXTS[0]) == tok.encode(TEXTS[0])

  def no_training(corpus):
    raise AssertionError("the cached tokenizer was retrained")
  monkeypatch.setattr(shapes_tokenizer, "train_bpe", no_training)
  assert default_tokenizer(cache_dir=cache).encode(TEXTS[1]) == tok.encode(TEXTS[1])
  monkeypatch.setenv(shapes_tokenizer.CACHE_ENV, str(cache))
  assert default_tokenizer().encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_default_tokenizer_cache_follows_the_worlds_text(cache, tmp_path, monkeypatch):
  """The cache is keyed by the corpus the BPE learns from: a world whose text changed retrains,
  whatever its source file's bytes."""
  (cached,) = cache.glob("shapes_bpe_*.json")
  (tmp_path / cached.name).write_bytes(cached.read_bytes())
  corpus = shapes_world.text_corpus(shapes_tokenizer.CORPUS_SIZE)
  monkeypatch.setattr(shapes_world, "text_corpus", lambda n: corpus[:-1] + ["a changed text"])
  default_tokenizer(cache_dir=tmp_path)
  assert len(list(tmp_path.glob("shapes_bpe_*.json"))) == 2


@pytest.fixture(scope="module")
def hf_folder(cache, tok, tmp_path_factory):
  """The default tokenizer saved as a Hugging Face folder."""
  folder = tmp_path_factory.mktemp("hf")
  (path,) = cache.glob("shapes_bpe_*.json")
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer.from_file(str(path)), eos_token="<|endoftext|>")
  fast.save_pretrained(folder)
  return folder


def test_from_pretrained_matches_default(hf_folder, tok):
  """The BPE has at most the default LM vocabulary's tokens; the vocabulary pads the rest."""
  assert Tokenizer.from_pretrained(hf_folder).lm_vocab_size <= shapes_tokenizer.VOCAB_SIZE
  hf = Tokenizer.from_pretrained(hf_folder, lm_vocab_size=shapes_tokenizer.VOCAB_SIZE)
  assert (hf.lm_vocab_size, hf.media_token_id, hf.eoc_token_id, hf.eos_token_id) == (
      tok.lm_vocab_size, tok.media_token_id, tok.eoc_token_id, tok.eos_token_id)
  for text in TEXTS:
    assert hf.encode(text) == tok.encode(text)
    assert hf.decode(hf.encode(text)) == text


def test_padded_vocabulary_remaps_added_tokens(hf_folder, tok):
  """Qwen2-style: the checkpoint has more rows (1100) than the tokenizer has tokens."""
  hf = Tokenizer.from_pretrained(hf_folder, lm_vocab_size=1100)
  assert (hf.media_token_id, hf.eoc_token_id, hf.vocab_size) == (1100, 1101, 1102)
  ids = hf.encode(TEXTS[2])
  assert ids.count(1100) == 2 and ids.count(1101) == 2
  assert tok.media_token_id not in ids and tok.eoc_token_id not in ids
  assert [i for i in ids if i < 1024] == [i for i in tok.encode(TEXTS[2]) if i < 1024]
  assert hf.decode(ids) == TEXTS[2]
  own = Tokenizer.from_pretrained(hf_folder).lm_vocab_size
  with pytest.raises(ValueError, match=f"lm_vocab_size must be at least {own}"):
    Tokenizer.from_pretrained(hf_folder, lm_vocab_size=own - 1)


def test_tokens_are_added_to_a_tokenizer_without_them(tmp_path):
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>").save_pretrained(tmp_path)
  tok = Tokenizer.from_pretrained(tmp_path)
  assert (tok.lm_vocab_size, tok.media_token_id, tok.eoc_token_id) == (5, 5, 6)
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
  assert tok.encode("hello <image> world <|endofchunk|>") == [3, 5, 4, 6]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer.from_pretrained(tmp_path / "missing")
  with pytest.raises(ValueError, match="eos_token must name a token"):
    Tokenizer(tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a")))


@pytest.fixture()
def word_folder(tmp_path):
  """A tiny word-level LLaMA-like tokenizer (<unk>, <s>, </s>, two words) as a HF folder."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>").save_pretrained(tmp_path)
  return tmp_path


def test_added_tokens_order_sets_the_ids(word_folder):
  """OpenFlamingo's order: <|endofchunk|> right after the vocabulary, then <image>."""
  config = model_config.tiny()
  config.lm.vocab_size = 5
  config.added_tokens = special_tokens.OPENFLAMINGO_ADDED_TOKENS
  tok = Tokenizer.from_pretrained(word_folder, model_config=config)
  assert (tok.eoc_token_id, tok.media_token_id, tok.vocab_size) == (5, 6, 7)
  assert tok.encode("hello <image> world <|endofchunk|>") == [3, 6, 4, 5]
  assert tok.decode([3, 6, 4, 5]) == "hello <image> world <|endofchunk|>"


def test_a_tokenizer_of_another_token_order_is_refused(word_folder):
  """A tokenizer built with the default order gives <image> the id OpenFlamingo's model reads as
  <|endofchunk|>: the processor refuses it and names the setting."""
  config = model_config.tiny()
  config.lm.vocab_size = 5
  config.added_tokens = special_tokens.OPENFLAMINGO_ADDED_TOKENS
  default_order = Tokenizer.from_pretrained(word_folder)
  with pytest.raises(ValueError, match=r"gives <image> id 5 but the model reads id 6 "
                                       r"\(added_tokens=\('<\|endofchunk\|>', '<image>'\)"):
    Processor.from_model_config(config, default_order)
  with pytest.raises(ValueError, match=r"lm_vocab_size=6 disagrees with the model config's "
                                       r"lm.vocab_size=5"):
    Tokenizer.from_pretrained(word_folder, lm_vocab_size=6, model_config=config)


def test_idefics_tokens_and_its_document_end(word_folder):
  """IDEFICS: <fake_token_around_image> then <image>, no <|endofchunk|>; its document end must be
  the tokenizer's EOS."""
  config = model_config.tiny()
  config.lm.vocab_size = 5
  config.added_tokens = special_tokens.IDEFICS_ADDED_TOKENS
  config.xattn.document_end_token_id = 2
  tok = Tokenizer.from_pretrained(word_folder, model_config=config)
  assert (tok.media_token_id, tok.eoc_token_id) == (6, None)
  ids = tok.encode("hello <fake_token_around_image><image><fake_token_around_image> world </s>")
  assert ids == [3, 5, 6, 5, 4, 2]
  assert tok.decode(ids, skip_special_tokens=True) == "hello world"
  config.xattn.document_end_token_id = 1
  with pytest.raises(ValueError, match=r"xattn.document_end_token_id=1 in the model's config must "
                                       r"be the tokenizer's EOS id \(2\)"):
    tok.require_model(config)
