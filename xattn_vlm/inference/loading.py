"""Published Flamingo-family models in one call: ``from_pretrained`` -> (model, processor,
tokenizer), ready for ``generate``, ``score`` and the evaluation harness.

It reads a converted model (``python -m xattn_vlm.convert``) or a flamingo-stage run's workdir,
or the published files themselves: an IDEFICS folder, or OpenFlamingo's ``checkpoint.pt`` with its
base LM and CLIP folders and the model preset. ``import_openflamingo`` and ``import_idefics`` are
the imports the conversion writes out: the weights (``models.pretrained``) and the tokenizer the
model was trained with, checked to put the special tokens on the rows the weights hold them at.
"""

from __future__ import annotations

import os
import pathlib

import ml_collections

from xattn_vlm import checkpoint
from xattn_vlm.data.tokenizer import Tokenizer
from xattn_vlm.inference.processor import Processor
from xattn_vlm.models import config as model_config
from xattn_vlm.models import convert
from xattn_vlm.models import pretrained
from xattn_vlm.models.flamingo import Flamingo

PathLike = str | os.PathLike
FORMATS = ("openflamingo", "idefics")  # what ``convert_published`` reads
_IDEFICS_FIELDS = ("dtype", "param_dtype")
# Files of a Hugging Face tokenizer folder (one is enough for AutoTokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _require(path: PathLike, setting: str) -> None:
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f"{setting}={str(path)!r} does not exist")


def _tokenizer_for(path: PathLike, config: ml_collections.ConfigDict, setting: str) -> Tokenizer:
  """The tokenizer at ``path`` for a model of ``config`` whose weights hold the added tokens' rows
  right after the LM vocabulary, in ``config.added_tokens`` order: the tokenizer must give them
  those ids itself (a tokenizer that holds them elsewhere was not the one these weights were
  trained with, and its rows would be read as the wrong tokens)."""
  folder = pathlib.Path(path)
  _require(path, setting)
  if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
    raise ValueError(f"{setting}={str(path)!r} holds no tokenizer (none of {_TOKENIZER_FILES}): "
                     "give the folder of the tokenizer the model was trained with")
  tokenizer = Tokenizer.from_pretrained(path, model_config=config)
  vocab = config.lm.vocab_size
  for k, (token, raw) in enumerate(zip(tokenizer.added_tokens, tokenizer.raw_added_token_ids)):
    if raw != vocab + k:
      raise ValueError(f"{setting}={str(path)!r} gives {token} id {raw}, but the checkpoint holds "
                       f"its row at id {vocab + k} (lm.vocab_size={vocab}, then "
                       f"{tuple(config.added_tokens)}): give the tokenizer the model was trained "
                       "with")
  return tokenizer


def import_openflamingo(checkpoint_pt: PathLike, lm: PathLike, vision: PathLike,
                        config: ml_collections.ConfigDict | str,
                        tokenizer: PathLike | None = None
                        ) -> tuple[Flamingo, ml_collections.ConfigDict, Tokenizer]:
  """OpenFlamingo's published files -> ``(model, config, tokenizer)``.

  Args:
    checkpoint_pt: OpenFlamingo's ``checkpoint.pt`` (v1 or v2).
    lm: the base LM's Hugging Face folder (MPT-1B, MPT-7B, RedPajama-INCITE-3B, LLaMA-7B).
    vision: the CLIP ViT-L/14 Hugging Face folder (``openai/clip-vit-large-patch14``).
    config: the model preset (``openflamingo_3b``, ...) or a model config
      (``models.pretrained.load_openflamingo`` says which of its fields count).
    tokenizer: the tokenizer folder (default: ``lm``); its vocabulary must be the config's
      ``lm.vocab_size``.
  """
  for path, name in ((checkpoint_pt, "checkpoint_pt"), (lm, "lm"), (vision, "vision")):
    _require(path, name)
  config = model_config.get_model_config(config) if isinstance(config, str) else config
  setting = "tokenizer" if tokenizer is not None else "lm"
  checked = _tokenizer_for(lm if tokenizer is None else tokenizer, config, setting)
  model, config = pretrained.load_openflamingo(checkpoint_pt, lm, vision, config)
  checked.require_model(config)
  return model, config, checked


def import_idefics(folder: PathLike, tokenizer: PathLike | None = None, *,
                   dtype: str = "float32", param_dtype: str = "float32"
                   ) -> tuple[Flamingo, ml_collections.ConfigDict, Tokenizer]:
  """An IDEFICS folder (``IdeficsForVisionText2Text``: config.json, safetensors, tokenizer) ->
  ``(model, config, tokenizer)``; ``tokenizer`` defaults to ``folder``."""
  _require(folder, "folder")
  config = pretrained.idefics_config_from_hf(convert.read_config(folder), dtype=dtype,
                                             param_dtype=param_dtype)
  setting = "tokenizer" if tokenizer is not None else "folder"
  checked = _tokenizer_for(folder if tokenizer is None else tokenizer, config, setting)
  model, config = pretrained.load_idefics(folder, dtype=dtype, param_dtype=param_dtype)
  return model, config, checked


def from_pretrained(path: PathLike, *, lm: PathLike | None = None,
                    vision: PathLike | None = None,
                    config: ml_collections.ConfigDict | str | None = None,
                    tokenizer: PathLike | None = None, image_mode: str = "pad"
                    ) -> tuple[Flamingo, Processor, Tokenizer]:
  """A model ready for ``generate`` and the harness, with its processor and tokenizer.

  ``path`` is one of:
    * a converted model (``python -m xattn_vlm.convert``) or a flamingo-stage run's workdir;
    * an IDEFICS folder (its config.json says ``model_type: idefics``);
    * OpenFlamingo's ``checkpoint.pt``, with ``lm``, ``vision`` and ``config`` (the preset name,
      e.g. ``"openflamingo_3b"``) as ``import_openflamingo`` takes them.
  ``tokenizer`` replaces the tokenizer that goes with the files (see the functions above);
  ``image_mode`` is the processor's (``crop``: CLIP's centre crop, as OpenFlamingo's models were
  evaluated).

    model, processor, tokenizer = xattn_vlm.from_pretrained("/ckpt/of3b")
    generate(model, processor, ["<image>Output:"], [["cat.jpg"]])
  """
  source = pathlib.Path(path)
  openflamingo_args = {"lm": lm, "vision": vision, "config": config}
  if source.is_file():
    missing = [name for name, value in openflamingo_args.items() if value is None]
    if missing:
      raise ValueError(f"path={str(path)!r} is a file, read as OpenFlamingo's checkpoint.pt, "
                       f"which needs {missing} too (the base LM and CLIP folders, the preset)")
    model, _, loaded = import_openflamingo(path, lm, vision, config, tokenizer)
  elif not source.is_dir():
    raise FileNotFoundError(f"path={str(path)!r} does not exist")
  else:
    given = [name for name, value in openflamingo_args.items() if value is not None]
    if given:
      raise ValueError(f"{given} apply to OpenFlamingo's checkpoint.pt only; path={str(path)!r} "
                       "is a folder")
    if (source / checkpoint.CHECKPOINTS).is_dir():
      model = checkpoint.load_flamingo(str(path), setting="path")
      loaded = checkpoint.load_tokenizer(str(path), model.config,
                                         None if tokenizer is None else str(tokenizer))
    elif (source / "config.json").is_file():
      model, _, loaded = import_idefics(path, tokenizer)
    else:
      raise ValueError(f"path={str(path)!r} holds neither {checkpoint.CHECKPOINTS}/ (a converted "
                       "model or a training run) nor config.json (an IDEFICS folder)")
  return model, Processor.from_model_config(model.config, loaded, image_mode=image_mode), loaded


def convert_published(source: str, checkpoint_path: str, output: str, *,
                      lm: str | None = None, vision: str | None = None,
                      preset: str | None = None, tokenizer: str | None = None,
                      changes: dict | None = None) -> None:
  """Imports the published files of ``source`` (``FORMATS``) and writes them to ``output`` (the
  command ``python -m xattn_vlm.convert``, whose flags the arguments are: ``changes`` are the
  ``--model.*`` ones)."""
  changes = changes or {}
  checkpoint.require_new_directory(output)
  for flag, path in (("--checkpoint", checkpoint_path), ("--lm", lm), ("--vision", vision),
                     ("--tokenizer", tokenizer)):
    if path is not None and not os.path.exists(path):
      raise FileNotFoundError(f"{flag}={path!r} does not exist")
  openflamingo_only = {"--lm": lm, "--vision": vision, "--preset": preset}
  if source == "openflamingo":
    missing = [name for name, value in openflamingo_only.items() if value is None]
    if missing:
      raise ValueError(f"--from=openflamingo needs {', '.join(missing)} too")
    config = model_config.get_model_config(preset)
    config.update_from_flattened_dict(changes)
    model, config, loaded = import_openflamingo(checkpoint_path, lm, vision, config, tokenizer)
  else:
    given = [name for name, value in openflamingo_only.items() if value is not None]
    other = sorted(set(changes) - set(_IDEFICS_FIELDS))
    if given or other:
      raise ValueError(f"--from=idefics takes the settings from the folder: "
                       f"{given + [f'--model.{k}' for k in other]} apply to --from=openflamingo "
                       f"only (IDEFICS takes --model.{' and --model.'.join(_IDEFICS_FIELDS)})")
    model, config, loaded = import_idefics(checkpoint_path, tokenizer, **changes)
  origin = {"format": source, "checkpoint": os.path.abspath(checkpoint_path)}
  for name, value in (("lm", lm), ("vision", vision), ("preset", preset),
                      ("tokenizer", tokenizer)):
    if value is not None:
      origin[name] = value if name == "preset" else os.path.abspath(value)
  saved = ml_collections.ConfigDict(dict(stage="flamingo", model=config,
                                         converted_from=origin))
  checkpoint.save_flamingo(output, model, saved, loaded)
