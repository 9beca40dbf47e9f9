"""Inference: prompts of interleaved text and images -> batches, compiled generation, scoring of
continuations; published models in one call (``from_pretrained``). Knows the models, the data
package and run checkpoints (``xattn_vlm.checkpoint``), never train or eval."""

from xattn_vlm.inference.decoding import (Generation, GenerationConfig, GenerationOutput, generate,
                                          generate_tokens)
from xattn_vlm.inference.loading import from_pretrained, import_idefics, import_openflamingo
from xattn_vlm.inference.model import InferenceModel
from xattn_vlm.inference.processor import Batch, Processor
from xattn_vlm.inference.scoring import Scores, score

__all__ = ["Batch", "Generation", "GenerationConfig", "GenerationOutput", "InferenceModel",
           "Processor", "Scores", "from_pretrained", "generate", "generate_tokens",
           "import_idefics", "import_openflamingo", "score"]
