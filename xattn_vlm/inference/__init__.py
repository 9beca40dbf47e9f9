"""Inference: prompts of interleaved text and images -> batches, compiled generation, scoring of
continuations; published models in one call (``from_pretrained``). Knows the models, the data
package and run checkpoints (``xattn_vlm.checkpoint``), never train or eval."""

from xattn_vlm.inference.decoding import (Generation, GenerationConfig, GenerationOutput, generate,
                                          generate_tokens)
from xattn_vlm.inference.loading import from_pretrained, import_idefics, import_openflamingo
from xattn_vlm.inference.model import InferenceModel
from xattn_vlm.inference.processor import Batch, Processor
from xattn_vlm.inference.scoring import Scores, score
from xattn_vlm.inference.training_free import (MagicConfig, greedy_text, magic_generate,
                                               magic_tokens, socratic_answer, socratic_prompt)

__all__ = ["Batch", "Generation", "GenerationConfig", "GenerationOutput", "InferenceModel",
           "MagicConfig", "Processor", "Scores", "from_pretrained", "generate", "generate_tokens",
           "greedy_text", "import_idefics", "import_openflamingo", "magic_generate",
           "magic_tokens", "score", "socratic_answer", "socratic_prompt"]
