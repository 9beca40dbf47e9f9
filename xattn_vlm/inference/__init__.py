"""Inference: prompts of interleaved text and images -> batches, compiled generation, scoring of
continuations. Knows the models and the data package, never train or eval."""

from xattn_vlm.inference.decoding import (Generation, GenerationConfig, GenerationOutput, generate,
                                          generate_tokens)
from xattn_vlm.inference.model import InferenceModel
from xattn_vlm.inference.processor import Batch, Processor
from xattn_vlm.inference.scoring import Scores, score

__all__ = ["Batch", "Generation", "GenerationConfig", "GenerationOutput", "InferenceModel",
           "Processor", "Scores", "generate", "generate_tokens", "score"]
