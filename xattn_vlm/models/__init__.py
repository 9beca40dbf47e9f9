"""Model parts: the vision tower, the Perceiver resampler, and their pretrained-weight loaders."""

from xattn_vlm.models.convert import load_hf_vision, vision_config_from_hf
from xattn_vlm.models.resampler import PerceiverResampler
from xattn_vlm.models.vision import VisionEncoder

__all__ = ["PerceiverResampler", "VisionEncoder", "load_hf_vision", "vision_config_from_hf"]
