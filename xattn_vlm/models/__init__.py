"""Models: the decoder LM, the vision tower, the Perceiver resampler, gated cross-attention, their
composition (Flamingo) and the loaders of pretrained weights from local Hugging Face folders (and
of decoder LMs from llama.cpp GGUF files)."""

from xattn_vlm.models.config import get_model_config
from xattn_vlm.models.convert import (flamingo_from_pretrained, load_hf_lm, load_hf_lm_weights,
                                      load_hf_vision, lm_config_from_hf, vision_config_from_hf)
from xattn_vlm.models.flamingo import Flamingo, FlamingoCache, frozen, trainable
from xattn_vlm.models.gguf_file import lm_config_from_gguf
from xattn_vlm.models.lm import DecoderLM, LMCache
from xattn_vlm.models.resampler import PerceiverResampler
from xattn_vlm.models.vision import VisionEncoder

__all__ = ["DecoderLM", "Flamingo", "FlamingoCache", "LMCache", "PerceiverResampler",
           "VisionEncoder", "lm_config_from_hf", "load_hf_lm", "load_hf_lm_weights", "load_hf_vision", "vision_config_from_hf",
           "flamingo_from_pretrained", "frozen", "get_model_config", "lm_config_from_gguf",
           "trainable"]
