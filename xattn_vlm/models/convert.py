"""Pretrained weights from local Hugging Face folders (config.json + *.safetensors) into NNX modules.

Safetensors are read directly (no torch at run time), one tensor at a time, from a single
``model.safetensors`` or from shards listed in ``model.safetensors.index.json``. A decoder LM may
also come from a llama.cpp ``.gguf`` file (``models.gguf_file``), read the same way through the
same loader. Every assignment checks the shape and names the tensor when it does not fit.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open

from xattn_vlm.models import gguf_file
from xattn_vlm.models.config import lm_config, vision_config
from xattn_vlm.models.flamingo import Flamingo
from xattn_vlm.models.lm import DecoderLM
from xattn_vlm.models.vision import VisionEncoder

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_config(path: str | pathlib.Path) -> dict:
  """config.json of a local Hugging Face model folder."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"Hugging Face model folder {str(folder)!r} does not exist")
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{str(config_file)!r} is missing: a Hugging Face model folder needs "
                            "config.json beside its safetensors")
  return json.loads(config_file.read_text())


class MissingTensorError(KeyError):
  """A tensor a loader needs is not in the checkpoint; ``name`` is its name."""

  def __init__(self, name: str, path):
    super().__init__(f"tensor {name!r} not found in checkpoint {str(path)!r}")
    self.name = name


class Checkpoint:
  """The tensors of a local safetensors checkpoint, read lazily by name. It remembers which names
  were read, so an importer can name every tensor it did not map (``unread``)."""

  def __init__(self, path: str | pathlib.Path):
    folder = pathlib.Path(path)
    index = folder / SAFETENSORS_INDEX
    single = folder / SAFETENSORS
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      self._files = {name: folder / shard for name, shard in weight_map.items()}
    elif single.is_file():
      with safe_open(single, framework="flax") as f:
        self._files = {name: single for name in f.keys()}
    else:
      raise FileNotFoundError(f"no {SAFETENSORS} or {SAFETENSORS_INDEX} in {str(folder)!r}")
    missing = sorted({str(p) for p in self._files.values() if not p.is_file()})
    if missing:
      raise FileNotFoundError(f"safetensors shards listed in the index are missing: {missing}")
    self.path = folder
    self.read: set[str] = set()

  def keys(self) -> Iterator[str]:
    return iter(self._files)

  def __contains__(self, name: str) -> bool:
    return name in self._files

  def get(self, name: str) -> jax.Array:
    if name not in self._files:
      raise MissingTensorError(name, self.path)
    self.read.add(name)
    with safe_open(self._files[name], framework="flax") as f:
      return f.get_tensor(name)

  def unread(self) -> list[str]:
    """The tensor names no ``get`` has asked for, sorted."""
    return sorted(set(self._files) - self.read)


def assign(variable: nnx.Variable, value, name: str) -> None:
  """Writes ``value`` into ``variable`` (cast to its dtype) after checking the shape.

  ``variable`` may be abstract (from ``nnx.eval_shape``): it then gets its first concrete value,
  so a large model is loaded without materialising random weights first.
  """
  value = jnp.asarray(value)
  target = variable.get_value()
  if value.shape != target.shape:
    raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(value.shape)}, "
                     f"model expects {tuple(target.shape)}")
  variable.set_value(value.astype(target.dtype))


def as_numpy(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32))


# --- Vision towers: Hugging Face CLIP (CLIPVisionModel, or the vision half of CLIPModel) ---

PREPROCESSOR_CONFIG = "preprocessor_config.json"
HF_VISION_MODEL_TYPES = ("clip_vision_model", "clip")

# CLIPVisionConfig's defaults (ViT-B/32): config.json omits fields that keep their default.
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, num_channels=3, image_size=224,
                             patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _hf_vision_fields(hf_config: dict) -> dict:
  """The vision tower's fields of a CLIP config.json, defaults filled in."""
  model_type = hf_config.get("model_type")
  if model_type == "clip":
    fields = hf_config.get("vision_config") or {}
  elif model_type == "clip_vision_model":
    fields = hf_config
  else:
    raise ValueError(f"config.json model_type must be one of {HF_VISION_MODEL_TYPES} for a "
                     f"vision tower, got {model_type!r}")
  return {**_CLIP_VISION_DEFAULTS, **fields}


def vision_config_from_hf(hf_config: dict, **overrides) -> ml_collections.ConfigDict:
  """Our ``vision_config`` from a CLIP ``config.json`` dict (``clip_vision_model`` or ``clip``).

  ``overrides`` set the fields a checkpoint does not determine (``feature_layer``,
  ``use_post_layernorm``, ``include_class_token``, ``image_mean``, ``image_std``) or replace any
  other ``vision_config`` argument.
  """
  fields = _hf_vision_fields(hf_config)
  kwargs = dict(image_size=fields["image_size"], patch_size=fields["patch_size"],
                width=fields["hidden_size"], num_layers=fields["num_hidden_layers"],
                num_heads=fields["num_attention_heads"], mlp_dim=fields["intermediate_size"],
                activation=fields["hidden_act"], norm_eps=fields["layer_norm_eps"],
                num_channels=fields["num_channels"])
  kwargs.update(overrides)
  return vision_config(**kwargs)


def read_image_normalisation(path: str | pathlib.Path) -> dict:
  """``image_mean`` / ``image_std`` from the folder's preprocessor_config.json ({} if absent)."""
  preprocessor = pathlib.Path(path) / PREPROCESSOR_CONFIG
  if not preprocessor.is_file():
    return {}
  fields = json.loads(preprocessor.read_text())
  return {key: tuple(float(v) for v in fields[key]) for key in ("image_mean", "image_std")
          if key in fields}


def load_hf_vision(path: str | pathlib.Path, dtype=jnp.float32, param_dtype=jnp.float32,
                   **config_overrides) -> VisionEncoder:
  """A ``VisionEncoder`` built from a local CLIP folder's config and filled with its weights.

  The pixel mean/std come from preprocessor_config.json when present; ``config_overrides`` go to
  ``vision_config_from_hf`` and win over both.
  """
  overrides = {**read_image_normalisation(path), **config_overrides}
  cfg = vision_config_from_hf(read_config(path), **overrides)
  encoder = VisionEncoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
  load_hf_vision_weights(encoder, path)
  return encoder


def checked_tensor(ckpt: Checkpoint, name: str, expected: tuple[int, ...]) -> jax.Array:
  """Tensor ``name`` after checking its shape as stored in the checkpoint."""
  value = ckpt.get(name)
  if tuple(value.shape) != tuple(expected):
    raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(value.shape)}, "
                     f"model expects {tuple(expected)} (in the checkpoint's layout)")
  return value


def load_linear(dense, ckpt: Checkpoint, name: str) -> None:
  """torch ``Linear`` (weight ``[out, in]``) into our ``Dense`` (kernel ``[*in, *out]``)."""
  n_in, n_out = math.prod(dense.in_features), math.prod(dense.out_features)
  weight = checked_tensor(ckpt, f"{name}.weight", (n_out, n_in))
  assign(dense.kernel, weight.T.reshape(dense.kernel.shape), f"{name}.weight")
  if dense.bias is not None:
    bias = checked_tensor(ckpt, f"{name}.bias", (n_out,))
    assign(dense.bias, bias.reshape(dense.bias.shape), f"{name}.bias")


def load_norm(norm, ckpt: Checkpoint, name: str) -> None:
  """A torch LayerNorm or RMSNorm (``weight``, and ``bias`` when ours has one)."""
  assign(norm.scale, ckpt.get(f"{name}.weight"), f"{name}.weight")
  if getattr(norm, "bias", None) is not None:
    assign(norm.bias, ckpt.get(f"{name}.bias"), f"{name}.bias")


def _check_vision_architecture(encoder: VisionEncoder, fields: dict, path) -> None:
  """Raises when the encoder differs from the checkpoint in ways tensor shapes cannot reveal."""
  pairs = [("num_layers", encoder.num_layers, fields["num_hidden_layers"]),
           ("num_heads", encoder.num_heads, fields["num_attention_heads"]),
           ("activation", encoder.activation, fields["hidden_act"]),
           ("norm_eps", encoder.norm_eps, fields["layer_norm_eps"])]
  mismatches = [f"{name}: encoder {ours!r}, checkpoint {theirs!r}"
                for name, ours, theirs in pairs if ours != theirs]
  if mismatches:
    raise ValueError(f"encoder does not match the checkpoint in {str(path)!r} ("
                     + "; ".join(mismatches) + "): build it from vision_config_from_hf(config)")


def load_hf_vision_weights(encoder: VisionEncoder, path: str | pathlib.Path) -> None:
  """Fills ``encoder`` in place with the vision tower of a local CLIP folder.

  Reads only the vision tensors: ``vision_model.*`` (``CLIPModel``, and ``CLIPVisionModel`` saved
  by transformers 4) or the unprefixed names ``CLIPVisionModel`` has in transformers 5. Blocks the
  encoder does not run (after ``feature_layer``) and ``post_layernorm`` when unused are skipped.
  """
  hf_config = read_config(path)
  _check_vision_architecture(encoder, _hf_vision_fields(hf_config), path)
  ckpt = Checkpoint(path)
  prefixed = "vision_model.embeddings.class_embedding" in ckpt
  if hf_config["model_type"] == "clip" and not prefixed:
    raise KeyError(f"tensor 'vision_model.embeddings.class_embedding' not found in checkpoint "
                   f"{str(path)!r}: a CLIPModel folder must hold its vision tower as vision_model.*")
  load_clip_vision(encoder, ckpt, "vision_model." if prefixed else "")


def load_clip_vision(encoder: VisionEncoder, ckpt, prefix: str) -> None:
  """Fills ``encoder`` from the CLIP-named tensors under ``prefix`` of ``ckpt`` (anything with
  ``get``): Hugging Face's CLIP, and IDEFICS's tower (``model.vision_model.``)."""
  width, p, c = encoder.class_embedding.shape[0], encoder.patch_size, encoder.num_channels
  conv = checked_tensor(ckpt, f"{prefix}embeddings.patch_embedding.weight", (width, c, p, p))
  # torch Conv2d weight [out, in, kh, kw] -> our patch kernel [kh, kw, in, out].
  assign(encoder.patch_embedding.kernel, conv.transpose(2, 3, 1, 0),
         f"{prefix}embeddings.patch_embedding.weight")
  assign(encoder.class_embedding, ckpt.get(f"{prefix}embeddings.class_embedding"),
         f"{prefix}embeddings.class_embedding")
  assign(encoder.position_embedding, ckpt.get(f"{prefix}embeddings.position_embedding.weight"),
         f"{prefix}embeddings.position_embedding.weight")
  load_norm(encoder.pre_layrnorm, ckpt, f"{prefix}pre_layrnorm")
  for i, block in enumerate(encoder.layers):
    name = f"{prefix}encoder.layers.{i}"
    load_norm(block.layer_norm1, ckpt, f"{name}.layer_norm1")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      load_linear(getattr(block.self_attn, proj), ckpt, f"{name}.self_attn.{proj}")
    load_norm(block.layer_norm2, ckpt, f"{name}.layer_norm2")
    load_linear(block.mlp.up, ckpt, f"{name}.mlp.fc1")
    load_linear(block.mlp.down, ckpt, f"{name}.mlp.fc2")
  if encoder.post_layernorm is not None:
    load_norm(encoder.post_layernorm, ckpt, f"{prefix}post_layernorm")


# --- Decoder LMs: Hugging Face GPT-2, LLaMA, Mistral, Qwen2, MPT (and MosaicGPT), GPT-NeoX ---

HF_LM_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "mpt", "mosaic_gpt", "gpt_neox")


def _hf_field(hf_config: dict, key: str):
  if key not in hf_config:
    raise ValueError(f"config.json of a {hf_config.get('model_type')!r} model lacks {key!r}")
  return hf_config[key]


def _gpt2_config(hf_config: dict) -> ml_collections.ConfigDict:
  for key, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
    if hf_config.get(key, supported) != supported:
      raise NotImplementedError(f"GPT-2 config.json sets {key}={hf_config[key]!r}; only "
                                f"{supported} is supported")
  embed_dim = _hf_field(hf_config, "n_embd")
  return lm_config(
      family="gpt2", vocab_size=_hf_field(hf_config, "vocab_size"),
      num_layers=_hf_field(hf_config, "n_layer"), embed_dim=embed_dim,
      num_heads=_hf_field(hf_config, "n_head"),
      mlp_dim=hf_config.get("n_inner") or 4 * embed_dim,
      max_length=_hf_field(hf_config, "n_positions"),
      norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
      tie_word_embeddings=hf_config.get("tie_word_embeddings", True), attention_bias=True,
      activation=hf_config.get("activation_function", "gelu_new"))


def _llama_config(hf_config: dict) -> ml_collections.ConfigDict:
  model_type = hf_config["model_type"]
  # transformers 5 writes rope_parameters; older config.json files rope_theta and rope_scaling.
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise NotImplementedError(f"{model_type} config.json sets rope_type {rope_type!r}; only "
                              "'default' RoPE is supported")
  if hf_config.get("mlp_bias"):
    raise NotImplementedError(f"{model_type} config.json sets mlp_bias=True; only MLPs without "
                              "biases are supported")
  if model_type == "llama" and hf_config.get("attention_bias"):
    raise NotImplementedError("llama config.json sets attention_bias=True, which also puts a bias "
                              "on o_proj; only q/k/v biases (Qwen2) are supported")
  max_length = _hf_field(hf_config, "max_position_embeddings")
  window = hf_config.get("sliding_window")
  if model_type == "qwen2" and not hf_config.get("use_sliding_window"):
    window = None
  if window:
    # Up to the window's length a sliding window masks nothing, so cap the context there.
    max_length = min(max_length, window)
  embed_dim = _hf_field(hf_config, "hidden_size")
  num_heads = _hf_field(hf_config, "num_attention_heads")
  return lm_config(
      family="llama", vocab_size=_hf_field(hf_config, "vocab_size"),
      num_layers=_hf_field(hf_config, "num_hidden_layers"), embed_dim=embed_dim,
      num_heads=num_heads, num_kv_heads=hf_config.get("num_key_value_heads") or num_heads,
      head_dim=hf_config.get("head_dim") or embed_dim // num_heads,
      mlp_dim=_hf_field(hf_config, "intermediate_size"), max_length=max_length,
      norm_eps=hf_config.get("rms_norm_eps", 1e-6),
      rope_theta=rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)),
      tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
      attention_bias=model_type == "qwen2", activation=hf_config.get("hidden_act", "silu"))


def _mpt_config(hf_config: dict) -> ml_collections.ConfigDict:
  """MPT's config.json (``attn_config`` holds the attention settings) or MosaicGPT's (flat, the
  older layout of MPT-1B). Missing settings take the defaults of the code that reads each:
  transformers' ``MptConfig`` and MosaicGPT's config class (``alibi`` off, biases on)."""
  model_type = hf_config["model_type"]
  if model_type == "mpt":
    attn = {"alibi": True, "alibi_bias_max": 8, "qk_ln": False, "clip_qkv": None,
            "softmax_scale": None, "prefix_lm": False, **(hf_config.get("attn_config") or {})}
    where = {key: f"attn_config.{key}" for key in attn}
    mlp_ratio = hf_config.get("expansion_ratio", 4)
    no_bias = hf_config.get("no_bias", True)
    eps = hf_config.get("layer_norm_epsilon", 1e-5)
    ffn_type = (hf_config.get("ffn_config") or {}).get("ffn_type", "mptmlp")
    if ffn_type != "mptmlp":
      raise NotImplementedError(f"mpt config.json sets ffn_config.ffn_type={ffn_type!r}; only "
                                "'mptmlp' (a GELU MLP) is supported")
    norm_type = hf_config.get("norm_type", "low_precision_layernorm")
    if norm_type not in ("layernorm", "low_precision_layernorm"):
      raise NotImplementedError(f"mpt config.json sets norm_type={norm_type!r}; only LayerNorm is "
                                "supported")
  else:
    attn = {"alibi": hf_config.get("alibi", False),
            "alibi_bias_max": hf_config.get("alibi_bias_max", 8),
            "qk_ln": hf_config.get("attn_qk_ln", False),
            "clip_qkv": hf_config.get("attn_clip_qkv"),
            "softmax_scale": hf_config.get("softmax_scale"),
            "prefix_lm": hf_config.get("prefix_lm", False)}
    where = {"alibi": "alibi", "alibi_bias_max": "alibi_bias_max", "qk_ln": "attn_qk_ln",
             "clip_qkv": "attn_clip_qkv", "softmax_scale": "softmax_scale",
             "prefix_lm": "prefix_lm"}
    mlp_ratio = hf_config.get("mlp_ratio", 4)
    no_bias = hf_config.get("no_bias", False)
    eps = 1e-5  # torch's LayerNorm default, which MosaicGPT uses
  unsupported = []  # (setting, value, what is supported)
  if not attn["alibi"]:
    unsupported.append((where["alibi"], attn["alibi"], "true; learned positions are not built"))
  if attn["prefix_lm"]:
    unsupported.append((where["prefix_lm"], attn["prefix_lm"], "false"))
  for key in ("clip_qkv", "softmax_scale"):
    if attn[key] is not None:
      unsupported.append((where[key], attn[key], "null"))
  if hf_config.get("logit_scale") is not None:
    unsupported.append(("logit_scale", hf_config["logit_scale"], "null"))
  if not no_bias:
    unsupported.append(("no_bias", no_bias, "true"))
  if unsupported:
    raise NotImplementedError(f"{model_type} config.json sets " + "; ".join(
        f"{key}={value!r} (supported: {supported})" for key, value, supported in unsupported))
  embed_dim = _hf_field(hf_config, "d_model")
  return lm_config(
      family="mpt", vocab_size=_hf_field(hf_config, "vocab_size"),
      num_layers=_hf_field(hf_config, "n_layers"), embed_dim=embed_dim,
      num_heads=_hf_field(hf_config, "n_heads"), mlp_dim=mlp_ratio * embed_dim,
      max_length=_hf_field(hf_config, "max_seq_len"), norm_eps=eps,
      tie_word_embeddings=hf_config.get("tie_word_embeddings", True),
      alibi_bias_max=float(attn["alibi_bias_max"]), qk_norm=bool(attn["qk_ln"]))


def _gpt_neox_config(hf_config: dict) -> ml_collections.ConfigDict:
  """GPT-NeoX's config.json: transformers 5 writes ``rope_parameters`` (``rope_theta``,
  ``partial_rotary_factor``), older files ``rotary_emb_base`` and ``rotary_pct``."""
  rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type != "default":
    raise NotImplementedError(f"gpt_neox config.json sets rope_type {rope_type!r}; only "
                              "'default' RoPE is supported")
  return lm_config(
      family="gpt_neox", vocab_size=_hf_field(hf_config, "vocab_size"),
      num_layers=_hf_field(hf_config, "num_hidden_layers"),
      embed_dim=_hf_field(hf_config, "hidden_size"),
      num_heads=_hf_field(hf_config, "num_attention_heads"),
      mlp_dim=_hf_field(hf_config, "intermediate_size"),
      max_length=_hf_field(hf_config, "max_position_embeddings"),
      norm_eps=hf_config.get("layer_norm_eps", 1e-5),
      rope_theta=rope.get("rope_theta", hf_config.get("rotary_emb_base", 10000.0)),
      rotary_fraction=rope.get("partial_rotary_factor", hf_config.get("rotary_pct", 0.25)),
      parallel_residual=hf_config.get("use_parallel_residual", True),
      tie_word_embeddings=hf_config.get("tie_word_embeddings", False),
      attention_bias=hf_config.get("attention_bias", True),
      activation=hf_config.get("hidden_act", "gelu"))


def lm_config_from_hf(hf_config: dict) -> ml_collections.ConfigDict:
  """Our ``lm_config`` from a Hugging Face ``config.json`` dict.

  ``gpt2`` maps to the ``gpt2`` family; ``llama``, ``mistral`` and ``qwen2`` to ``llama`` (Qwen2 with
  q/k/v biases); ``mpt`` and ``mosaic_gpt`` (MPT-1B's older code) to ``mpt``; ``gpt_neox`` to
  ``gpt_neox``. A sliding attention window caps ``max_length`` at the window, since up to that
  length it masks nothing. Features outside these families raise ``NotImplementedError``.
  """
  model_type = hf_config.get("model_type")
  if model_type not in HF_LM_MODEL_TYPES:
    raise ValueError(f"config.json model_type must be one of {HF_LM_MODEL_TYPES} for a decoder "
                     f"LM, got {model_type!r}")
  if model_type == "gpt2":
    return _gpt2_config(hf_config)
  if model_type in ("mpt", "mosaic_gpt"):
    return _mpt_config(hf_config)
  if model_type == "gpt_neox":
    return _gpt_neox_config(hf_config)
  return _llama_config(hf_config)


def read_lm_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Our ``lm_config`` for the decoder LM at ``path``: a local Hugging Face folder (its
  config.json) or a llama.cpp ``.gguf`` file (its metadata)."""
  if gguf_file.is_gguf(path):
    return gguf_file.lm_config_from_gguf(path)
  return lm_config_from_hf(read_config(path))


def _lm_prefix(ckpt: Checkpoint, prefix: str, probe: str, family: str) -> str:
  """``prefix`` if the checkpoint names its base-model tensors with it (``*ForCausalLM``), else ''."""
  for candidate in (prefix, ""):
    if candidate + probe in ckpt:
      return candidate
  raise KeyError(f"tensor {prefix + probe!r} (or {probe!r}) not found in checkpoint "
                 f"{str(ckpt.path)!r}: it does not hold a {family}-family decoder LM")


def _load_conv1d(dense, ckpt: Checkpoint, name: str) -> None:
  """GPT-2's ``Conv1D`` (weight ``[in, out]``) into our ``Dense`` (kernel ``[*in, *out]``)."""
  n_in, n_out = math.prod(dense.in_features), math.prod(dense.out_features)
  weight = checked_tensor(ckpt, f"{name}.weight", (n_in, n_out))
  assign(dense.kernel, weight.reshape(dense.in_features + dense.out_features), f"{name}.weight")
  bias = checked_tensor(ckpt, f"{name}.bias", (n_out,))
  assign(dense.bias, bias.reshape(dense.out_features), f"{name}.bias")


def _load_gpt2_attention(attn, ckpt: Checkpoint, name: str) -> None:
  """GPT-2's fused ``c_attn`` ([D, 3 * H * Dh], q then k then v) and ``c_proj``."""
  d = attn.query.in_features[0]
  width = math.prod(attn.query.out_features)
  weight = checked_tensor(ckpt, f"{name}.c_attn.weight", (d, 3 * width))
  bias = checked_tensor(ckpt, f"{name}.c_attn.bias", (3 * width,))
  for dense, w, b in zip((attn.query, attn.key, attn.value), jnp.split(weight, 3, axis=1),
                         jnp.split(bias, 3)):
    assign(dense.kernel, w.reshape(dense.in_features + dense.out_features), f"{name}.c_attn.weight")
    assign(dense.bias, b.reshape(dense.out_features), f"{name}.c_attn.bias")
  _load_conv1d(attn.out, ckpt, f"{name}.c_proj")


def _gpt2_tables(ckpt: Checkpoint) -> tuple[str, str]:
  prefix = _lm_prefix(ckpt, "transformer.", "wte.weight", "gpt2")
  return f"{prefix}wte.weight", "lm_head.weight"


def _load_gpt2(lm: DecoderLM, ckpt: Checkpoint) -> None:
  prefix = _lm_prefix(ckpt, "transformer.", "wte.weight", "gpt2")
  assign(lm.position_embed.embedding, ckpt.get(f"{prefix}wpe.weight"), f"{prefix}wpe.weight")
  for i, block in enumerate(lm.blocks):
    name = f"{prefix}h.{i}"
    load_norm(block.attn_norm, ckpt, f"{name}.ln_1")
    _load_gpt2_attention(block.attn, ckpt, f"{name}.attn")
    load_norm(block.mlp_norm, ckpt, f"{name}.ln_2")
    _load_conv1d(block.mlp.up, ckpt, f"{name}.mlp.c_fc")
    _load_conv1d(block.mlp.down, ckpt, f"{name}.mlp.c_proj")
  load_norm(lm.final_norm, ckpt, f"{prefix}ln_f")


def _llama_tables(ckpt: Checkpoint) -> tuple[str, str]:
  prefix = _lm_prefix(ckpt, "model.", "embed_tokens.weight", "llama")
  return f"{prefix}embed_tokens.weight", "lm_head.weight"


def _load_llama(lm: DecoderLM, ckpt: Checkpoint) -> None:
  prefix = _lm_prefix(ckpt, "model.", "embed_tokens.weight", "llama")
  for i, block in enumerate(lm.blocks):
    name = f"{prefix}layers.{i}"
    load_norm(block.attn_norm, ckpt, f"{name}.input_layernorm")
    for dense, proj in ((block.attn.query, "q_proj"), (block.attn.key, "k_proj"),
                        (block.attn.value, "v_proj"), (block.attn.out, "o_proj")):
      load_linear(dense, ckpt, f"{name}.self_attn.{proj}")
    load_norm(block.mlp_norm, ckpt, f"{name}.post_attention_layernorm")
    for dense, proj in ((block.mlp.gate, "gate_proj"), (block.mlp.up, "up_proj"),
                        (block.mlp.down, "down_proj")):
      load_linear(dense, ckpt, f"{name}.mlp.{proj}")
  load_norm(lm.final_norm, ckpt, f"{prefix}norm")


def _load_fused_qkv(attn, weight, bias, name: str) -> None:
  """A fused q/k/v projection as [3, H, Dh, D] (weight) and [3, H, Dh] (bias) into our three."""
  for j, dense in enumerate((attn.query, attn.key, attn.value)):
    assign(dense.kernel, weight[j].transpose(2, 0, 1), f"{name}.weight")
    if bias is not None:
      assign(dense.bias, bias[j], f"{name}.bias")


# MosaicGPT's names for MPT's modules (mosaicml/examples v0.0.4, MPT-1B).
_MOSAIC_GPT_NAMES = {"norm_1": "ln_1", "norm_2": "ln_2", "ffn.up_proj": "mlp.mlp_up",
                     "ffn.down_proj": "mlp.mlp_down", "norm_f": "ln_f"}


def _mpt_tables(ckpt: Checkpoint) -> tuple[str, str]:
  prefix = _lm_prefix(ckpt, "transformer.", "wte.weight", "mpt")
  return f"{prefix}wte.weight", "lm_head.weight"


def _load_mpt(lm: DecoderLM, ckpt: Checkpoint) -> None:
  """MPT's tensors, in transformers' and MPT-7B's names or in MosaicGPT's (``ln_1``, ``mlp.mlp_up``,
  ``ln_f``, and ``attn.q_ln`` / ``attn.k_ln`` for the full-width q/k LayerNorm)."""
  prefix = _lm_prefix(ckpt, "transformer.", "wte.weight", "mpt")
  mosaic = f"{prefix}blocks.0.ln_1.weight" in ckpt
  rename = (lambda n: _MOSAIC_GPT_NAMES.get(n, n)) if mosaic else (lambda n: n)
  cfg = lm.cfg
  h, dh, d = cfg.num_heads, cfg.head_dim, cfg.embed_dim
  for i, block in enumerate(lm.blocks):
    name = f"{prefix}blocks.{i}"
    load_norm(block.attn_norm, ckpt, f"{name}.{rename('norm_1')}")
    # Wqkv's output is q, k and v in contiguous thirds, each split into heads.
    wqkv = checked_tensor(ckpt, f"{name}.attn.Wqkv.weight", (3 * h * dh, d))
    _load_fused_qkv(block.attn, wqkv.reshape(3, h, dh, d), None, f"{name}.attn.Wqkv")
    if block.attn.q_norm is not None:
      load_norm(block.attn.q_norm, ckpt, f"{name}.attn.q_ln")
      load_norm(block.attn.k_norm, ckpt, f"{name}.attn.k_ln")
    load_linear(block.attn.out, ckpt, f"{name}.attn.out_proj")
    load_norm(block.mlp_norm, ckpt, f"{name}.{rename('norm_2')}")
    load_linear(block.mlp.up, ckpt, f"{name}.{rename('ffn.up_proj')}")
    load_linear(block.mlp.down, ckpt, f"{name}.{rename('ffn.down_proj')}")
  load_norm(lm.final_norm, ckpt, f"{prefix}{rename('norm_f')}")


def _gpt_neox_tables(ckpt: Checkpoint) -> tuple[str, str]:
  """GPT-NeoX's head is ``embed_out`` in the published files and ``lm_head`` in what
  transformers 5 holds in memory: either name is read."""
  prefix = _lm_prefix(ckpt, "gpt_neox.", "embed_in.weight", "gpt_neox")
  head = "embed_out.weight" if "embed_out.weight" in ckpt else "lm_head.weight"
  return f"{prefix}embed_in.weight", head


def _load_gpt_neox(lm: DecoderLM, ckpt: Checkpoint) -> None:
  prefix = _lm_prefix(ckpt, "gpt_neox.", "embed_in.weight", "gpt_neox")
  cfg = lm.cfg
  h, dh, d = cfg.num_heads, cfg.head_dim, cfg.embed_dim
  for i, block in enumerate(lm.blocks):
    name = f"{prefix}layers.{i}"
    load_norm(block.attn_norm, ckpt, f"{name}.input_layernorm")
    # query_key_value is fused per head: its output is [H, (q, k, v), Dh].
    qkv = f"{name}.attention.query_key_value"
    weight = checked_tensor(ckpt, f"{qkv}.weight", (3 * h * dh, d)).reshape(h, 3, dh, d)
    bias = None
    if cfg.attention_bias:
      bias = checked_tensor(ckpt, f"{qkv}.bias", (3 * h * dh,)).reshape(h, 3, dh).transpose(1, 0, 2)
    _load_fused_qkv(block.attn, weight.transpose(1, 0, 2, 3), bias, qkv)
    load_linear(block.attn.out, ckpt, f"{name}.attention.dense")
    load_norm(block.mlp_norm, ckpt, f"{name}.post_attention_layernorm")
    load_linear(block.mlp.up, ckpt, f"{name}.mlp.dense_h_to_4h")
    load_linear(block.mlp.down, ckpt, f"{name}.mlp.dense_4h_to_h")
  load_norm(lm.final_norm, ckpt, f"{prefix}final_layer_norm")


# Per family: the loader of everything but the vocabulary tables, and those tables' names.
_LM_LOADERS = {"gpt2": (_load_gpt2, _gpt2_tables), "llama": (_load_llama, _llama_tables),
               "mpt": (_load_mpt, _mpt_tables), "gpt_neox": (_load_gpt_neox, _gpt_neox_tables)}


def load_hf_lm_blocks(lm: DecoderLM, ckpt: Checkpoint) -> None:
  """Fills everything of ``lm`` but its token table and untied head from ``ckpt`` (a
  ``Checkpoint`` of a Hugging Face LM, or anything with ``get`` and ``in``)."""
  _LM_LOADERS[lm.cfg.family][0](lm, ckpt)


def lm_table_names(lm: DecoderLM, ckpt: Checkpoint) -> tuple[str, str | None]:
  """The names in ``ckpt`` of ``lm``'s token table and untied head (None when tied)."""
  embed_name, head_name = _LM_LOADERS[lm.cfg.family][1](ckpt)
  return embed_name, None if lm.lm_head is None else head_name


def _load_lm(lm: DecoderLM, ckpt: Checkpoint | gguf_file.GGUFCheckpoint) -> None:
  load_hf_lm_blocks(lm, ckpt)
  load_hf_lm_tables(lm, ckpt)


def load_hf_lm_tables(lm: DecoderLM, ckpt: Checkpoint) -> None:
  """Fills ``lm``'s token table and untied head from ``ckpt``; their sizes must be the model's."""
  embed_name, head_name = lm_table_names(lm, ckpt)
  assign(lm.token_embed.embedding, ckpt.get(embed_name), embed_name)
  if head_name is not None:
    weight = checked_tensor(ckpt, head_name, lm.lm_head.kernel.shape[::-1])
    assign(lm.lm_head.kernel, weight.T, head_name)


def unfilled_parameters(model: nnx.Module) -> list[str]:
  """Paths of the variables of an abstractly built ``model`` that no value was written to."""
  return [".".join(map(str, p)) for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]


def load_hf_lm_weights(lm: DecoderLM, path: str | pathlib.Path) -> None:
  """Fills ``lm`` in place with the weights of a local Hugging Face decoder-LM folder or of a
  llama.cpp ``.gguf`` file (dequantised to float32, then cast to ``lm``'s parameter dtype).

  Tensor names may carry the base-model prefix (``transformer.`` for GPT-2 and MPT, ``model.`` for
  the LLaMA family, ``gpt_neox.``) or not; a tied head reads no head tensor. ``lm`` may be abstract (from
  ``nnx.eval_shape``): every parameter then receives its checkpoint value. A GGUF file's LM must
  match ``lm.cfg`` (``gguf_file.check_lm_config``) before any tensor is read.
  """
  if gguf_file.is_gguf(path):
    ckpt = gguf_file.GGUFCheckpoint(path)
    gguf_file.check_lm_config(lm.cfg, ckpt.config, path)
  else:
    ckpt = Checkpoint(path)
  _load_lm(lm, ckpt)


def load_hf_lm(path: str | pathlib.Path, dtype=jnp.float32, param_dtype=jnp.float32,
               attention: str = "auto") -> DecoderLM:
  """A ``DecoderLM`` built from a local Hugging Face folder's config.json, or a llama.cpp
  ``.gguf`` file's metadata, and filled with its weights. It is built abstractly, so no random
  weights are ever materialised. ``attention``: ``config.model.attention``."""
  if gguf_file.is_gguf(path):
    ckpt = gguf_file.GGUFCheckpoint(path)  # opened once: reading a GGUF header takes seconds
    cfg = ckpt.config
  else:
    cfg = lm_config_from_hf(read_config(path))
    ckpt = Checkpoint(path)
  lm = nnx.eval_shape(lambda: DecoderLM(cfg, rngs=nnx.Rngs(0), dtype=dtype,
                                        param_dtype=param_dtype, attention=attention))
  _load_lm(lm, ckpt)
  unfilled = unfilled_parameters(lm)
  if unfilled:
    raise ValueError(f"checkpoint {str(path)!r} left these parameters unfilled: {unfilled}")
  return lm


# -- Flamingo ------------------------------------------------------------------------------------

_VISION_CHOICES = ("feature_layer", "use_post_layernorm", "include_class_token")


def flamingo_from_pretrained(lm_path: str | pathlib.Path, vision_path: str | pathlib.Path,
                             config: ml_collections.ConfigDict, *, seed: int = 0):
  """A ``Flamingo`` whose LM and vision tower are read from local Hugging Face folders (the LM
  may also be a llama.cpp ``.gguf`` file).

  The towers' shapes come from the folders' config.json (replacing ``config.lm`` and
  ``config.vision``; the choices a checkpoint does not fix — feature layer, post-LayerNorm, class
  token — are kept from ``config.vision``); the resampler, gated blocks and added-token rows are
  freshly initialised from ``seed``. Returns ``(model, config)`` with the config actually used.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.lm = read_lm_config(lm_path)
  choices = {k: config.vision[k] for k in _VISION_CHOICES}
  config.vision = vision_config_from_hf(read_config(vision_path),
                                        **read_image_normalisation(vision_path), **choices)
  model = Flamingo(config, rngs=nnx.Rngs(seed))
  load_hf_lm_weights(model.lm, lm_path)
  load_hf_vision_weights(model.vision, vision_path)
  return model, config
