"""Published Flamingo-family checkpoints -> ``Flamingo``: OpenFlamingo (v1 and v2) and IDEFICS.

``load_openflamingo`` reads OpenFlamingo's ``checkpoint.pt`` (the perceiver, the gated blocks and
the embedding tables its training kept: a torch pickle, read through torch memory-mapped so a 9B
file streams tensor by tensor), the base LM's Hugging Face folder and the CLIP folder.
``load_idefics`` reads an IDEFICS folder (sharded safetensors) that holds everything.

Both build the model abstractly and write every parameter once, so nothing larger than the
weights is ever held. Both fail naming every tensor they did not map and every parameter they did
not fill, and ``assign`` names any tensor of the wrong shape: a partial import never passes
silently (OpenFlamingo's own release-day loader did, issue #210).

OpenFlamingo added ``<|endofchunk|>``, ``<image>`` and ``<PAD>`` after the tokenizer's vocabulary
and resized the LM's tables to that; the import cuts the LM vocabulary back to the tokenizer's
(``config.lm.vocab_size``), moves the rows of the added tokens to ``added_embed`` / ``added_head``
and drops ``<PAD>``, which no prompt or continuation needs.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import warnings

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from xattn_vlm import special_tokens
from xattn_vlm.models import convert
from xattn_vlm.models.config import (flamingo_config, resampler_config, vision_config,
                                     xattn_config)
from xattn_vlm.models.flamingo import Flamingo, gated_layer_indices

# -- reading checkpoint.pt ------------------------------------------------------------------------

# Where OpenFlamingo's FlamingoLMMixin finds the decoder layers (factory.py), by LM family.
OPENFLAMINGO_LAYERS = {"mpt": "transformer.blocks", "gpt_neox": "gpt_neox.layers",
                       "llama": "model.layers"}
# The LM's token table and untied head as OpenFlamingo's checkpoints name them (under
# ``lang_encoder.``): transformers 4 called GPT-NeoX's head embed_out, transformers 5 lm_head.
_OPENFLAMINGO_TABLES = {"mpt": ("transformer.wte.weight", ()),
                        "gpt_neox": ("gpt_neox.embed_in.weight",
                                     ("embed_out.weight", "lm_head.weight")),
                        "llama": ("model.embed_tokens.weight", ("lm_head.weight",))}
# Buffers that older Hugging Face files store beside the weights; they hold no parameter.
_LM_BUFFERS = re.compile(r"(\.attention\.(masked_)?bias|\.rotary_emb\.inv_freq)$")


def _as_numpy(tensor) -> np.ndarray:
  """A torch tensor as numpy without a copy; bfloat16 through its bits (numpy lacks the type)."""
  import torch  # pylint: disable=import-outside-toplevel
  tensor = tensor.detach()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(jnp.bfloat16)
  return tensor.numpy()


class TorchCheckpoint:
  """The tensors of a torch state dict by name, with the interface of ``convert.Checkpoint``
  (``keys``, ``in``, ``get``, ``unread``). ``get`` returns numpy arrays over the loaded (possibly
  memory-mapped) storage."""

  def __init__(self, tensors: dict, path: pathlib.Path):
    self._tensors = tensors
    self.path = path
    self.read: set[str] = set()

  def keys(self):
    return iter(self._tensors)

  def __contains__(self, name: str) -> bool:
    return name in self._tensors

  def get(self, name: str) -> np.ndarray:
    if name not in self._tensors:
      raise convert.MissingTensorError(name, self.path)
    self.read.add(name)
    return _as_numpy(self._tensors[name])

  def unread(self) -> list[str]:
    return sorted(set(self._tensors) - self.read)


def _torch_state(path: pathlib.Path) -> dict:
  """A torch state dict file, memory-mapped: name -> tensor (a resumable checkpoint's
  ``model_state_dict`` unwrapped)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f"reading {str(path)!r} (a torch pickle) needs torch: "
                      "pip install 'xattn_vlm[convert]'") from error
  state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
  if isinstance(state, dict) and "model_state_dict" in state:
    state = state["model_state_dict"]
  if not isinstance(state, dict):
    raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
  for name, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"entry {name!r} of {str(path)!r} is a {type(value).__name__}, not a tensor")
  return state


TORCH_WEIGHTS, TORCH_WEIGHTS_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def open_lm_checkpoint(path: str | pathlib.Path):
  """The tensors of a base LM folder: its safetensors (``convert.Checkpoint``) or, as the older
  published folders hold them (MPT-1B's, RedPajama's, many LLaMA conversions),
  ``pytorch_model.bin`` or its sharded index, read through torch memory-mapped."""
  folder = pathlib.Path(path)
  if any((folder / n).is_file() for n in (convert.SAFETENSORS, convert.SAFETENSORS_INDEX)):
    return convert.Checkpoint(folder)
  if (folder / TORCH_WEIGHTS_INDEX).is_file():
    shards = sorted(set(json.loads((folder / TORCH_WEIGHTS_INDEX).read_text())["weight_map"]
                        .values()))
  elif (folder / TORCH_WEIGHTS).is_file():
    shards = [TORCH_WEIGHTS]
  else:
    raise FileNotFoundError(f"no {convert.SAFETENSORS}, {convert.SAFETENSORS_INDEX}, "
                            f"{TORCH_WEIGHTS} or {TORCH_WEIGHTS_INDEX} in {str(folder)!r}")
  missing = [n for n in shards if not (folder / n).is_file()]
  if missing:
    raise FileNotFoundError(f"shards listed in {str(folder / TORCH_WEIGHTS_INDEX)!r} are "
                            f"missing: {missing}")
  tensors = {}
  for shard in shards:
    tensors.update(_torch_state(folder / shard))
  return TorchCheckpoint(tensors, folder)


def read_openflamingo_checkpoint(path: str | pathlib.Path, layers_attr: str) -> TorchCheckpoint:
  """OpenFlamingo's ``checkpoint.pt``, memory-mapped (``torch.load(mmap=True, weights_only=True)``).

  Unwraps what training runs add around the state dict: a ``model_state_dict`` entry (resumable
  checkpoints) and DDP's ``module.`` prefix. v1 files also hold every gated block a second time,
  as ``lang_encoder.gated_cross_attn_layers.<i>.*`` (the same storage): those copies must equal
  the block's own tensors (``lang_encoder.<layers_attr>.<i>.gated_cross_attn_layer.*``) and are
  then dropped.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"OpenFlamingo checkpoint {str(path)!r} does not exist")
  tensors = {name.removeprefix("module."): value for name, value in _torch_state(path).items()}
  import torch  # pylint: disable=import-outside-toplevel  # present: _torch_state needed it
  duplicate = re.compile(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.+)")
  for name in [n for n in tensors if duplicate.fullmatch(n)]:
    layer, rest = duplicate.fullmatch(name).groups()
    own = f"lang_encoder.{layers_attr}.{layer}.gated_cross_attn_layer.{rest}"
    copy = tensors.pop(name)
    if own not in tensors:
      tensors[own] = copy
    elif not torch.equal(tensors[own], copy):
      raise ValueError(f"{str(path)!r} holds {name!r} and {own!r} with different values: which "
                       "gated block to import is ambiguous")
  return TorchCheckpoint(tensors, path)


# -- the trained parts, in OpenFlamingo's names ---------------------------------------------------


def _load_openflamingo_perceiver(resampler, ckpt: TorchCheckpoint) -> None:
  """``perceiver.*``: latents, layers of (attention, feed-forward) and the final LayerNorm."""
  convert.assign(resampler.latents, ckpt.get("perceiver.latents"), "perceiver.latents")
  for i, layer in enumerate(resampler.layers):
    name = f"perceiver.layers.{i}"
    attn = layer.attn
    convert.load_norm(attn.norm_media, ckpt, f"{name}.0.norm_media")
    convert.load_norm(attn.norm_latents, ckpt, f"{name}.0.norm_latents")
    convert.load_linear(attn.to_q, ckpt, f"{name}.0.to_q")
    _load_kv(attn.to_k, attn.to_v, ckpt, f"{name}.0.to_kv")
    convert.load_linear(attn.to_out, ckpt, f"{name}.0.to_out")
    convert.load_norm(layer.ff.norm, ckpt, f"{name}.1.0")
    convert.load_linear(layer.ff.mlp.up, ckpt, f"{name}.1.1")
    convert.load_linear(layer.ff.mlp.down, ckpt, f"{name}.1.3")
  convert.load_norm(resampler.norm, ckpt, "perceiver.norm")


def _load_kv(key, value, ckpt, name: str) -> None:
  """A fused ``to_kv`` Linear: its output is k then v (``chunk(2)``), each heads x head_dim."""
  inner, width = math.prod(key.out_features), math.prod(key.in_features)
  weight = convert.checked_tensor(ckpt, f"{name}.weight", (2 * inner, width))
  for dense, rows in ((key, weight[:inner]), (value, weight[inner:])):
    convert.assign(dense.kernel, rows.T.reshape(dense.kernel.shape), f"{name}.weight")


def _load_gate(gate, ckpt, name: str) -> None:
  """A gate saved as a 1-element vector into our scalar."""
  convert.assign(gate, convert.checked_tensor(ckpt, name, (1,)).reshape(()), name)


def _load_openflamingo_block(block, ckpt: TorchCheckpoint, name: str) -> None:
  """One ``GatedCrossAttentionBlock``: ``attn.{norm, to_q, to_kv, to_out}``, ``ff.{0, 1, 3}``."""
  _load_gate(block.attn_gate, ckpt, f"{name}.attn_gate")
  _load_gate(block.ffw_gate, ckpt, f"{name}.ff_gate")
  convert.load_norm(block.attn.norm, ckpt, f"{name}.attn.norm")
  convert.load_linear(block.attn.query, ckpt, f"{name}.attn.to_q")
  _load_kv(block.attn.key, block.attn.value, ckpt, f"{name}.attn.to_kv")
  convert.load_linear(block.attn.out, ckpt, f"{name}.attn.to_out")
  convert.load_norm(block.ffw_norm, ckpt, f"{name}.ff.0")
  convert.load_linear(block.ffw.up, ckpt, f"{name}.ff.1")
  convert.load_linear(block.ffw.down, ckpt, f"{name}.ff.3")


def _checkpoint_gated_layers(ckpt: TorchCheckpoint, layers_attr: str) -> list[int]:
  pattern = re.compile(rf"lang_encoder\.{re.escape(layers_attr)}\.(\d+)\.gated_cross_attn_layer\.")
  return sorted({int(m.group(1)) for n in ckpt.keys() if (m := pattern.match(n))})


# -- the LM's vocabulary tables -------------------------------------------------------------------


def _assign_rows(variable: nnx.Variable, table, name: str, rows: int,
                 transpose: bool = False) -> None:
  """The first ``rows`` rows of a ``[vocab, D]`` table (a token table, or a head's torch weight)
  into ``variable``; ``transpose`` writes them as a ``[D, vocab]`` kernel."""
  if table.shape[0] < rows:
    raise ValueError(f"tensor {name!r} has {table.shape[0]} rows, fewer than the model's "
                     f"lm.vocab_size={rows}")
  convert.assign(variable, table[:rows].T if transpose else table[:rows], name)


def _openflamingo_row(token: str, vocab: int) -> int:
  if token not in special_tokens.OPENFLAMINGO_ADDED_TOKENS:
    raise ValueError(f"added_tokens may hold only OpenFlamingo's "
                     f"{special_tokens.OPENFLAMINGO_ADDED_TOKENS} to import its checkpoint, got "
                     f"{token!r}")
  return vocab + special_tokens.OPENFLAMINGO_ADDED_TOKENS.index(token)


def _load_openflamingo_tables(model: Flamingo, ckpt: TorchCheckpoint, lm_ckpt,
                              embed_name: str, head_name: str | None) -> None:
  """The token table and head: the LM's rows (cut to ``lm.vocab_size``) and the added tokens'.

  Each table is the checkpoint's when it holds it (training may have moved every row, and only
  there do the new tokens' trained rows live) and the base LM's otherwise: a frozen table that
  OpenFlamingo did not save, which its resize kept (the first rows of a padded table) or grew.
  An added token's input row must exist; a head row the file never saved (v1 kept no head) is
  the mean of the LM's head rows, the same on every import (OpenFlamingo drew it at random on
  every load), with a warning.
  """
  cfg = model.config
  vocab = cfg.lm.vocab_size
  family = cfg.lm.family
  of_embed, of_heads = _OPENFLAMINGO_TABLES[family]
  if f"lang_encoder.{of_embed}" in ckpt:
    embed_source, embed = f"lang_encoder.{of_embed}", ckpt.get(f"lang_encoder.{of_embed}")
    # OpenFlamingo's tables have the tokenizer's ids, then eoc, image and <PAD> (when the
    # tokenizer had no pad token): any other size means lm.vocab_size is not the tokenizer's.
    if embed.shape[0] not in (vocab + 2, vocab + 3):
      raise ValueError(f"tensor {embed_source!r} has {embed.shape[0]} rows, but an OpenFlamingo "
                       f"table has the tokenizer's ids plus 2 or 3 (config lm.vocab_size={vocab}"
                       f" expects {vocab + 2} or {vocab + 3}): set lm.vocab_size to the "
                       "tokenizer's vocabulary")
  else:
    embed_source, embed = embed_name, lm_ckpt.get(embed_name)
  _assign_rows(model.lm.token_embed.embedding, embed, embed_source, vocab)

  if head_name is None:
    head_source, head = embed_source, embed
  else:
    saved = [f"lang_encoder.{n}" for n in of_heads if f"lang_encoder.{n}" in ckpt]
    head_source = saved[0] if saved else head_name
    head = ckpt.get(head_source) if saved else lm_ckpt.get(head_name)
    _assign_rows(model.lm.lm_head.kernel, head, head_source, vocab, transpose=True)

  embed_rows, head_rows, unsaved = [], [], []
  for token in cfg.added_tokens:
    row = _openflamingo_row(token, vocab)
    if row >= embed.shape[0]:
      raise ValueError(f"no input row for {token!r}: tensor {embed_source!r} has "
                       f"{embed.shape[0]} rows, OpenFlamingo's id for it is {row}")
    embed_rows.append(embed[row])
    if row < head.shape[0]:
      head_rows.append(head[row])
    else:
      unsaved.append(token)
      head_rows.append(np.asarray(head[:vocab], np.float32).mean(axis=0))
  if unsaved:
    warnings.warn(f"the output rows of {unsaved} were never saved ({head_source!r} has "
                  f"{head.shape[0]} rows; OpenFlamingo v1 did not save its head): they are set "
                  "to the mean of the LM's head rows, so their logits are typical ones",
                  stacklevel=4)
  convert.assign(model.added_embed.embedding, np.stack(embed_rows), f"rows of {embed_source!r}")
  convert.assign(model.added_head, np.stack(head_rows), f"rows of {head_source!r}")


# -- the importers --------------------------------------------------------------------------------


class _Parts:
  """Runs the loaders of a model's parts one by one. A part whose checkpoint lacks a tensor stops
  there and the others go on; ``missing`` collects the names, and the tensors under a stopped
  part's name prefix, which its loader never reached, are not taken for unmapped ones. So one
  error can name every missing tensor, every unmapped one and every unfilled parameter."""

  def __init__(self):
    self.missing: list[str] = []
    self._stopped: list[str] = []

  def load(self, prefix: str | None, loader, *args) -> None:
    """``loader(*args)``; ``prefix``: the names the part reads start with it (None: no name the
    unmapped-tensor check looks at)."""
    try:
      loader(*args)
    except convert.MissingTensorError as error:
      self.missing.append(error.name)
      if prefix is not None:
        self._stopped.append(prefix)

  def fail_on_gaps(self, model: nnx.Module, unread: dict[str, list[str]]) -> None:
    """One error naming every missing tensor, every tensor of each file (``unread``: file -> names
    nothing read) that maps to no parameter and every parameter left unfilled."""
    problems = [f"missing tensors: {self.missing}"] if self.missing else []
    for where, names in unread.items():
      unmapped = [n for n in names if not any(n.startswith(p) for p in self._stopped)]
      if unmapped:
        problems.append(f"tensors of {where} that map to no parameter: {unmapped}")
    unfilled = convert.unfilled_parameters(model)
    if unfilled:
      problems.append(f"parameters no tensor filled: {unfilled}")
    if problems:
      raise ValueError("the import is incomplete; " + "; ".join(problems))


def load_openflamingo(checkpoint: str | pathlib.Path, lm_path: str | pathlib.Path,
                      vision_path: str | pathlib.Path, config: ml_collections.ConfigDict
                      ) -> tuple[Flamingo, ml_collections.ConfigDict]:
  """An OpenFlamingo model as a ``Flamingo``.

  Args:
    checkpoint: OpenFlamingo's ``checkpoint.pt`` (v1 or v2).
    lm_path: the base LM's Hugging Face folder, as published (MPT, MosaicGPT, GPT-NeoX, LLaMA;
      safetensors, or ``pytorch_model.bin`` files: ``open_lm_checkpoint``).
    vision_path: the Hugging Face CLIP folder (ViT-L/14 ``openai``, the weights open_clip used).
    config: the model config whose choices the files do not fix: a preset such as
      ``openflamingo_3b()``. Kept from it: ``lm.vocab_size`` (the tokenizer's vocabulary, to which
      the LM's is cut), ``added_tokens``, the vision features taken (``include_class_token``,
      ``use_post_layernorm``, ``feature_layer``), the resampler, the gated blocks and the dtypes.
      The LM's and the tower's shapes come from their folders.

  Returns:
    ``(model, config)``, the config as used.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  lm_cfg = convert.lm_config_from_hf(convert.read_config(lm_path))
  if lm_cfg.family not in OPENFLAMINGO_LAYERS:
    raise ValueError(f"OpenFlamingo's LMs are {sorted(OPENFLAMINGO_LAYERS)} families; "
                     f"{str(lm_path)!r} holds a {lm_cfg.family!r} LM")
  lm_cfg.vocab_size = config.lm.vocab_size
  config.lm = lm_cfg
  choices = {k: config.vision[k] for k in ("feature_layer", "use_post_layernorm",
                                           "include_class_token")}
  config.vision = convert.vision_config_from_hf(
      convert.read_config(vision_path), **convert.read_image_normalisation(vision_path), **choices)
  layers_attr = OPENFLAMINGO_LAYERS[lm_cfg.family]
  ckpt = read_openflamingo_checkpoint(checkpoint, layers_attr)

  expected = gated_layer_indices(lm_cfg.num_layers, config.xattn.every_n_layers,
                                 config.xattn.offset)
  found = _checkpoint_gated_layers(ckpt, layers_attr)
  if found != expected:
    raise ValueError(f"{str(checkpoint)!r} has gated blocks before LM layers {found}, but "
                     f"xattn.every_n_layers={config.xattn.every_n_layers} (offset "
                     f"{config.xattn.offset}) places them before {expected}")

  model = nnx.eval_shape(lambda: Flamingo(config, rngs=nnx.Rngs(0)))
  lm_ckpt = open_lm_checkpoint(lm_path)
  parts = _Parts()
  embed_name, head_name = convert.lm_table_names(model.lm, lm_ckpt)
  lm_prefix = ".".join(embed_name.split(".")[:-2])  # transformer, gpt_neox, model, or none
  parts.load(f"{lm_prefix}." if lm_prefix else "", convert.load_hf_lm_blocks, model.lm, lm_ckpt)
  parts.load(None, _load_openflamingo_tables, model, ckpt, lm_ckpt, embed_name, head_name)
  parts.load("perceiver.", _load_openflamingo_perceiver, model.resampler, ckpt)
  for layer, block in zip(model.gated_layers, model.gated_blocks):
    name = f"lang_encoder.{layers_attr}.{layer}.gated_cross_attn_layer"
    parts.load(f"{name}.", _load_openflamingo_block, block, ckpt, name)
  parts.load(None, convert.load_hf_vision_weights, model.vision, vision_path)
  # The tables OpenFlamingo saved replace the base LM's, which are then read for nothing.
  lm_unread = [n for n in lm_ckpt.unread() if not _LM_BUFFERS.search(n)
               and n not in (embed_name, head_name)]
  parts.fail_on_gaps(model, {str(checkpoint): ckpt.unread(), str(lm_path): lm_unread})
  return model, config


# -- IDEFICS --------------------------------------------------------------------------------------

# IdeficsConfig's defaults: config.json omits fields that keep them.
_IDEFICS_DEFAULTS = dict(vocab_size=32000, additional_vocab_size=0, hidden_size=4096,
                         intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                         hidden_act="silu", rms_norm_eps=1e-6, max_position_embeddings=2048,
                         tie_word_embeddings=False, cross_layer_interval=1, qk_layer_norms=False,
                         use_resampler=False, alpha_type="float", eos_token_id=2)
_IDEFICS_VISION_DEFAULTS = dict(embed_dim=768, image_size=224, intermediate_size=5120,
                                patch_size=14, num_hidden_layers=32, num_attention_heads=16,
                                num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5)
_IDEFICS_PERCEIVER_DEFAULTS = dict(resampler_n_latents=64, resampler_depth=6, resampler_n_heads=16,
                                   resampler_head_dim=96, qk_layer_norms_perceiver=False)
# IDEFICS's tower has a post LayerNorm for its pooled output only; the features precede it.
_IDEFICS_UNUSED = ("model.vision_model.post_layernorm.weight",
                   "model.vision_model.post_layernorm.bias")


def idefics_config_from_hf(hf_config: dict, *, dtype: str = "float32",
                           param_dtype: str = "float32") -> ml_collections.ConfigDict:
  """Our Flamingo config from an IDEFICS ``config.json`` dict (``IdeficsForVisionText2Text``).

  The LM is LLaMA; the tower OpenCLIP in CLIP naming with the class token and no post LayerNorm;
  the resampler has per-head q/k LayerNorm when ``qk_layer_norms_perceiver``, a ReLU feed-forward
  of 4 x the tower's width; gated blocks sit before LM layers 0, n, 2n (n =
  ``cross_layer_interval``) with the LM's heads, RMSNorm, per-head q/k RMSNorm when
  ``qk_layer_norms`` and the LM's SwiGLU width; after ``</s>`` (``eos_token_id``) no image is seen
  until the next one.
  """
  if hf_config.get("model_type") != "idefics":
    raise ValueError(f"config.json model_type must be 'idefics', got "
                     f"{hf_config.get('model_type')!r}")
  fields = {**_IDEFICS_DEFAULTS, **hf_config}
  for key, supported in (("use_resampler", True), ("alpha_type", "float"),
                         ("additional_vocab_size", 2), ("tie_word_embeddings", False)):
    if fields[key] != supported:
      raise NotImplementedError(f"idefics config.json sets {key}={fields[key]!r}; only "
                                f"{supported!r} is supported (the published checkpoints')")
  lm = convert.lm_config_from_hf({**fields, "model_type": "llama"})
  vision = {**_IDEFICS_VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
  perceiver = {**_IDEFICS_PERCEIVER_DEFAULTS, **(hf_config.get("perceiver_config") or {})}
  every_n = fields["cross_layer_interval"]
  return flamingo_config(
      lm=lm,
      vision=vision_config(
          image_size=vision["image_size"], patch_size=vision["patch_size"],
          width=vision["embed_dim"], num_layers=vision["num_hidden_layers"],
          num_heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
          activation=vision["hidden_act"], norm_eps=vision["layer_norm_eps"],
          num_channels=vision["num_channels"], include_class_token=True,
          use_post_layernorm=False),
      resampler=resampler_config(
          depth=perceiver["resampler_depth"], num_latents=perceiver["resampler_n_latents"],
          num_heads=perceiver["resampler_n_heads"], head_dim=perceiver["resampler_head_dim"],
          ff_mult=4, activation="relu", max_num_media=None, max_num_frames=None,
          qk_norm=perceiver["qk_layer_norms_perceiver"]),
      xattn=xattn_config(
          every_n_layers=every_n, offset=every_n - 1, num_heads=lm.num_heads,
          head_dim=lm.head_dim, activation=lm.activation, norm="rmsnorm",
          norm_eps=lm.norm_eps, qk_norm=fields["qk_layer_norms"], ffw_dim=lm.mlp_dim,
          gated_ffw=True, document_end_token_id=fields["eos_token_id"]),
      added_tokens=special_tokens.IDEFICS_ADDED_TOKENS, dtype=dtype, param_dtype=param_dtype)


def _load_idefics_perceiver(resampler, ckpt, prefix: str) -> None:
  convert.assign(resampler.latents, ckpt.get(f"{prefix}.latents"), f"{prefix}.latents")
  for i, layer in enumerate(resampler.layers):
    name = f"{prefix}.blocks.{i}"
    attn = layer.attn
    convert.load_norm(attn.norm_media, ckpt, f"{name}.0.context_layer_norm")
    convert.load_norm(attn.norm_latents, ckpt, f"{name}.0.latents_layer_norm")
    for dense, proj in ((attn.to_q, "q_proj"), (attn.to_k, "k_proj"), (attn.to_v, "v_proj"),
                        (attn.to_out, "output_proj")):
      convert.load_linear(dense, ckpt, f"{name}.0.{proj}")
    if attn.q_norm is not None:
      convert.load_norm(attn.q_norm, ckpt, f"{name}.0.q_layer_norm")
      convert.load_norm(attn.k_norm, ckpt, f"{name}.0.k_layer_norm")
    convert.load_norm(layer.ff.norm, ckpt, f"{name}.1.ln")
    convert.load_linear(layer.ff.mlp.up, ckpt, f"{name}.1.fc")
    convert.load_linear(layer.ff.mlp.down, ckpt, f"{name}.1.c_proj")
  convert.load_norm(resampler.norm, ckpt, f"{prefix}.layer_norm")


def _load_idefics_block(block, ckpt, name: str) -> None:
  _load_gate(block.attn_gate, ckpt, f"{name}.alpha_cross_attn")
  _load_gate(block.ffw_gate, ckpt, f"{name}.alpha_dense")
  convert.load_norm(block.attn.norm, ckpt, f"{name}.input_layernorm")
  for dense, proj in ((block.attn.query, "q_proj"), (block.attn.key, "k_proj"),
                      (block.attn.value, "v_proj"), (block.attn.out, "o_proj")):
    convert.load_linear(dense, ckpt, f"{name}.cross_attn.{proj}")
  if block.attn.q_norm is not None:
    convert.load_norm(block.attn.q_norm, ckpt, f"{name}.cross_attn.q_layer_norm")
    convert.load_norm(block.attn.k_norm, ckpt, f"{name}.cross_attn.k_layer_norm")
  convert.load_norm(block.ffw_norm, ckpt, f"{name}.post_attention_layernorm")
  for dense, proj in ((block.ffw.gate, "gate_proj"), (block.ffw.up, "up_proj"),
                      (block.ffw.down, "down_proj")):
    convert.load_linear(dense, ckpt, f"{name}.mlp.{proj}")


def load_idefics(path: str | pathlib.Path, *, dtype: str = "float32",
                 param_dtype: str = "float32") -> tuple[Flamingo, ml_collections.ConfigDict]:
  """An IDEFICS model (``IdeficsForVisionText2Text`` saved by transformers: config.json and one
  or more safetensors files) as a ``Flamingo``. Returns ``(model, config)``."""
  hf_config = convert.read_config(path)
  config = idefics_config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
  normalisation = convert.read_image_normalisation(path)
  for key, value in normalisation.items():
    config.vision[key] = value
  ckpt = convert.Checkpoint(path)
  model = nnx.eval_shape(lambda: Flamingo(config, rngs=nnx.Rngs(0)))
  parts = _Parts()
  parts.load("model.layers.", convert.load_hf_lm_blocks, model.lm, ckpt)
  parts.load(None, convert.load_hf_lm_tables, model.lm, ckpt)
  for variable, name in ((model.added_embed.embedding,
                          "model.embed_tokens.additional_embedding.weight"),
                         (model.added_head, "lm_head.additional_fc.weight")):
    parts.load(None, lambda v, n: convert.assign(v, ckpt.get(n), n), variable, name)
  parts.load("model.vision_model.", convert.load_clip_vision, model.vision, ckpt,
             "model.vision_model.")
  parts.load("model.perceiver_resampler.", _load_idefics_perceiver, model.resampler, ckpt,
             "model.perceiver_resampler")
  for k, block in enumerate(model.gated_blocks):
    name = f"model.gated_cross_attn_layers.{k}"
    parts.load(f"{name}.", _load_idefics_block, block, ckpt, name)
  unread = [n for n in ckpt.unread() if n not in _IDEFICS_UNUSED and not _LM_BUFFERS.search(n)]
  parts.fail_on_gaps(model, {str(path): unread})
  return model, config
