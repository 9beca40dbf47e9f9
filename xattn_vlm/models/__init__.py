"""Models: the decoder LM, the vision tower, the Perceiver resampler, gated cross-attention, their
composition (Flamingo), the loaders of pretrained weights from local Hugging Face folders and
llama.cpp GGUF files, and the importers of published Flamingo-family checkpoints (OpenFlamingo,
IDEFICS)."""

from xattn_vlm.models.config import get_model_config
from xattn_vlm.models.convert import (flamingo_from_pretrained, load_hf_lm, load_hf_lm_weights,
                                      load_hf_vision, lm_config_from_hf, vision_config_from_hf)
from xattn_vlm.models.flamingo import Flamingo, FlamingoCache, frozen, trainable
from xattn_vlm.models.gguf_file import lm_config_from_gguf
from xattn_vlm.models.lm import DecoderLM, LMCache
from xattn_vlm.models.pretrained import idefics_config_from_hf, load_idefics, load_openflamingo
from xattn_vlm.models.resampler import PerceiverResampler
from xattn_vlm.models.vision import VisionEncoder

__all__ = ["DecoderLM", "Flamingo", "FlamingoCache", "LMCache", "PerceiverResampler",
           "VisionEncoder", "flamingo_from_pretrained", "frozen", "get_model_config",
           "idefics_config_from_hf", "lm_config_from_gguf", "lm_config_from_hf", "load_hf_lm",
           "load_hf_lm_weights", "load_hf_vision", "load_idefics", "load_openflamingo", "trainable",
           "vision_config_from_hf"]
