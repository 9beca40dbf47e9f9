"""What a plan is: the figures of one training step of a config on a target machine, and the
parts every way of making one shares (the trainer's setup and abstract batches, FSDP traffic)."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding

from xattn_vlm import console
from xattn_vlm.models import remat as remat_lib
from xattn_vlm.models.parameters import size
from xattn_vlm.plan.chips import Chip, bandwidth
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import sharding as sharding_lib
from xattn_vlm.train import trainer
from xattn_vlm.train.configs import MESH_AXES


class DoesNotFitError(ValueError):
  """The step does not fit the target's memory: its train state alone (``state_bytes`` per
  device, known without compiling) or XLA's placement of the step (``state_bytes`` None: XLA
  refused to compile it)."""

  def __init__(self, message: str, state_bytes: int | None = None):
    super().__init__(message)
    self.state_bytes = state_bytes


@dataclasses.dataclass(frozen=True)
class Memory:
  """Bytes per device, as XLA's ``memory_analysis`` names them. ``total`` = arguments + outputs -
  aliased (outputs written into donated arguments) + temporaries + generated code."""
  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  generated_code: int

  @property
  def total(self) -> int:
    return (self.arguments + self.outputs - self.aliased + self.temporaries
            + self.generated_code)


@dataclasses.dataclass
class Plan:
  """What one training step of ``config`` costs on ``target``."""
  config: ml_collections.ConfigDict
  target: str  # e.g. "TPU topology v5p:8x8x8"
  method: str  # how the figures were obtained; printed with them
  mesh_shape: dict[str, int]
  chip: Chip | None  # None: no memory limit or peak known (CPU devices)
  device_share: float  # the fraction of a chip one device is (a TPU v4 core: 0.5)
  memory: Memory
  model_flops: float  # the whole step on all devices (``flops.step_flops``)
  device_flops: float  # per device as executed (remat recomputation included)
  compute_seconds: float | None  # compute and HBM traffic, no communication
  compute_basis: str  # where ``compute_seconds`` comes from
  communication_bytes: float  # per device and step (``communication_bytes``)
  largest: list[str]  # "path shape -> spec", largest parameters first
  parameters: tuple[int, int]  # (trainable, total)
  batch_shapes: dict[str, dict[str, tuple[int, ...]]]
  seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # lower / compile time
  fitted_from: str = ""  # the config's mesh, when ``fit_mesh`` fitted it to the target
  compiled: Any = None  # the ``jax.stages.Compiled`` step (compiled plans only)

  @property
  def num_devices(self) -> int:
    return math.prod(self.mesh_shape.values())

  @property
  def device_memory(self) -> float | None:
    return None if self.chip is None else self.chip.hbm_bytes * self.device_share

  @property
  def device_peak(self) -> float | None:
    return None if self.chip is None else self.chip.peak_flops * self.device_share

  @property
  def fits(self) -> bool:
    return self.chip is None or self.memory.total <= self.device_memory

  @property
  def communication_seconds(self) -> float | None:
    if self.chip is None:
      return None
    return self.communication_bytes / (bandwidth(self.chip, self.mesh_shape) * self.device_share)

  @property
  def step_seconds(self) -> tuple[float, float] | None:
    """(full overlap of compute and communication, none)."""
    if self.compute_seconds is None or self.communication_seconds is None:
      return None
    return (max(self.compute_seconds, self.communication_seconds),
            self.compute_seconds + self.communication_seconds)

  @property
  def mfu(self) -> tuple[float, float] | None:
    """Model FLOPs utilisation at the (slow, fast) ends of ``step_seconds``."""
    if self.step_seconds is None:
      return None
    per_second = self.num_devices * self.device_peak
    return tuple(self.model_flops / (t * per_second) for t in reversed(self.step_seconds))


def mesh_text(sizes) -> str:
  """``data 1 x fsdp 64 x tensor 8`` for sizes in ``MESH_AXES`` order."""
  return " x ".join(f"{axis} {size}" for axis, size in zip(MESH_AXES, sizes))


def fit_mesh(config: ml_collections.ConfigDict, num_devices: int,
             target: str) -> tuple[ml_collections.ConfigDict, str]:
  """``config`` with its mesh fitted to ``num_devices`` (``sharding.fitted_mesh_shape``) and,
  when that changed it, the config's own mesh as text (else ""), said on the console: a paper
  config names the mesh of its largest slice, and a plan for a smaller one should still run."""
  shape = sharding_lib.fitted_mesh_shape(config.mesh, num_devices)
  given = [int(config.mesh[axis]) for axis in MESH_AXES]
  if num_devices % math.prod(s for s in given if s != -1) == 0:
    return config, ""
  fitted = copy.deepcopy(config)
  fitted.mesh.update(dict(zip(MESH_AXES, shape)))
  console.say(f"config.mesh {mesh_text(given)} does not fit the {num_devices} devices of {target}; "
              f"planning {mesh_text(shape)} (tensor kept, fsdp capped, data the rest; set "
              f"--config.mesh.* to choose another)")
  return fitted, mesh_text(given)


def shapes(batches) -> dict[str, dict[str, tuple[int, ...]]]:
  return jax.tree.map(lambda x: tuple(x.shape), batches)


def setup(config: ml_collections.ConfigDict, mesh) -> tuple[trainer.Setup, dict, tuple[int, int]]:
  """The trainer's setup for ``mesh`` with its batch-size check, one step's abstract batches as
  the trainer shards them, and the (trainable, total) parameter counts."""
  s = trainer.setup(config, mesh)
  trainer.check_batch_sizes(config, sharding_lib.data_parallel_size(s.rules, mesh))
  params = s.abstract_state.params
  parameters = (size(nnx.filter_state(params, s.stage.trainable(s.config))), size(params))
  return s, input_pipeline.abstract_batches(config, mesh, s.rules), parameters


def _mesh_axes(sharding: NamedSharding) -> set[str]:
  return {a for entry in sharding.spec if entry
          for a in ((entry,) if isinstance(entry, str) else entry)}


def _shards(sharding: NamedSharding, excluding: Sequence[str] = ()) -> int:
  """Into how many pieces ``sharding`` cuts an array, counting mesh axes not in ``excluding``."""
  return math.prod(sharding.mesh.shape[a] for a in _mesh_axes(sharding) if a not in excluding)


def nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def with_shardings(abstract, shardings):
  return zip(jax.tree_util.tree_leaves_with_path(abstract),
             jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))


def device_bytes(abstract, shardings) -> int:
  """Bytes per device of arrays ``abstract`` placed with ``shardings`` (same structure)."""
  return sum(nbytes(x) // _shards(sharding)
             for (_, x), sharding in with_shardings(abstract, shardings))


def communication_bytes(s: trainer.Setup) -> float:
  """What FSDP moves per device and step (received; an analytic count, not XLA's): every
  parameter sharded over ``fsdp`` is all-gathered along it in each pass that reads it (the frozen
  vision tower once, the rest forward and backward, plus once more with per-block remat), and the
  trainable gradients are reduced over the data-parallel devices (a reduce-scatter and an
  all-gather: about twice their share after the other axes' sharding)."""
  fsdp = s.mesh.shape["fsdp"]
  passes = 3 if remats(s.config) else 2
  total = 0.0
  for (path, x), sharding in with_shardings(s.abstract_state.params, s.state_sharding.params):
    if "fsdp" in _mesh_axes(sharding):
      reads = 1 if sharding_lib.path_name(path).startswith("vision/") else passes
      total += reads * nbytes(x) / _shards(sharding, excluding=["fsdp"]) * (fsdp - 1) / fsdp
  replicas = sharding_lib.data_parallel_size(s.rules, s.mesh)
  batch_axes = s.rules.get("batch", ())
  train_filter = s.stage.trainable(s.config)
  trainable = with_shardings(nnx.filter_state(s.abstract_state.params, train_filter),
                              nnx.filter_state(s.state_sharding.params, train_filter))
  for (_, x), sharding in trainable:
    total += 2 * nbytes(x) / _shards(sharding, excluding=batch_axes) * (replicas - 1) / replicas
  return total


def remats(config: ml_collections.ConfigDict) -> bool:
  """Whether blocks recompute their forward in the backward pass. The analytic estimates count
  every remat policy as ``full`` (keep block inputs only, recompute the whole block)."""
  return remat_lib.policy_name(config.model.remat) != "none"
