"""Every experiments/*.py: its config builds for every preset, names its COMMAND, and the model
and train state of that config can be built abstractly on the mesh it asks for (an AbstractMesh,
so paper-size meshes are checked here too, FSDP check and batch divisibility included)."""

import math
import pathlib

import jax
import pytest
from jax.sharding import AbstractMesh, AxisType

from xattn_vlm.models import config as model_config
from xattn_vlm.train import configs
from xattn_vlm.train import sharding as sharding_lib
from xattn_vlm.train import trainer

EXPERIMENTS = pathlib.Path(__file__).resolve().parent.parent / "experiments"
PRESETS = {
    "tiny_test": ["lm_pretrain", "vision_pretrain", "flamingo"],
    "shapes_tiny": ["lm_pretrain", "vision_pretrain", "flamingo"],
    "shapes_smollm": ["vision_pretrain", "flamingo"],
    "openflamingo_9b": ["mesh=gpu", "mesh=tpu,slices=2"],
    "flamingo_3b": ["mesh=tpu", "mesh=gpu"],
    "flamingo_9b": ["mesh=tpu", "mesh=gpu"],
    "flamingo_80b": ["mesh=tpu", "mesh=gpu"],
}


def _module(name):
  return configs.load_file(EXPERIMENTS / f"{name}.py")


def _abstract_mesh(config) -> AbstractMesh:
  """The config's mesh with -1 resolved to 2 (or to this machine's 8 devices for CPU configs)."""
  sizes = [config.mesh[axis] for axis in configs.MESH_AXES]
  known = math.prod(s for s in sizes if s != -1)
  rest = jax.device_count() // known if known <= jax.device_count() else 2
  shape = tuple(rest if s == -1 else s for s in sizes)
  return AbstractMesh(shape, configs.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_every_experiment_is_listed():
  assert sorted(p.stem for p in EXPERIMENTS.glob("*.py")) == sorted(PRESETS)


@pytest.mark.parametrize("name, preset",
                         [(n, p) for n, presets in PRESETS.items() for p in presets])
def test_config_builds_and_its_state_has_a_shape(name, preset):
  module = _module(name)
  assert "COMMAND" in module.__doc__ and f"experiments/{name}.py" in module.__doc__
  config = module.get_config(preset)
  mesh = _abstract_mesh(config)
  s = trainer.setup(config, mesh)
  trainer.check_batch_sizes(config, sharding_lib.data_parallel_size(s.rules, mesh))
  params = jax.tree.leaves(s.abstract_state.params)
  assert params and all(isinstance(x, jax.ShapeDtypeStruct) for x in params)
  assert jax.tree.leaves(s.abstract_state.opt_state)
  if config.stage == "flamingo":
    assert "lm" not in s.abstract_state.opt_state[1][0].mu
  if config.mesh.tensor > 1:  # a width the tensor axis does not divide would be replicated
    mlp_kernels = [sharding.spec for path, sharding in
                   jax.tree_util.tree_flatten_with_path(s.state_sharding.params)[0]
                   if jax.tree_util.keystr(path).startswith("['lm']")
                   and "['mlp']" in jax.tree_util.keystr(path)
                   and jax.tree_util.keystr(path).endswith("['kernel'].value")]
    assert mlp_kernels and all("tensor" in spec for spec in mlp_kernels), mlp_kernels[:3]


def test_swiglu_width_is_two_thirds_rounded_up_as_llama_does():
  # LLaMA-7B's and LLaMA-65B's MLP widths (d = 4096, 8192); TinyLlama's (d = 2048).
  assert [model_config.swiglu_width(4 * d) for d in (4096, 8192, 2048)] == [11008, 22016, 5632]
  assert model_config.swiglu_width(96, multiple_of=32) == 64


def test_unknown_preset_setting_is_an_error():
  with pytest.raises(ValueError, match="unknown setting 'mesh_shape'"):
    _module("flamingo_80b").get_config("mesh_shape=tpu")
  with pytest.raises(ValueError, match="mesh='cpu'"):
    _module("flamingo_80b").get_config("mesh=cpu")
