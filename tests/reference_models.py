"""Tiny reference models of the published Flamingo-family checkpoints, built offline in torch.

Each builder makes a tiny random model with the reference code (open_flamingo 2.0.1 over tiny
transformers LMs and a tiny CLIP tower, or transformers' IDEFICS), saves it exactly in the layout
the published files have, and returns the saved paths with the reference torch model. The
importer tests use them, and so can later tests (conversion CLI, evaluation fidelity).

What the published files hold, and so what these builders reproduce (see CHECKPOINTS.md):
  * OpenFlamingo ``checkpoint.pt``: OpenFlamingo's own ``filter_state_dict_to_trainable`` of the
    whole model (perceiver, gated blocks, every parameter whose name holds "embed"), so no LM or
    vision weights; the base LM folder is the LM as published, before OpenFlamingo added
    ``<|endofchunk|>``, ``<image>`` and ``<PAD>`` (ids base+0, +1, +2) and resized its table to
    base+3, which shrinks a table padded beyond the tokenizer (MPT's and GPT-NeoX's 50432 rows).
  * IDEFICS: ``save_pretrained`` of ``IdeficsForVisionText2Text``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import types

import numpy as np
import safetensors.torch
import torch
import transformers

TOKENIZER_VOCAB = 64  # the tokenizer's own vocabulary: the LM vocabulary once imported
PADDED_VOCAB = 72  # MPT's and GPT-NeoX's tables are padded beyond the tokenizer
WIDTH, HEADS, LAYERS = 32, 4, 4
OPENFLAMINGO_LAYERS = 2  # LM blocks of the OpenFlamingo references (compile time is the cost)
PERCEIVER_DEPTH = 2  # OpenFlamingo's own PerceiverResampler class, shallower than its default 6
IMAGE_SIZE, PATCH = 16, 8  # 4 patches per image
VISION_WIDTH = 24
EOC, MEDIA, PAD = TOKENIZER_VOCAB, TOKENIZER_VOCAB + 1, TOKENIZER_VOCAB + 2  # OpenFlamingo's ids

# OpenFlamingo variant -> (LM kind, cross_attn_every_n_layers, vision features with the class token)
OPENFLAMINGO_VARIANTS = {
    "v1_llama": ("llama", 2, True),  # 9B-deprecated: LLaMA, HF CLIP last_hidden_state
    "mpt1b": ("mosaic_gpt", 1, False),  # 3B: MPT-1B, MosaicGPT code with full-width q/k LayerNorm
    "mpt7b": ("mpt", 2, False),  # 9B: MPT-7B, native MPT names
    "rpj3b": ("gpt_neox", 2, False),  # 4B: RedPajama-INCITE-3B (GPT-NeoX)
}


@dataclasses.dataclass
class Reference:
  """A saved reference model.

  model: the torch model in eval mode (OpenFlamingo's ``Flamingo``, ``IdeficsForVisionText2Text``).
  checkpoint: OpenFlamingo's ``checkpoint.pt``, or the IDEFICS folder.
  lm, vision: the base LM and CLIP folders (OpenFlamingo only).
  media_token_id, eoc_token_id: the model's ids (eoc None for IDEFICS).
  """
  model: torch.nn.Module
  checkpoint: pathlib.Path
  lm: pathlib.Path | None = None
  vision: pathlib.Path | None = None
  media_token_id: int = MEDIA
  eoc_token_id: int | None = EOC


def import_open_flamingo():
  """open_flamingo's modules, importable without open_clip (its package ``__init__`` imports it
  and open_clip needs torchvision) or wandb (its train_utils import it for logging only)."""
  stubs = [name for name in ("open_clip", "wandb") if name not in sys.modules]
  for name in stubs:
    sys.modules[name] = types.ModuleType(name)
  try:
    # pylint: disable=import-outside-toplevel
    from open_flamingo.src import flamingo, flamingo_lm, helpers, utils
    from open_flamingo.train import train_utils
  finally:
    # Left in place, the stubs would tell transformers these packages are installed.
    for name in stubs:
      del sys.modules[name]
  return types.SimpleNamespace(
      Flamingo=flamingo.Flamingo, FlamingoLMMixin=flamingo_lm.FlamingoLMMixin,
      PerceiverResampler=helpers.PerceiverResampler, extend_instance=utils.extend_instance,
      filter_state_dict_to_trainable=train_utils.filter_state_dict_to_trainable)


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
  """Weights large enough that logits differ clearly (HF's init makes them all near zero); norm
  scales near 1, biases near 0, so every tensor's mapping shows in the output."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if p.ndim > 1:
        p.copy_(noise * scale)
      elif name.endswith("bias"):
        p.copy_(noise * 0.1)
      else:
        p.copy_(1.0 + noise * 0.1)


class _QKLayerNormWqkv(torch.nn.Module):
  """MosaicGPT's ``attn_qk_ln`` inside a native MPT block: its fused ``Wqkv`` followed by a
  LayerNorm over the whole d_model of q and of k (no bias, as ``no_bias`` removes them), before
  the heads are split. MosaicGPT's code is not on pip; this is that one operation."""

  def __init__(self, wqkv: torch.nn.Linear, d_model: int):
    super().__init__()
    self.wqkv = wqkv
    self.q_ln = torch.nn.LayerNorm(d_model, bias=False)
    self.k_ln = torch.nn.LayerNorm(d_model, bias=False)

  def forward(self, x):
    q, k, v = self.wqkv(x).chunk(3, dim=-1)
    return torch.cat([self.q_ln(q), self.k_ln(k), v], dim=-1)


def _mosaic_gpt_state(lm) -> dict[str, torch.Tensor]:
  """The MPT LM's weights under MosaicGPT's names (mosaicml/examples v0.0.4)."""
  state = {"transformer.wte.weight": lm.transformer.wte.weight,
           "transformer.ln_f.weight": lm.transformer.norm_f.weight}
  for i, block in enumerate(lm.transformer.blocks):
    name = f"transformer.blocks.{i}"
    state.update({
        f"{name}.ln_1.weight": block.norm_1.weight,
        f"{name}.attn.Wqkv.weight": block.attn.Wqkv.wqkv.weight,
        f"{name}.attn.q_ln.weight": block.attn.Wqkv.q_ln.weight,
        f"{name}.attn.k_ln.weight": block.attn.Wqkv.k_ln.weight,
        f"{name}.attn.out_proj.weight": block.attn.out_proj.weight,
        f"{name}.ln_2.weight": block.norm_2.weight,
        f"{name}.mlp.mlp_up.weight": block.ffn.up_proj.weight,
        f"{name}.mlp.mlp_down.weight": block.ffn.down_proj.weight,
    })
  return {k: v.detach().contiguous() for k, v in state.items()}


MOSAIC_GPT_CONFIG = dict(
    model_type="mosaic_gpt", architectures=["MosaicGPT"], d_model=WIDTH, n_heads=HEADS,
    n_layers=LAYERS, mlp_ratio=4, max_seq_len=64, vocab_size=PADDED_VOCAB, attn_impl="torch",
    attn_qk_ln=True, attn_clip_qkv=None, softmax_scale=None, alibi=True, alibi_bias_max=8,
    no_bias=True, low_precision_layernorm=True, prefix_lm=False, attn_uses_sequence_id=False,
    emb_init_std=None, init_std=0.02, resid_pdrop=0.0, emb_pdrop=0.0, attn_pdrop=0.0,
    tokenizer_name="EleutherAI/gpt-neox-20b")


def tiny_lm(kind: str, folder: pathlib.Path, seed: int = 0, layers: int = LAYERS):
  """A tiny random base LM of ``kind`` (llama, mpt, mosaic_gpt, gpt_neox) saved in ``folder`` as
  the published base LM is (un-resized). Returns the torch LM."""
  if kind == "llama":
    config = transformers.LlamaConfig(
        vocab_size=TOKENIZER_VOCAB, hidden_size=WIDTH, intermediate_size=48,
        num_hidden_layers=layers, num_attention_heads=HEADS, max_position_embeddings=64,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    lm = transformers.LlamaForCausalLM(config)
  elif kind in ("mpt", "mosaic_gpt"):
    config = transformers.MptConfig(d_model=WIDTH, n_heads=HEADS, n_layers=layers, max_seq_len=64,
                                    vocab_size=PADDED_VOCAB, eos_token_id=0)
    lm = transformers.MptForCausalLM(config)
  elif kind == "gpt_neox":
    # RedPajama-INCITE-3B's architecture: full rotary, sequential residual, untied head.
    config = transformers.GPTNeoXConfig(
        vocab_size=PADDED_VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
        num_hidden_layers=layers, num_attention_heads=HEADS, max_position_embeddings=64,
        rotary_pct=1.0, use_parallel_residual=False, eos_token_id=0)
    lm = transformers.GPTNeoXForCausalLM(config)
  else:
    raise ValueError(f"unknown LM kind {kind!r}")
  config._attn_implementation = "eager"
  if kind == "mosaic_gpt":
    for block in lm.transformer.blocks:
      block.attn.Wqkv = _QKLayerNormWqkv(block.attn.Wqkv, WIDTH)
  _randomise(lm, seed)
  lm.eval()
  folder.mkdir(parents=True, exist_ok=True)
  if kind == "mosaic_gpt":
    safetensors.torch.save_file(_mosaic_gpt_state(lm), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**MOSAIC_GPT_CONFIG, "n_layers": layers}))
  else:
    lm.save_pretrained(folder)
  return lm


def tiny_clip(folder: pathlib.Path, seed: int = 1) -> transformers.CLIPVisionModel:
  """A tiny random HF CLIP vision tower (quick GELU, as ViT-L/14 openai) saved in ``folder``."""
  config = transformers.CLIPVisionConfig(
      hidden_size=VISION_WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      image_size=IMAGE_SIZE, patch_size=PATCH)
  config._attn_implementation = "eager"
  model = transformers.CLIPVisionModel(config)
  _randomise(model, seed)
  model.eval()
  model.save_pretrained(folder)
  return model


class _OpenClipVisual(torch.nn.Module):
  """What OpenFlamingo's ``vision_encoder.visual`` returns, from a HF CLIP tower: v2 (open_clip
  <= 2.22) ``(pooled, tokens)`` with the patch tokens before ``ln_post`` and no class token; v1
  HF ``last_hidden_state`` (class token included, before the post LayerNorm)."""

  def __init__(self, clip: transformers.CLIPVisionModel, with_class_token: bool):
    super().__init__()
    self.clip = clip
    self.with_class_token = with_class_token

  def forward(self, pixels):
    hidden = self.clip(pixel_values=pixels).last_hidden_state
    return hidden[:, 0], (hidden if self.with_class_token else hidden[:, 1:])


def _vision_encoder(clip, with_class_token: bool) -> types.SimpleNamespace:
  """OpenFlamingo's ``Flamingo`` keeps only ``vision_encoder.visual`` of the open_clip model."""
  return types.SimpleNamespace(visual=_OpenClipVisual(clip, with_class_token))


def _gated_layers(lang_encoder):
  return [(i, layer.gated_cross_attn_layer)
          for i, layer in enumerate(lang_encoder._get_decoder_layers())
          if layer.gated_cross_attn_layer is not None]


def openflamingo(variant: str, folder: pathlib.Path, seed: int = 0) -> Reference:
  """A tiny OpenFlamingo model of ``variant`` (``OPENFLAMINGO_VARIANTS``), saved as the published
  files are: ``checkpoint.pt``, the base LM folder and the CLIP folder."""
  of = import_open_flamingo()
  kind, every_n, with_class_token = OPENFLAMINGO_VARIANTS[variant]
  folder = pathlib.Path(folder)
  lm = tiny_lm(kind, folder / "lm", seed, layers=OPENFLAMINGO_LAYERS)
  clip = tiny_clip(folder / "clip", seed + 1)

  of.extend_instance(lm, of.FlamingoLMMixin)
  attr = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers"}.get(kind, "transformer.blocks")
  lm.set_decoder_layers_attr_name(attr)
  torch.manual_seed(seed)
  lm.resize_token_embeddings(TOKENIZER_VOCAB + 3)  # <|endofchunk|>, <image>, <PAD>
  model = of.Flamingo(_vision_encoder(clip, with_class_token), lm, EOC, MEDIA, vis_dim=VISION_WIDTH,
                      cross_attn_every_n_layers=every_n)
  model.perceiver = of.PerceiverResampler(dim=VISION_WIDTH, depth=PERCEIVER_DEPTH)
  _randomise(model.perceiver, seed + 2, scale=0.3)
  for i, block in _gated_layers(model.lang_encoder):
    _randomise(block, seed + 3 + i, scale=0.3)
    with torch.no_grad():  # open gates: the blocks must matter
      block.attn_gate.fill_(0.5 + 0.1 * i)
      block.ff_gate.fill_(-0.4 + 0.1 * i)
  with torch.no_grad():  # the new tokens' rows as training leaves them: unlike any old row
    generator = torch.Generator().manual_seed(seed + 50)
    for table in {lm.get_input_embeddings().weight, lm.get_output_embeddings().weight}:
      new_rows = table[TOKENIZER_VOCAB:]
      new_rows.copy_(0.2 * torch.randn(new_rows.shape, generator=generator))
  model.eval()

  # OpenFlamingo's training setup, then its own filter, as train/train.py saves a checkpoint.
  model.requires_grad_(False)
  model.perceiver.requires_grad_(True)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
  model.lang_encoder.get_input_embeddings().requires_grad_(True)
  state = of.filter_state_dict_to_trainable(model, model.state_dict())
  if kind in ("mpt", "mosaic_gpt"):
    # transformers' native MPT aliases the tied head as lm_head; MosaicGPT's and MPT-7B's own code
    # have no such module, so the published files do not hold it.
    del state["lang_encoder.lm_head.weight"]
  if kind == "gpt_neox":
    # transformers 4 named the head embed_out, which the filter keeps ("embed" in its name).
    state["lang_encoder.embed_out.weight"] = lm.get_output_embeddings().weight
  if variant == "v1_llama":
    # v1's filter kept the gated blocks twice (lang_encoder.gated_cross_attn_layers.*, shared
    # storage), and resumable checkpoints wrap the state as model_state_dict with DDP's module.
    for i, block in _gated_layers(model.lang_encoder):
      for name, tensor in block.state_dict().items():
        state[f"lang_encoder.gated_cross_attn_layers.{i}.{name}"] = tensor
    state = {"model_state_dict": {f"module.{k}": v for k, v in state.items()}}
  checkpoint = folder / "checkpoint.pt"
  torch.save(state, checkpoint)
  return Reference(model=model, checkpoint=checkpoint, lm=folder / "lm", vision=folder / "clip")


def openflamingo_inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """An interleaved 2-image batch: left padding, text before the first image, and a row with one
  image. ids [2, 14]; images [2, 2, 1, 3, H, W] (torch layout), row 1's second slot empty."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, TOKENIZER_VOCAB, (2, 14))
  ids[0, [2, 8]] = MEDIA
  ids[0, 7] = EOC
  ids[1, :4] = 0  # left padding
  ids[1, [4, 9]] = [MEDIA, EOC]
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  images = rng.standard_normal((2, 2, 1, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
  images[1, 1] = 0.0
  return dict(input_ids=ids, attention_mask=mask, images=images)


IDEFICS_FAKE, IDEFICS_IMAGE, IDEFICS_EOS = TOKENIZER_VOCAB, TOKENIZER_VOCAB + 1, 2


def idefics(folder: pathlib.Path, seed: int = 0) -> Reference:
  """A tiny random ``IdeficsForVisionText2Text`` (q/k norms in the resampler and the gated blocks,
  a gated block every 2nd layer, 2 additional vocabulary rows) saved with ``save_pretrained``."""
  config = transformers.IdeficsConfig(
      vocab_size=TOKENIZER_VOCAB, additional_vocab_size=2, hidden_size=WIDTH, intermediate_size=48,
      num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=64,
      rms_norm_eps=1e-6, cross_layer_interval=2, qk_layer_norms=True, use_resampler=True,
      # alpha_initializer="normal" raises a TypeError in transformers 5.24; the gates are set below.
      alpha_initializer="zeros", freeze_text_layers=False, freeze_lm_head=False,
      freeze_vision_layers=False, pad_token_id=0, bos_token_id=1, eos_token_id=IDEFICS_EOS,
      vision_config=dict(embed_dim=VISION_WIDTH, image_size=IMAGE_SIZE, patch_size=PATCH,
                         intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                         hidden_act="gelu"),
      perceiver_config=dict(use_resampler=True, resampler_n_latents=4, resampler_depth=2,
                            resampler_n_heads=2, resampler_head_dim=8,
                            qk_layer_norms_perceiver=True))
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.IdeficsForVisionText2Text(config)
  _randomise(model, seed)
  with torch.no_grad():
    for i, layer in enumerate(model.model.gated_cross_attn_layers):
      layer.alpha_cross_attn.fill_(0.6 - 0.1 * i)
      layer.alpha_dense.fill_(0.3 + 0.1 * i)
  model.eval()
  folder = pathlib.Path(folder)
  model.save_pretrained(folder)
  return Reference(model=model, checkpoint=folder, media_token_id=IDEFICS_IMAGE, eoc_token_id=None)


def idefics_inputs(seed: int = 0) -> dict[str, np.ndarray]:
  """IDEFICS prompts as its processor lays them out (BOS, ``<fake><image><fake>`` per image), with
  text after ``</s>`` (which sees no image until the next one): row 0 ends there, row 1 (left
  padded) goes on to a second image. ids [2, 16]; images [2, 2, 3, H, W]."""
  rng = np.random.default_rng(seed)
  f, im, eos = IDEFICS_FAKE, IDEFICS_IMAGE, IDEFICS_EOS
  ids = np.array([[1, 7, f, im, f, 9, 10, eos, 11, 12, f, im, f, 13, eos, 14],
                  [0, 0, 0, 1, f, im, f, 20, 21, eos, 22, 23, f, im, f, 24]])
  mask = np.ones_like(ids)
  mask[1, :3] = 0
  images = rng.standard_normal((2, 2, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
  return dict(input_ids=ids, attention_mask=mask, images=images)


def idefics_image_attention_mask(input_ids: np.ndarray, num_images: int) -> torch.Tensor:
  """IDEFICS's processor rule (``processing_idefics.py``) for ``input_ids``: [B, L, num_images]."""
  # pylint: disable-next=import-outside-toplevel
  from transformers.models.idefics import processing_idefics
  tokenizer = types.SimpleNamespace(convert_tokens_to_ids=lambda token: IDEFICS_IMAGE,
                                    eos_token_id=IDEFICS_EOS)
  incremental, _ = processing_idefics.image_attention_mask_for_packed_input_ids(
      torch.from_numpy(input_ids).long(), tokenizer, "pt")
  return processing_idefics.incremental_to_binary_attention_mask(incremental, "pt", num_images)
