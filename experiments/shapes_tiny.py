"""The miniature Flamingo recipe on the synthetic shapes world, end to end on a 2-core CPU.

COMMAND (from the repository root; the whole recipe, evaluation and report included):
  python -m xattn_vlm.recipe --config=experiments/shapes_tiny.py --workdir=runs/shapes_tiny
One stage alone (the recipe runs these into <workdir>/<stage>):
  python -m xattn_vlm.train --config=experiments/shapes_tiny.py:lm_pretrain \
      --workdir=runs/shapes_tiny/lm_pretrain
  python -m xattn_vlm.train --config=experiments/shapes_tiny.py:vision_pretrain \
      --workdir=runs/shapes_tiny/vision_pretrain
  python -m xattn_vlm.train --config=experiments/shapes_tiny.py:flamingo \
      --workdir=runs/shapes_tiny/flamingo

1. ``lm_pretrain``: a small LLaMA-style LM (RoPE) learns the world's text (captions,
   descriptions, QA, documents, binding in words), 8 texts per sequence so its whole context
   is trained.
2. ``vision_pretrain``: a small ViT learns image-caption alignment against a small causal text
   tower (CLIP's symmetric InfoNCE).
3. ``flamingo``: both towers are loaded from the runs above (``config.init.*_workdir``) and
   frozen; the resampler, gated cross-attention blocks and ``<image>``/``<|endofchunk|>`` rows
   train on interleaved documents (weight 1.0), VQA pairs (1.0), few-shot VQA episodes (0.5)
   and few-shot caption episodes (0.3) in the evaluation's own prompt format at its context
   length (``kind="fewshot_vqa"``/``"fewshot_caption"``: 0 to 8 demonstrations, the query's
   answer supervised alone), and fast-binding episodes with fresh made-up names (0.5). The VQA
   pairs supervise their answer alone (``supervise="answer"``), 128 short pairs a step: under
   the loss on every token, and at 32 pairs a step, the answers stayed at the per-type prior.
   Without the few-shot episodes both shot curves fell; with them in place of the documents the
   model went blind to its images (docs/results.md).
4. (recipe) 0/4/8-shot evaluation of shapes-world captioning, VQA and in-context binding with
   the Flamingo protocol, and a report (``xattn_vlm.recipe``).

Presets: ``recipe`` (default), ``smoke`` (the recipe in a minute or two, for the end-to-end
test), or one stage, optionally with ``steps=N`` (e.g. ``:flamingo,steps=20``). ``fusion`` and
``fusion_smoke``: the recipe's and the smoke recipe's settings with ``fusion_modes`` and
``training_free``, for the comparison of the fusion modes, trained and training-free
(docs/model.md, "Fusion modes"):
  python -m xattn_vlm.recipe.fusion --config=experiments/shapes_tiny.py:fusion \
      --workdir=runs/fusion_compare
"""

import ml_collections

from xattn_vlm.eval import runner
from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs

RUNS = "runs/shapes_tiny"
STEPS = {"lm_pretrain": 300, "vision_pretrain": 150, "flamingo": 500}
# The Flamingo stage's: at 1e-2 the attention gates stayed near 0 and one seed in three did not
# use its images; at 3e-3 every seed does (docs/results.md).
LEARNING_RATES = {"lm_pretrain": 3e-3, "vision_pretrain": 1e-3, "flamingo": 3e-3}
SMOKE_STEPS = {"lm_pretrain": 80, "vision_pretrain": 40, "flamingo": 80}
CONTEXT = 384  # tokens: an 8-shot captioning prompt (about 260) plus 20 new tokens fits
MAX_MEDIA = 9  # images: 8 demonstrations and the query
FEWSHOT_VQA_TOKENS = 160  # an 8-shot VQA episode: about 150 tokens at most
POOL_SIZE = 2048  # the evaluation's demonstrations come from this many train items
BINDING_SHOTS = 4  # support images of the training binding episodes (evaluated at 0, 4 and 8)


def model() -> ml_collections.ConfigDict:
  """LM 2 x 64 (LLaMA family: RoPE, whose relative positions made it learn the world's text
  faster than learned positions; vocab = the shapes-world BPE's 1024), ViT 32px/8 2 x 64,
  resampler 1 x 8 latents without media-time embeddings (an image resamples the same in any
  slot, so prompts of 9 images work after training on at most 5), a gated block before each LM
  layer."""
  return model_config.flamingo_config(
      lm=model_config.lm_config(family="llama", vocab_size=1024, num_layers=2, embed_dim=64,
                                num_heads=4, mlp_dim=256, max_length=CONTEXT),
      vision=model_config.vision_config(image_size=32, patch_size=8, width=64, num_layers=2,
                                        num_heads=4, mlp_dim=256),
      resampler=model_config.resampler_config(depth=1, num_latents=8, num_heads=4, head_dim=16,
                                              ff_mult=2, max_num_media=None),
      xattn=model_config.xattn_config(every_n_layers=1, num_heads=4, head_dim=16, ff_mult=2))


def stage_config(stage: str, steps: int) -> ml_collections.ConfigDict:
  """The trainer config of one stage (``steps`` 0: the recipe's)."""
  config = configs.base_config()
  config.stage = stage
  config.model = model()
  config.contrastive.text = model_config.lm_config(
      family="gpt2", vocab_size=1024, num_layers=2, embed_dim=64, num_heads=4, mlp_dim=256,
      max_length=64)
  config.contrastive.embed_dim = 64
  config.init.lm_workdir = f"{RUNS}/lm_pretrain"
  config.init.vision_workdir = f"{RUNS}/vision_pretrain"
  config.data.max_tokens = CONTEXT
  config.data.max_images = MAX_MEDIA
  shapes = dict(num_records=100_000)
  pairs = dict(max_tokens=64, media_slots=1, **shapes)
  fewshot = dict(max_shots=MAX_MEDIA - 1, pool_size=POOL_SIZE)
  config.data.datasets = {
      "lm_pretrain": dict(text=configs.dataset("shapes_text", batch_size=8, texts_per_record=8,
                                               **shapes)),
      "vision_pretrain": dict(pairs=configs.dataset("shapes", batch_size=64, kind="pair",
                                                    **pairs)),
      "flamingo": dict(
          documents=configs.dataset("shapes", batch_size=8, weight=1.0, kind="interleaved",
                                    min_images=2, max_images=5, max_tokens=192, media_slots=5,
                                    **shapes),
          vqa=configs.dataset("shapes", batch_size=128, weight=1.0, kind="vqa", max_tokens=24,
                              media_slots=1, supervise="answer", **shapes),
          fewshot_vqa=configs.dataset("shapes", batch_size=16, weight=0.5, kind="fewshot_vqa",
                                      max_tokens=FEWSHOT_VQA_TOKENS, media_slots=MAX_MEDIA,
                                      supervise="answer", **fewshot, **shapes),
          fewshot_captions=configs.dataset("shapes", batch_size=8, weight=0.3,
                                           kind="fewshot_caption", max_tokens=CONTEXT,
                                           media_slots=MAX_MEDIA, supervise="answer", **fewshot,
                                           **shapes),
          binding=configs.dataset("shapes", batch_size=8, weight=0.5, kind="binding",
                                  num_shots=BINDING_SHOTS, max_tokens=80,
                                  media_slots=BINDING_SHOTS + 1, **shapes)),
  }[stage]
  config.optimizer.learning_rate = LEARNING_RATES[stage]
  config.optimizer.warmup_steps = 20
  if stage != "flamingo":
    config.optimizer.schedule = "cosine"
    config.optimizer.decay_pattern = "kernel|embedding"
  config.total_steps = steps or STEPS[stage]
  config.checkpoint.every_steps = 100
  config.log_every_steps = 10
  return config


def recipe_config(smoke: bool) -> ml_collections.ConfigDict:
  """The three stages, then the evaluation (``eval``: ``xattn_vlm.eval.runner``'s settings)."""
  steps = SMOKE_STEPS if smoke else STEPS
  evaluation = runner.default_config()
  evaluation.tasks = "shapes_captioning,shapes_vqa,shapes_binding"
  evaluation.shots = (0, 4) if smoke else (0, 4, 8)
  evaluation.trials = 1 if smoke else 2
  evaluation.batch_size = 32
  evaluation.one_shape_per_task = True
  evaluation.shapes.num_queries = 32 if smoke else 128
  evaluation.shapes.pool_size = 512 if smoke else POOL_SIZE
  return ml_collections.ConfigDict(dict(
      stages={stage: stage_config(stage, steps[stage]) for stage in configs.STAGES},
      eval=evaluation,
      seeds=(0,),  # --seeds=0,1,2 runs it once per seed and judges the targets over the seeds
      baseline_tasks="shapes_vqa",  # also evaluated before the Flamingo stage (gates at 0)
      grid_images=12,
  ))


def get_config(arg=None):
  settings = configs.parse_arg(arg, preset="recipe", steps=0)
  if settings.preset in ("recipe", "smoke", "fusion", "fusion_smoke"):
    if settings.steps:
      raise ValueError(f"config preset {arg!r}: steps=N sets one stage's steps; the "
                       f"{settings.preset} preset fixes its own")
    config = recipe_config(smoke=settings.preset.endswith("smoke"))
    if settings.preset.startswith("fusion"):
      config.fusion_modes = "xattn,prefix,joint,magic,socratic"
      # MAGiC's captions start with an opening of the world's captions (the LM pretrained on
      # them); the similarity's weight is the library's default, untuned.
      config.training_free = dict(caption_prompt="An image with", magic_weight=1.0,
                                  magic_candidates=8)
    return config
  if settings.preset not in configs.STAGES:
    raise ValueError(f"config preset {arg!r}: expected recipe, smoke, fusion, fusion_smoke or "
                     f"one of {configs.STAGES}")
  return stage_config(settings.preset, settings.steps)
