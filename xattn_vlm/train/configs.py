"""The trainer's configuration: every field with its default, and the preset-string parser.

An experiment file (``experiments/<name>.py``) calls ``base_config()`` and overrides what differs;
the config is locked afterwards (``ml_collections.config_flags``), so a mistyped
``--config.key=value`` fails at start instead of being silently ignored.

Fields (``base_config``):
  stage: ``lm_pretrain`` | ``vision_pretrain`` | ``flamingo`` (see ``stages``).
  model: a Flamingo model config (``xattn_vlm.models.config``); the LM stage trains ``model.lm``,
    the vision stage ``model.vision`` (with ``contrastive``'s text tower), the Flamingo stage all.
  contrastive: the vision stage's text tower (an ``lm_config``), joint embedding size, initial
    temperature.
  init: the Flamingo stage's pretrained towers: workdirs of earlier ``lm_pretrain`` /
    ``vision_pretrain`` runs, or local Hugging Face folders (``*_hf_path``); or the whole model
    from a flamingo-stage workdir (``flamingo_workdir``: a converted published model, or a run,
    to fine-tune); '' = random init (tests, benchmarks).
  data: the mixture; ``tokenizer`` is a local Hugging Face folder ('' = the shapes-world BPE);
    ``datasets.<name>`` holds ``source`` (see ``input_pipeline``), GLOBAL
    ``batch_size``, ``weight`` (lambda_m) and source arguments; ``feature_cache`` ('' = none) is a
    directory of the frozen vision tower's features (``python -m xattn_vlm.build_features``)
    that the Flamingo stage reads instead of running the tower.
  mesh: sizes of the ``data``, ``fsdp``, ``tensor`` axes (-1: the rest of the devices);
    ``dcn_data`` > 1 splits ``data`` over that many slices (data parallel over DCN).
  sharding: logical-axis rules (logical name -> mesh axes) and the size above which a parameter
    must be sharded over ``fsdp`` when ``mesh.fsdp`` > 1.
  optimizer: ``adamw`` (or ``sgd``, for tests), schedule ``constant`` (after warmup) or ``cosine``,
    weight decay on parameters whose path matches ``decay_pattern``, global-norm clipping.
  total_steps, microbatches (gradient accumulation per dataset batch), seed.
  max_nonfinite_in_a_row: steps with a NaN/Inf loss or gradient are skipped; this many in a row
    stop the run.
  checkpoint: save every ``every_steps`` (async), keep the last ``keep`` (and every
    ``keep_period``-th step when > 0).
  log_every_steps, peak_flops_per_device (0: measure a float32 matmul at start),
  progress_bar, plots.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import types

import ml_collections

from xattn_vlm.models import config as model_config
from xattn_vlm.plan import chips

STAGES = ("lm_pretrain", "vision_pretrain", "flamingo")
MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes (the Flax lm1b style: a handful of rules). Parameters are sharded over
# ``fsdp`` along ``embed`` and over ``tensor`` along the wide dims; the batch over data x fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("kv", None),
    ("latents", None),
    ("media", None),
    ("layers", None),
)


def base_config() -> ml_collections.ConfigDict:
  """All trainer fields with their defaults (the Flamingo stage on the tiny model)."""
  config = ml_collections.ConfigDict()
  config.stage = "flamingo"
  config.model = model_config.tiny()
  config.contrastive = ml_collections.ConfigDict(dict(
      text=model_config.lm_config(family="gpt2", vocab_size=1024, num_layers=2, embed_dim=32,
                                  num_heads=4, mlp_dim=64, max_length=64),
      embed_dim=32,
      init_temperature=0.07,
  ))
  config.init = ml_collections.ConfigDict(dict(lm_workdir="", vision_workdir="", lm_hf_path="",
                                               vision_hf_path="", flamingo_workdir=""))
  config.data = ml_collections.ConfigDict(dict(
      seed=0,
      tokenizer="",
      max_tokens=32,
      max_images=2,
      image_mode="pad",
      num_workers=0,
      prefetch_batches=2,
      feature_cache="",
      datasets=ml_collections.ConfigDict(),
  ))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1))
  config.sharding = ml_collections.ConfigDict(dict(rules=DEFAULT_RULES, fsdp_min_size=2**18))
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw",
      learning_rate=1e-4,
      schedule="constant",
      warmup_steps=0,
      end_learning_rate_fraction=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.1,
      decay_pattern="gated_blocks",
      clip_norm=1.0,
  ))
  config.total_steps = 100
  config.microbatches = 1
  config.seed = 0
  config.max_nonfinite_in_a_row = 10
  config.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=50, keep=3, keep_period=0, async_save=True))
  config.log_every_steps = 10
  config.peak_flops_per_device = 0.0
  config.progress_bar = True
  config.plots = True
  return config


def dataset(source: str, *, batch_size: int, weight: float = 1.0,
            **kwargs) -> ml_collections.ConfigDict:
  """One mixture component: a source name (``input_pipeline.SOURCES``), its GLOBAL batch size,
  its loss weight lambda_m and the source's own arguments."""
  return ml_collections.ConfigDict(dict(source=source, batch_size=batch_size, weight=weight,
                                        **kwargs))


def load_file(path: str | os.PathLike) -> types.ModuleType:
  """A config file (``experiments/<name>.py``) loaded by its path, as ``--config`` loads it; its
  ``get_config(preset)`` builds the config."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  if spec is None or not path.is_file():
    raise ValueError(f"config file: expected a Python file such as experiments/shapes_tiny.py, "
                     f"got {str(path)!r} (no such file)")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """The preset string after ``:`` in ``--config=file.py:ARG`` as typed settings.

  ``"flamingo"`` sets the first default's key (a bare word); ``"stage=flamingo,steps=20"`` sets
  keys by name. Values take the type of their default; unknown keys, values of another type and
  empty settings (``"flamingo,"``) are errors that quote the preset.
  """
  settings = ml_collections.ConfigDict(defaults)
  if not arg:
    return settings
  first = next(iter(defaults), None)
  for item in arg.split(","):
    if not item:
      raise ValueError(f"config preset {arg!r}: an empty setting between commas; expected "
                       "a bare word or key=value pairs separated by single commas")
    key, sep, value = item.partition("=")
    if not sep:
      if first is None:
        raise ValueError(f"config preset {arg!r}: this config takes no preset")
      key, value = first, item
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config preset {arg!r}: unknown setting {key!r}; expected one of "
                       f"{sorted(defaults)}")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config preset {arg!r}: {key} expects true/false, got {value!r}")
      settings[key] = value.lower() in ("true", "1")
    else:
      try:
        settings[key] = kind(value)
      except ValueError:
        raise ValueError(f"config preset {arg!r}: {key} expects a {kind.__name__} (like its "
                         f"default, {defaults[key]!r}), got {value!r}") from None
  return settings


# The chip each paper mesh is laid out for, whose bf16 peak MFU is quoted against.
PAPER_CHIPS = {"tpu": chips.TPU_CHIPS["TPU v5"], "gpu": chips.GPU_CHIPS["H100"]}


def paper_config(model: ml_collections.ConfigDict, meshes: dict[str, dict[str, int]],
                 settings: ml_collections.ConfigDict, *, interleaved_batch: int,
                 pairs_batch: int, steps: int) -> ml_collections.ConfigDict:
  """The Flamingo stage at paper scale: bf16 compute, f32 parameters and optimizer state,
  rematerialised and scanned layers; interleaved documents (MMC4 layout, weight 1.0) and
  WebDataset image-text pairs (weight 0.2); the towers and tokenizer from Hugging Face folders
  given on the command line; ``settings.mesh`` picks a mesh of ``meshes``, ``settings.slices``
  the DCN slices."""
  if settings.mesh not in meshes:
    raise ValueError(f"config preset mesh={settings.mesh!r}: expected one of {sorted(meshes)}")
  config = base_config()
  config.stage = "flamingo"
  config.model = model
  config.model.dtype = "bfloat16"
  config.model.param_dtype = "float32"
  config.model.remat = "full"
  config.model.scan_layers = True  # compiles a few blocks of each kind instead of every block
  config.mesh.update(meshes[settings.mesh])
  config.mesh.dcn_data = settings.slices
  config.data.max_tokens = 256
  config.data.max_images = 5
  config.data.image_mode = "pad"
  config.data.num_workers = 8
  config.data.datasets = dict(
      interleaved=dataset("mmc4", batch_size=interleaved_batch, weight=1.0, path="",
                          image_root=""),
      pairs=dataset("webdataset", batch_size=pairs_batch, weight=0.2, path=""))
  config.optimizer.warmup_steps = 5000
  config.total_steps = steps
  config.checkpoint.every_steps = 1000
  config.checkpoint.keep_period = 50_000
  config.log_every_steps = 100
  config.peak_flops_per_device = PAPER_CHIPS[settings.mesh].peak_flops
  return config
