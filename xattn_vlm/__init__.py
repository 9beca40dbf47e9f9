"""xattn_vlm: Flamingo-style vision-language models in JAX / Flax NNX.

``xattn_vlm.from_pretrained(path)`` returns (model, processor, tokenizer) for a converted or
published checkpoint (``xattn_vlm.inference.from_pretrained``); it is imported on first use, so
``import xattn_vlm`` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name):
  if name == "from_pretrained":
    from xattn_vlm.inference import loading  # pylint: disable=import-outside-toplevel
    return loading.from_pretrained
  raise AttributeError(f"module 'xattn_vlm' has no attribute {name!r}")
