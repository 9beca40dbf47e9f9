"""llama.cpp's GGUF files: the config, weights and tokenizer of a LLaMA-architecture LM.

A GGUF file keeps a model's hyper-parameters and its tokenizer as metadata, and its tensors, often
block-quantised, under llama.cpp's names and in llama.cpp's layout. ``GGUFFile`` opens one and
fails there, naming the file, when it is missing, truncated or not GGUF at all. On top of it,
``lm_config_from_gguf`` reads our ``lm_config``, ``GGUFCheckpoint`` serves the tensors dequantised
to float32 under the Hugging Face LLaMA names and layout (so ``convert`` fills a ``DecoderLM``
from it as from a safetensors folder, one tensor at a time from the memory-mapped file), and
``tokenizer_from_gguf`` rebuilds the tokenizer. Everything is read with the ``gguf`` package in
numpy: no torch, no llama.cpp.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import re
from typing import Iterator

import gguf
import ml_collections
import numpy as np
import tokenizers
from tokenizers import decoders, pre_tokenizers

from xattn_vlm.models.config import lm_config

ARCHITECTURE = "llama"

_REQUIRED = object()

# llama.cpp's tensor names -> Hugging Face LlamaForCausalLM's, per model and per block.
_MODEL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                  "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
_BLOCK_TENSORS = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                  "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
                  "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj"}
_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class GGUFFile:
  """A GGUF file opened for reading: its metadata by key and its tensors by llama.cpp name.

  Opening parses the header (metadata and tensor index) and memory-maps the rest: tensor data is
  read only when a tensor is dequantised, one at a time.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if not self.path.is_file():
      state = "is a directory" if self.path.is_dir() else "does not exist"
      raise FileNotFoundError(f"GGUF file {str(self.path)!r} {state}: expected the path of a "
                              "llama.cpp .gguf file")
    try:
      reader = gguf.GGUFReader(self.path)
    except OSError:
      raise
    except Exception as e:  # damage or truncation surfaces as ValueError, IndexError, ...
      raise ValueError(f"{str(self.path)!r} is not a readable GGUF file ({type(e).__name__}: "
                       f"{e}): expected a complete llama.cpp .gguf file; is it truncated?") from e
    self._reader = reader
    self._tensors = {tensor.name: tensor for tensor in reader.tensors}
    self.architecture = self.metadata("general.architecture")

  def metadata(self, key: str, default=_REQUIRED):
    """The value of metadata ``key`` (a number, bool, string or list), or ``default`` when the
    file lacks it; without a default a missing key raises, naming the file and the key."""
    field = self._reader.fields.get(key)
    if field is None:
      if default is _REQUIRED:
        raise ValueError(f"GGUF file {str(self.path)!r} lacks the metadata key {key!r}")
      return default
    return field.contents()

  def tensor_names(self) -> list[str]:
    """Tensor names in file order."""
    return list(self._tensors)

  def tensor_shape(self, name: str) -> tuple[int, ...]:
    """The shape of tensor ``name`` in row-major order (torch's ``[out, in]`` for a linear layer):
    GGUF lists dimensions fastest first, so this is its shape reversed."""
    return tuple(int(d) for d in reversed(self._tensor(name).shape))

  def tensor(self, name: str) -> np.ndarray:
    """Tensor ``name`` dequantised to float32, shaped as ``tensor_shape(name)``."""
    tensor = self._tensor(name)
    try:
      values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
      raise NotImplementedError(f"tensor {name!r} of GGUF file {str(self.path)!r} is stored as "
                                f"{tensor.tensor_type.name}, which the gguf package cannot "
                                "dequantise") from e
    values = np.asarray(values, np.float32).reshape(self.tensor_shape(name))
    # An F32 tensor comes back as a view of the memory-mapped file: copied, so that it stays
    # what was read (and writable) whatever later happens to the file.
    return values.copy() if np.may_share_memory(values, tensor.data) else values

  def _tensor(self, name: str):
    if name not in self._tensors:
      raise KeyError(f"tensor {name!r} not found in GGUF file {str(self.path)!r}")
    return self._tensors[name]


def is_gguf(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a GGUF file (by its ``.gguf`` suffix, so a missing one still counts
  and fails as a missing GGUF file)."""
  return pathlib.Path(path).suffix.lower() == ".gguf"


def _as_file(file: GGUFFile | str | os.PathLike) -> GGUFFile:
  """``file`` opened, once per process for a file unchanged since: a recipe reads the same file's
  config, tokenizer and weights several times, and parsing SmolLM2's header (a 49k-token
  vocabulary as metadata) takes about 5 s."""
  if isinstance(file, GGUFFile):
    return file
  path = pathlib.Path(file)
  try:
    stat = path.stat()
  except OSError:
    return GGUFFile(path)  # fails, naming the file
  return _open(str(path.absolute()), (stat.st_ino, stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _open(path: str, version: tuple[int, int, int]) -> GGUFFile:
  del version  # part of the cache key only: a rewritten file is opened anew
  return GGUFFile(path)


def hf_tensor_name(name: str) -> str | None:
  """The Hugging Face LLaMA name of llama.cpp tensor ``name``, or None if the LLaMA layout has no
  such tensor."""
  if name in _MODEL_TENSORS:
    return _MODEL_TENSORS[name]
  match = _BLOCK_TENSOR.fullmatch(name)
  if match and match[2] in _BLOCK_TENSORS:
    return f"model.layers.{match[1]}.{_BLOCK_TENSORS[match[2]]}.weight"
  return None


def _require_llama(file: GGUFFile) -> None:
  """Fails unless the file holds a plain LLaMA-architecture LM: the architecture, and no tensor
  the LLaMA layout has no place for (biases, experts, RoPE frequency factors), which would
  otherwise be silently dropped."""
  if file.architecture != ARCHITECTURE:
    raise ValueError(f"GGUF file {str(file.path)!r} holds a {file.architecture!r} model; only "
                     f"the {ARCHITECTURE!r} architecture can be loaded as a decoder LM")
  unknown = [name for name in file.tensor_names() if hf_tensor_name(name) is None]
  if unknown:
    raise NotImplementedError(f"GGUF file {str(file.path)!r} holds tensors outside the plain "
                              f"LLaMA layout, which are not supported: {unknown[:6]}"
                              + (f" and {len(unknown) - 6} more" if len(unknown) > 6 else ""))


def _int(file: GGUFFile, key: str, default=_REQUIRED) -> int:
  value = file.metadata(key, default)
  if isinstance(value, bool) or not isinstance(value, int):
    raise NotImplementedError(f"GGUF file {str(file.path)!r} sets {key}={value!r}; expected one "
                              "integer (per-layer values are not supported)")
  return value


def lm_config_from_gguf(file: GGUFFile | str | os.PathLike) -> ml_collections.ConfigDict:
  """Our ``lm_config`` (``llama`` family) from a GGUF file's metadata and tensor index.

  The vocabulary is the token table's rows; the head is tied when the file has no
  ``output.weight``. Features our LLaMA family lacks (RoPE scaling, partial rotary dimensions,
  experts, key and value heads of different widths) raise ``NotImplementedError``.
  """
  file = _as_file(file)
  _require_llama(file)
  arch = ARCHITECTURE

  def unsupported(key, value, expected):
    return NotImplementedError(f"GGUF file {str(file.path)!r} sets {arch}.{key}={value!r}; "
                               f"only {expected} is supported")

  embed_dim = _int(file, f"{arch}.embedding_length")
  num_heads = _int(file, f"{arch}.attention.head_count")
  head_dim = _int(file, f"{arch}.attention.key_length", embed_dim // num_heads)
  value_dim = _int(file, f"{arch}.attention.value_length", head_dim)
  if value_dim != head_dim:
    raise unsupported("attention.value_length", value_dim, f"the key width {head_dim}")
  rotary = _int(file, f"{arch}.rope.dimension_count", head_dim)
  if rotary != head_dim:
    raise unsupported("rope.dimension_count", rotary, f"rotating the whole head ({head_dim})")
  scaling = file.metadata(f"{arch}.rope.scaling.type", "none")
  if scaling != "none":
    raise unsupported("rope.scaling.type", scaling, "'none'")
  experts = _int(file, f"{arch}.expert_count", 0)
  if experts:
    raise unsupported("expert_count", experts, "a dense MLP (0)")
  splits = _int(file, "split.count", 1)
  if splits > 1:
    raise NotImplementedError(f"GGUF file {str(file.path)!r} is the first of {splits} parts of a "
                              "split model; merge them into one file first (llama.cpp's "
                              "gguf-split --merge)")
  cfg = lm_config(
      family="llama", vocab_size=file.tensor_shape("token_embd.weight")[0],
      num_layers=_int(file, f"{arch}.block_count"), embed_dim=embed_dim, num_heads=num_heads,
      num_kv_heads=_int(file, f"{arch}.attention.head_count_kv", num_heads), head_dim=head_dim,
      mlp_dim=_int(file, f"{arch}.feed_forward_length"),
      max_length=_int(file, f"{arch}.context_length"),
      norm_eps=float(file.metadata(f"{arch}.attention.layer_norm_rms_epsilon")),
      rope_theta=float(file.metadata(f"{arch}.rope.freq_base", 10000.0)),
      tie_word_embeddings="output.weight" not in file.tensor_names(), attention_bias=False,
      activation="silu")
  _check_tensor_index(file, cfg)
  return cfg


def _expected_shapes(cfg: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """llama.cpp's name -> row-major shape of every tensor of the LM ``cfg`` describes."""
  d, q, kv = cfg.embed_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  block = {"attn_norm": (d,), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d),
           "attn_output": (d, q), "ffn_norm": (d,), "ffn_gate": (cfg.mlp_dim, d),
           "ffn_up": (cfg.mlp_dim, d), "ffn_down": (d, cfg.mlp_dim)}
  shapes = {"token_embd.weight": (cfg.vocab_size, d), "output_norm.weight": (d,)}
  if not cfg.tie_word_embeddings:
    shapes["output.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.num_layers):
    shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in block.items()})
  return shapes


def _check_tensor_index(file: GGUFFile, cfg: ml_collections.ConfigDict) -> None:
  """Fails unless the file holds exactly the tensors of ``cfg``'s LM in their shapes, so a file
  whose metadata and tensors disagree fails before any tensor is dequantised."""
  expected = _expected_shapes(cfg)
  found = set(file.tensor_names())
  missing = [name for name in expected if name not in found]
  extra = sorted(found - set(expected))
  wrong = [f"{name} {file.tensor_shape(name)} (expected {shape})"
           for name, shape in expected.items()
           if name in found and file.tensor_shape(name) != shape]
  problems = ([f"missing {missing[:6]}"] if missing else []) + (
      [f"beyond the {cfg.num_layers} layers {extra[:6]}"] if extra else []) + wrong[:6]
  if problems:
    raise ValueError(f"GGUF file {str(file.path)!r} does not hold the LM its metadata describes: "
                     + "; ".join(problems))


# Fields that fix what a tensor means; max_length only bounds the positions a model is run at.
_ARCHITECTURE_FIELDS = ("family", "vocab_size", "num_layers", "embed_dim", "num_heads",
                        "num_kv_heads", "head_dim", "mlp_dim", "norm_eps", "rope_theta",
                        "tie_word_embeddings", "attention_bias", "activation")


def check_lm_config(cfg: ml_collections.ConfigDict, stored: ml_collections.ConfigDict,
                    path: str | os.PathLike) -> None:
  """Fails, listing the differences, unless ``cfg`` describes ``stored``, the LM of the GGUF
  file at ``path``. Head counts and the norm epsilon do not show in tensor shapes, so a shape
  check alone would load a model that computes something else. ``max_length`` may differ."""
  differences = []
  for field in _ARCHITECTURE_FIELDS:
    ours, theirs = cfg[field], stored[field]
    same = (math.isclose(ours, theirs, rel_tol=1e-6) if isinstance(theirs, float)
            else ours == theirs)
    if not same:
      differences.append(f"{field}: config {ours!r}, file {theirs!r}")
  if differences:
    raise ValueError(f"the LM config does not match GGUF file {str(path)!r} ("
                     + "; ".join(differences) + "): build it with lm_config_from_gguf(path)")


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's reordering of a q or k projection ``[num_heads * head_dim, in]``.

  Our RoPE (Hugging Face's) rotates the first half of each head against the second; ggml's
  rotates adjacent pairs, so llama.cpp's converter interleaves the halves (row ``i`` of the
  first half and row ``i`` of the second become rows ``2i`` and ``2i + 1``). This puts them back.
  """
  rows, cols = weight.shape
  half = rows // num_heads // 2
  return weight.reshape(num_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


class GGUFCheckpoint:
  """A LLaMA GGUF file behind the interface of ``convert.Checkpoint``: tensors by Hugging Face
  name, float32, in Hugging Face layout (q and k rows un-permuted), dequantised on each ``get``.

  Opening checks the architecture and the tensor index (``lm_config_from_gguf``), so a file
  that cannot be loaded fails before any weight is read.
  """

  def __init__(self, file: GGUFFile | str | os.PathLike):
    self.file = _as_file(file)
    self.path = self.file.path
    self.config = lm_config_from_gguf(self.file)
    self._names = {hf_tensor_name(name): name for name in self.file.tensor_names()}

  def keys(self) -> Iterator[str]:
    return iter(self._names)

  def __contains__(self, name: str) -> bool:
    return name in self._names

  def get(self, name: str) -> np.ndarray:
    if name not in self._names:
      raise KeyError(f"tensor {name!r} not found in GGUF file {str(self.path)!r}")
    gguf_name = self._names[name]
    value = self.file.tensor(gguf_name)
    if gguf_name.endswith(".attn_q.weight"):
      value = unpermute_rope_rows(value, self.config.num_heads)
    elif gguf_name.endswith(".attn_k.weight"):
      value = unpermute_rope_rows(value, self.config.num_kv_heads)
    return value


# --- Tokenizers ---------------------------------------------------------------------------------

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4

# Byte-level BPE: how text is split into words before merging, by tokenizer.ggml.pre.
# GPT-2's pattern is the byte-level pre-tokenizer's own; StarCoder (and SmolLM, which reuses its
# vocabulary) splits off every digit first; LLaMA 3 uses tiktoken's cl100k pattern.
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_words():
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _starcoder_words():
  return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_words()])


def _llama3_words():
  return pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_LLAMA3_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


BYTE_LEVEL_PRE_TOKENIZERS = {None: _gpt2_words, "gpt2": _gpt2_words,
                             "starcoder": _starcoder_words, "smollm": _starcoder_words,
                             "llama-bpe": _llama3_words, "llama3": _llama3_words,
                             "llama-v3": _llama3_words}


def _byte_level_bpe(file: GGUFFile, tokens: list[str]) -> tokenizers.Tokenizer:
  """``tokenizer.ggml.model = gpt2``: byte-level BPE with the file's merges (GPT-2, LLaMA 3,
  SmolLM). Tokens are stored in the byte-level alphabet, as in a tokenizer.json."""
  pre = file.metadata("tokenizer.ggml.pre", None)
  if pre not in BYTE_LEVEL_PRE_TOKENIZERS:
    known = sorted(k for k in BYTE_LEVEL_PRE_TOKENIZERS if k)
    raise NotImplementedError(f"GGUF file {str(file.path)!r} sets tokenizer.ggml.pre={pre!r}; "
                              f"the byte-level pre-tokenizers supported are {known}")
  merges = [tuple(merge.split(" ", 1)) for merge in file.metadata("tokenizer.ggml.merges")]
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
  tokenizer.pre_tokenizer = BYTE_LEVEL_PRE_TOKENIZERS[pre]()
  tokenizer.decoder = decoders.ByteLevel()
  return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float],
                         token_types: list[int]) -> list[tuple[str, str]]:
  """BPE merges equivalent to a SentencePiece BPE vocabulary, which stores scores, not merges.

  Every split of a normal piece into two pieces of the vocabulary is a merge, ranked by the
  merged piece's score (higher first), ties going to the longer left, then the longer right
  part, then to vocabulary order, as Hugging Face's conversion of SentencePiece models ranks
  them, so both tokenise alike.
  """
  ids = {token: i for i, token in enumerate(tokens)}
  candidates = []
  for token, score, kind in zip(tokens, scores, token_types):
    if kind != _NORMAL:
      continue
    splits = [(token[:k], token[k:]) for k in range(1, len(token))
              if token[:k] in ids and token[k:] in ids]
    splits.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
    candidates.extend((score, left, right) for left, right in splits)
  candidates.sort(key=lambda c: (-c[0], -len(c[1]), -len(c[2])))  # stable: ties keep their order
  return [(left, right) for _, left, right in candidates]


def _sentencepiece_bpe(file: GGUFFile, tokens: list[str],
                       token_types: list[int]) -> tokenizers.Tokenizer:
  """``tokenizer.ggml.model = llama``: SentencePiece BPE (LLaMA 1/2, Mistral, TinyLlama): words
  marked with a leading ``▁`` and a prefix space, unknown characters as ``<0xNN>`` byte tokens."""
  if file.metadata("tokenizer.ggml.merges", None) is not None:
    merges = [tuple(merge.split(" ", 1)) for merge in file.metadata("tokenizer.ggml.merges")]
  else:
    merges = sentencepiece_merges(tokens, file.metadata("tokenizer.ggml.scores"), token_types)
  unk_id = file.metadata("tokenizer.ggml.unknown_token_id", None)
  vocab = {token: i for i, token in enumerate(tokens)}
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab, merges, unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True,
      byte_fallback=True))
  prefix_space = file.metadata("tokenizer.ggml.add_space_prefix", True)
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement="▁", prepend_scheme="first" if prefix_space else "never", split=False)
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix_space:
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  tokenizer.decoder = decoders.Sequence(steps)
  return tokenizer


def tokenizer_from_gguf(file: GGUFFile | str | os.PathLike) -> tuple[tokenizers.Tokenizer, dict]:
  """The tokenizer a GGUF file describes in its ``tokenizer.ggml.*`` metadata.

  Returns a ``tokenizers.Tokenizer`` and the keyword arguments for ``data.Tokenizer`` around it:
  ``lm_vocab_size`` (the token table's rows, or the token count when the file has no table),
  ``eos_token``, ``pad_token``, and ``bos_token`` only when the file says llama.cpp adds one
  (``tokenizer.ggml.add_bos_token``; SentencePiece vocabularies do by default), since the sequence
  builder prepends whatever BOS the tokenizer has. Control tokens become special tokens and
  user-defined ones added tokens, so text holding them encodes each to its one id.
  """
  file = _as_file(file)
  kind = file.metadata("tokenizer.ggml.model")
  tokens = file.metadata("tokenizer.ggml.tokens")
  token_types = file.metadata("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
  if kind == "gpt2":
    tokenizer = _byte_level_bpe(file, tokens)
  elif kind == "llama":
    tokenizer = _sentencepiece_bpe(file, tokens, token_types)
  else:
    raise NotImplementedError(f"GGUF file {str(file.path)!r} sets tokenizer.ggml.model={kind!r}; "
                              "supported are 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)")
  tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                                for t, k in zip(tokens, token_types) if k == _CONTROL])
  tokenizer.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                        for t, k in zip(tokens, token_types) if k == _USER_DEFINED])

  def special(key):
    token_id = file.metadata(f"tokenizer.ggml.{key}", None)
    if token_id is not None and not 0 <= token_id < len(tokens):
      raise ValueError(f"GGUF file {str(file.path)!r} sets tokenizer.ggml.{key}={token_id}, "
                       f"outside its {len(tokens)} tokens")
    return None if token_id is None else tokens[token_id]

  adds_bos = file.metadata("tokenizer.ggml.add_bos_token", kind == "llama")
  vocab_size = (file.tensor_shape("token_embd.weight")[0]
                if "token_embd.weight" in file.tensor_names() else len(tokens))
  return tokenizer, dict(lm_vocab_size=vocab_size, eos_token=special("eos_token_id"),
                         bos_token=special("bos_token_id") if adds_bos else None,
                         pad_token=special("padding_token_id"))
