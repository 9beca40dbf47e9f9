"""What several test files share: the repository's experiment configs, tiny training configs,
parameter and metric readers, and data builders that subprocesses import by path too (a test
spawns a fresh Python that must build exactly what the test itself built)."""

from __future__ import annotations

import hashlib
import os
import pathlib
import random

import jax
import ml_collections
import numpy as np
import PIL.Image

from xattn_vlm.data import default_tokenizer
from xattn_vlm.data import pipeline
from xattn_vlm.data import sources
from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.train import configs
from xattn_vlm.train import metrics as metrics_lib
from xattn_vlm.train import sharding as sharding_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MESH_222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
SGD = {"optimizer.name": "sgd", "optimizer.learning_rate": 0.5}


SEED_ENV = "XATTN_TEST_SEED"


def random_seed(what: str) -> int:
  """The seed of a test's random choices: ``$XATTN_TEST_SEED`` when set, else a fresh one;
  printed (pytest shows it with a failure) so that the failing run can be repeated."""
  seed = int(os.environ[SEED_ENV]) if os.environ.get(SEED_ENV) else random.randrange(2**32)
  print(f"{what}: seed {seed} (repeat with {SEED_ENV}={seed})")
  return seed


def experiment_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``experiments/<name>.py``'s ``get_config(arg)``."""
  return configs.load_file(REPO / "experiments" / f"{name}.py").get_config(arg)


def tiny(preset: str = "flamingo", **overrides) -> ml_collections.ConfigDict:
  """experiments/tiny_test.py with dotted overrides, e.g. ``**{"mesh.data": 2}``."""
  config = experiment_config("tiny_test", preset)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def leaves(params) -> dict[str, np.ndarray]:
  """``{"path/to/param": value}`` of a parameter tree."""
  flat = jax.tree_util.tree_leaves_with_path(params)
  return {sharding_lib.path_name(path): np.asarray(x) for path, x in flat}


def losses(workdir) -> list[float]:
  """The logged loss of every step of a training run."""
  return [row["loss"] for row in metrics_lib.read_metrics(str(workdir))]


def write_pairs(folder: pathlib.Path, count: int) -> None:
  """``count`` JPEG + caption pairs, plus one corrupt JPEG and one empty caption."""
  folder.mkdir(parents=True, exist_ok=True)
  for i in range(count):
    pixels = np.random.default_rng(i).integers(0, 256, (10, 14, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(folder / f"{i:03d}.jpg")
    (folder / f"{i:03d}.txt").write_text(f"a red circle number {i}")
  (folder / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (folder / "bad.txt").write_text("a corrupt image")
  PIL.Image.new("RGB", (8, 8)).save(folder / "empty.jpg")
  (folder / "empty.txt").write_text("  ")


def folder_pipeline(folder, batch_size=4, **kwargs) -> pipeline.BatchIterator:
  """A pipeline over ``write_pairs``' folder: real decode, tokenizer and layout."""
  transform = pipeline.ExampleTransform(default_tokenizer(), max_tokens=12,
                                        max_images=1, image_size=8, mean=CLIP_MEAN, std=CLIP_STD)
  return pipeline.batch_iterator(sources.ImageTextFolder(folder), transform,
                                 batch_size=batch_size, seed=7, process_index=0, process_count=1,
                                 **kwargs)


def fingerprint(item) -> str:
  """sha256 over an item's text and image bytes, recursively."""
  digest = hashlib.sha256()

  def add(value):
    if isinstance(value, dict):
      for key in sorted(value):
        digest.update(key.encode())
        add(value[key])
    elif isinstance(value, (list, tuple)):
      for v in value:
        add(v)
    elif isinstance(value, np.ndarray):
      digest.update(value.tobytes())
    else:
      digest.update(repr(value).encode())
  add(item)
  return digest.hexdigest()


def all_generators(seed: int, index: int) -> list:
  """Item ``index`` of every shapes-world generator, test split."""
  return [shapes_world.GENERATORS[name]("test", seed, index)
          for name in sorted(shapes_world.GENERATORS)]
