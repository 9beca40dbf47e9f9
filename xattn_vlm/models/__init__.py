"""Model parts: the decoder LM, the vision tower, the Perceiver resampler, and their pretrained-weight
loaders."""

from xattn_vlm.models.convert import (load_hf_lm, load_hf_lm_weights, load_hf_vision,
                                      lm_config_from_hf, vision_config_from_hf)
from xattn_vlm.models.lm import DecoderLM, LMCache
from xattn_vlm.models.resampler import PerceiverResampler
from xattn_vlm.models.vision import VisionEncoder

__all__ = ["DecoderLM", "LMCache", "PerceiverResampler", "VisionEncoder", "lm_config_from_hf",
           "load_hf_lm", "load_hf_lm_weights", "load_hf_vision", "vision_config_from_hf"]
