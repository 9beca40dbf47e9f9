"""Pretrained weights from local Hugging Face folders (config.json + *.safetensors) into NNX modules.

Safetensors are read directly (no torch at run time), one tensor at a time, from a single
``model.safetensors`` or from shards listed in ``model.safetensors.index.json``. Every assignment
checks the shape and names the tensor when it does not fit.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def read_config(path: str | pathlib.Path) -> dict:
  """config.json of a local Hugging Face model folder."""
  folder = pathlib.Path(path)
  if not folder.is_dir():
    raise FileNotFoundError(f"Hugging Face model folder {str(folder)!r} does not exist")
  config_file = folder / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"{str(config_file)!r} is missing: a Hugging Face model folder needs "
                            "config.json beside its safetensors")
  return json.loads(config_file.read_text())


class Checkpoint:
  """The tensors of a local safetensors checkpoint, read lazily by name."""

  def __init__(self, path: str | pathlib.Path):
    folder = pathlib.Path(path)
    index = folder / SAFETENSORS_INDEX
    single = folder / SAFETENSORS
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      self._files = {name: folder / shard for name, shard in weight_map.items()}
    elif single.is_file():
      with safe_open(single, framework="flax") as f:
        self._files = {name: single for name in f.keys()}
    else:
      raise FileNotFoundError(f"no {SAFETENSORS} or {SAFETENSORS_INDEX} in {str(folder)!r}")
    missing = sorted({str(p) for p in self._files.values() if not p.is_file()})
    if missing:
      raise FileNotFoundError(f"safetensors shards listed in the index are missing: {missing}")
    self.path = folder

  def keys(self) -> Iterator[str]:
    return iter(self._files)

  def __contains__(self, name: str) -> bool:
    return name in self._files

  def get(self, name: str) -> jax.Array:
    if name not in self._files:
      raise KeyError(f"tensor {name!r} not found in checkpoint {str(self.path)!r}")
    with safe_open(self._files[name], framework="flax") as f:
      return f.get_tensor(name)


def assign(variable: nnx.Variable, value, name: str) -> None:
  """Writes ``value`` into ``variable`` (cast to its dtype) after checking the shape."""
  value = jnp.asarray(value)
  target = variable[...]
  if value.shape != target.shape:
    raise ValueError(f"shape mismatch for tensor {name!r}: checkpoint has {tuple(value.shape)}, "
                     f"model expects {tuple(target.shape)}")
  variable[...] = value.astype(target.dtype)


def as_numpy(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32))
