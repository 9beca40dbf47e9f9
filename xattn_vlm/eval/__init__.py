"""Few-shot evaluation: benchmark metrics, prompt templates, demonstration selection and results.

Nothing here depends on ``xattn_vlm.train``: an evaluation needs a model and data, not a trainer.
"""
