"""Pretrained weights from local Hugging Face folders (config.json + *.safetensors) into NNX modules.

Safetensors are read directly (no torch at run time), one tensor at a time, from a single
``model.safetensors`` or from shards listed in ``model.safetensors.index.json``. Every assignment
checks the shape and names the tensor when it does not fit.
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

from xattn_vlm.models.config import vision_config
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


class Checkpoint:
  """The tensors of a local safetensors checkpoint, read lazily by name."""

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

  def keys(self) -> Iterator[str]:
    return iter(self._files)

  def __contains__(self, name: str) -> bool:
    return name in self._files

  def get(self, name: str) -> jax.Array:
    if name not in self._files:
      raise KeyError(f"tensor {name!r} not found in checkpoint {str(self.path)!r}")
    with safe_open(self._files[name], framework="flax") as f:
      return f.get_tensor(name)


def assign(variable: nnx.Variable, value, name: str) -> None:
  """Writes ``value`` into ``variable`` (cast to its dtype) after checking the shape."""
  value = jnp.asarray(value)
  target = variable[...]
  if value.shape != target.shape:
    raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(value.shape)}, "
                     f"model expects {tuple(target.shape)}")
  variable[...] = value.astype(target.dtype)


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


def _checked(ckpt: Checkpoint, name: str, expected: tuple[int, ...]) -> jax.Array:
  """Tensor ``name`` after checking its shape as stored in the checkpoint."""
  value = ckpt.get(name)
  if tuple(value.shape) != tuple(expected):
    raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(value.shape)}, "
                     f"model expects {tuple(expected)} (in the checkpoint's layout)")
  return value


def _load_linear(dense, ckpt: Checkpoint, name: str) -> None:
  """torch ``Linear`` (weight ``[out, in]``) into our ``Dense`` (kernel ``[*in, *out]``)."""
  n_in, n_out = math.prod(dense.in_features), math.prod(dense.out_features)
  weight = _checked(ckpt, f"{name}.weight", (n_out, n_in))
  assign(dense.kernel, weight.T.reshape(dense.kernel.shape), f"{name}.weight")
  if dense.bias is not None:
    bias = _checked(ckpt, f"{name}.bias", (n_out,))
    assign(dense.bias, bias.reshape(dense.bias.shape), f"{name}.bias")


def _load_layer_norm(norm, ckpt: Checkpoint, name: str) -> None:
  assign(norm.scale, ckpt.get(f"{name}.weight"), f"{name}.weight")
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
  fields = _hf_vision_fields(hf_config)
  _check_vision_architecture(encoder, fields, path)
  ckpt = Checkpoint(path)
  prefixed = "vision_model.embeddings.class_embedding" in ckpt
  if hf_config["model_type"] == "clip" and not prefixed:
    raise KeyError(f"tensor 'vision_model.embeddings.class_embedding' not found in checkpoint "
                   f"{str(path)!r}: a CLIPModel folder must hold its vision tower as vision_model.*")
  prefix = "vision_model." if prefixed else ""

  width, p, c = fields["hidden_size"], encoder.patch_size, encoder.num_channels
  conv = _checked(ckpt, f"{prefix}embeddings.patch_embedding.weight", (width, c, p, p))
  # torch Conv2d weight [out, in, kh, kw] -> our patch kernel [kh, kw, in, out].
  assign(encoder.patch_embedding.kernel, conv.transpose(2, 3, 1, 0),
         f"{prefix}embeddings.patch_embedding.weight")
  assign(encoder.class_embedding, ckpt.get(f"{prefix}embeddings.class_embedding"),
         f"{prefix}embeddings.class_embedding")
  assign(encoder.position_embedding, ckpt.get(f"{prefix}embeddings.position_embedding.weight"),
         f"{prefix}embeddings.position_embedding.weight")
  _load_layer_norm(encoder.pre_layrnorm, ckpt, f"{prefix}pre_layrnorm")
  for i, block in enumerate(encoder.layers):
    name = f"{prefix}encoder.layers.{i}"
    _load_layer_norm(block.layer_norm1, ckpt, f"{name}.layer_norm1")
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
      _load_linear(getattr(block.self_attn, proj), ckpt, f"{name}.self_attn.{proj}")
    _load_layer_norm(block.layer_norm2, ckpt, f"{name}.layer_norm2")
    _load_linear(block.mlp.up, ckpt, f"{name}.mlp.fc1")
    _load_linear(block.mlp.down, ckpt, f"{name}.mlp.fc2")
  if encoder.post_layernorm is not None:
    _load_layer_norm(encoder.post_layernorm, ckpt, f"{prefix}post_layernorm")
