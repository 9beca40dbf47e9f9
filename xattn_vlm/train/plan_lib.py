"""Plans of a training step for a target machine, made on this host (MaxText's train_compile idea).

``compile_plan`` lowers and compiles the trainer's own update step (``trainer.setup`` and
``trainer.make_train_step``, jitted with the trainer's shardings and donation) for a list of
devices: a Cloud TPU topology through libtpu (``tpu_devices``; no TPU needed) or this host's CPU
devices. XLA's ``memory_analysis`` gives the per-device memory; its ``cost_analysis`` the per-device
FLOPs and, on TPU, the compute time of XLA's cost model (``optimal_seconds``: compute and HBM
traffic of every op; collectives are not in it).

``analytic_plan`` is the fallback for GPU clusters, which XLA cannot compile for on this host: the
per-device bytes of the train state and batch are exact (from the trainer's shardings on an
``AbstractMesh``); activations, peak temporaries and the roofline compute time are estimates, and
every report of it says so.

Both add ``communication_bytes``, an analytic count of what FSDP moves per device and step
(parameter all-gathers in every pass, gradient reduction), at the chip's interconnect bandwidth.
The predicted step time is the range from perfect overlap, max(compute, communication), to none,
compute + communication.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.experimental import topologies
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from xattn_vlm.models import remat as remat_lib
from xattn_vlm.train import checkpoint as checkpoint_lib
from xattn_vlm.train import configs
from xattn_vlm.train import flops as flops_lib
from xattn_vlm.train import sharding as sharding_lib
from xattn_vlm.train import trainer

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """An accelerator chip: HBM, dense bf16 peak, HBM bandwidth, the bandwidth its collectives get
  inside a TPU slice or a GPU node (ICI, NVLink) and, for GPUs, between nodes, all per chip; and
  its TensorCores (a JAX device may be one core of a chip: TPU v4 without megacore)."""
  name: str
  hbm_bytes: float
  peak_flops: float
  hbm_bandwidth: float
  interconnect: float
  network: float | None = None  # None: the interconnect spans the whole slice (TPU)
  cores: int = 1


# Keyed by JAX's ``device_kind``: the per-chip figures of the Cloud TPU documentation (ICI: the
# chip's total interchip bandwidth).
TPU_CHIPS = {
    "TPU v4": Chip("TPU v4", 32 * GiB, 275e12, 1.2e12, 300e9, cores=2),
    "TPU v5 lite": Chip("TPU v5e", 16 * GiB, 197e12, 0.819e12, 200e9),
    "TPU v5": Chip("TPU v5p", 95 * GiB, 459e12, 2.765e12, 600e9, cores=2),
    "TPU v6 lite": Chip("TPU v6e", 32 * GiB, 918e12, 1.64e12, 448e9),
}
# NVIDIA data sheets (SXM parts, dense bf16; NVLink one direction), 8 GPUs per node, and one
# InfiniBand NIC per GPU between nodes (NDR 400 Gb/s; HDR 200 Gb/s for A100).
GPU_CHIPS = {
    "A100": Chip("A100 80GB", 80e9, 312e12, 2.039e12, 300e9, network=25e9),
    "H100": Chip("H100", 80e9, 989e12, 3.35e12, 450e9, network=50e9),
    "H200": Chip("H200", 141e9, 989e12, 4.8e12, 450e9, network=50e9),
}
GPUS_PER_NODE = 8


class DoesNotFitError(ValueError):
  """XLA could not place the step in the target's memory (it refused to compile)."""


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


def allow_libtpu_in_several_processes() -> None:
  """libtpu locks /tmp/libtpu_lockfile so that one process owns the TPU; compiling for a
  topology uses no TPU, so plans (and tests in parallel) may share the library. Call before the
  TPU plugin loads."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of a Cloud TPU topology such as ``v5p:8x8x8`` (libtpu's compiler; no TPU)."""
  allow_libtpu_in_several_processes()
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                               num_slices=num_slices)
  except Exception as error:  # pylint: disable=broad-except  # libtpu raises plain runtime errors
    raise ValueError(
        f"--topology={topology!r}: libtpu cannot describe it ({type(error).__name__}: {error}); "
        f"expected a name such as v4:2x2x1, v5e:4x4, v5p:4x4x4 or v6e:8x8, with libtpu installed "
        f"(pip install -e '.[tpu]')") from error
  return list(description.devices)


def abstract_batches(config: ml_collections.ConfigDict, mesh,
                     rules: Mapping[str, tuple[str, ...]]) -> dict[str, dict[str, Any]]:
  """``{dataset: {key: ShapeDtypeStruct}}`` of one step's global batches, sharded along the
  batch as the trainer shards them: what ``input_pipeline`` yields (text-only sources: ids,
  attention mask and labels [B, L]; the others also images [B, T, 1, S, S, 3], media_mask [B, T]
  and num_images [B])."""
  spec = sharding_lib.batch_spec(rules, mesh)
  size = config.model.vision.image_size

  def array(shape, dtype):
    sharding = NamedSharding(mesh, P(*spec, *([None] * (len(shape) - 1))))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  batches = {}
  for name, dataset in config.data.datasets.items():
    b, length = dataset.batch_size, config.data.max_tokens
    batch = {key: array((b, length), jnp.int32)
             for key in ("input_ids", "attention_mask", "labels")}
    if dataset.source != "shapes_text":
      t = config.data.max_images
      batch.update(images=array((b, t, 1, size, size, 3), jnp.float32),
                   media_mask=array((b, t), jnp.bool_), num_images=array((b,), jnp.int32))
    batches[name] = batch
  return batches


def jit_train_step(s: trainer.Setup, batches) -> Any:
  """The update step jitted as ``trainer.train_and_evaluate`` jits it (donated state, the
  trainer's state shardings, batches sharded as given)."""
  weights = {name: dataset.weight for name, dataset in s.config.data.datasets.items()}
  return jax.jit(trainer.make_train_step(s, weights), donate_argnums=(0,),
                 in_shardings=(s.state_sharding, jax.tree.map(lambda x: x.sharding, batches)),
                 out_shardings=(s.state_sharding, NamedSharding(s.mesh, P())))


def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _shapes(batches) -> dict[str, dict[str, tuple[int, ...]]]:
  return jax.tree.map(lambda x: tuple(x.shape), batches)


def _setup(config: ml_collections.ConfigDict, mesh):
  """The trainer's setup for ``mesh`` with its batch-size check, and the abstract batches."""
  s = trainer.setup(config, mesh)
  trainer.check_batch_sizes(config, sharding_lib.data_parallel_size(s.rules, mesh))
  params = s.abstract_state.params
  parameters = (_size(nnx.filter_state(params, s.stage.trainable)), _size(params))
  return s, abstract_batches(config, mesh, s.rules), parameters


def cost_analysis(compiled) -> dict[str, float]:
  """``compiled.cost_analysis()`` as one dict (some JAX versions return a one-element list)."""
  analysis = compiled.cost_analysis()
  return dict(analysis[0] if isinstance(analysis, (list, tuple)) else analysis)


def memory_analysis(compiled) -> Memory:
  stats = compiled.memory_analysis()
  return Memory(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                generated_code=stats.generated_code_size_in_bytes)


def _mesh_axes(sharding: NamedSharding) -> set[str]:
  return {a for entry in sharding.spec if entry
          for a in ((entry,) if isinstance(entry, str) else entry)}


def _shards(sharding: NamedSharding, excluding: Sequence[str] = ()) -> int:
  """Into how many pieces ``sharding`` cuts an array, counting mesh axes not in ``excluding``."""
  return math.prod(sharding.mesh.shape[a] for a in _mesh_axes(sharding) if a not in excluding)


def _nbytes(x) -> int:
  return math.prod(x.shape) * jnp.dtype(x.dtype).itemsize


def _with_shardings(abstract, shardings):
  return zip(jax.tree_util.tree_leaves_with_path(abstract),
             jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)))


def device_bytes(abstract, shardings) -> int:
  """Bytes per device of arrays ``abstract`` placed with ``shardings`` (same structure)."""
  return sum(_nbytes(x) // _shards(sharding)
             for (_, x), sharding in _with_shardings(abstract, shardings))


def communication_bytes(s: trainer.Setup) -> float:
  """What FSDP moves per device and step (received; an analytic count, not XLA's): every
  parameter sharded over ``fsdp`` is all-gathered along it in each pass that reads it (the frozen
  vision tower once, the rest forward and backward, plus once more with per-block remat), and the
  trainable gradients are reduced over the data-parallel devices (a reduce-scatter and an
  all-gather: about twice their share after the other axes' sharding)."""
  fsdp = s.mesh.shape["fsdp"]
  passes = 3 if _remats(s.config) else 2
  total = 0.0
  for (path, x), sharding in _with_shardings(s.abstract_state.params, s.state_sharding.params):
    if "fsdp" in _mesh_axes(sharding):
      reads = 1 if sharding_lib.path_name(path).startswith("vision/") else passes
      total += reads * _nbytes(x) / _shards(sharding, excluding=["fsdp"]) * (fsdp - 1) / fsdp
  replicas = sharding_lib.data_parallel_size(s.rules, s.mesh)
  batch_axes = s.rules.get("batch", ())
  trainable = _with_shardings(nnx.filter_state(s.abstract_state.params, s.stage.trainable),
                              nnx.filter_state(s.state_sharding.params, s.stage.trainable))
  for (_, x), sharding in trainable:
    total += 2 * _nbytes(x) / _shards(sharding, excluding=batch_axes) * (replicas - 1) / replicas
  return total


def bandwidth(chip: Chip, mesh_shape: Mapping[str, int]) -> float:
  """Bytes/s per chip for FSDP's collectives: the slice's ICI on TPU; on GPU, NVLink while the
  fsdp and tensor axes fit in one node, the inter-node network once they do not."""
  if chip.network is None or mesh_shape["fsdp"] * mesh_shape["tensor"] <= GPUS_PER_NODE:
    return chip.interconnect
  return chip.network


def compile_plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], target: str,
                 top: int = 8) -> Plan:
  """Compiles the update step of ``config`` for ``devices`` (a TPU topology's, or CPU devices)
  and reads XLA's memory and cost analyses. Raises ``ValueError`` naming the setting when the
  config does not suit the devices, ``DoesNotFitError`` when the train state alone (exact bytes
  from its shardings, no compile: minutes saved at paper size) or XLA's placement of the step
  exceeds the device memory, and XLA's own error for other compilation failures."""
  mesh = sharding_lib.create_mesh(config.mesh, devices)
  device = mesh.devices.flat[0]
  chip = TPU_CHIPS.get(device.device_kind) if device.platform == "tpu" else None
  share = getattr(device, "num_cores", 1) / chip.cores if chip else 1.0
  s, batches, parameters = _setup(config, mesh)
  state_bytes = device_bytes(s.abstract_state, s.state_sharding)
  if chip and state_bytes > chip.hbm_bytes * share:
    raise DoesNotFitError(f"does not fit: the train state alone takes {_gib(state_bytes)} per "
                          f"device on {target}, which has {_gib(chip.hbm_bytes * share)} (not "
                          f"compiled); use more chips or shard more (config.mesh.fsdp, "
                          f"config.mesh.tensor)")
  state = checkpoint_lib.abstract_with_shardings(s.abstract_state, s.state_sharding)
  seconds = {}
  start = time.perf_counter()
  lowered = jit_train_step(s, batches).lower(state, batches)
  seconds["lower"] = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    raise DoesNotFitError(f"does not fit: XLA cannot place the step in the device memory of "
                          f"{target} ({str(error).splitlines()[0]}); use more chips, shard more "
                          f"(config.mesh.fsdp, config.mesh.tensor) or split each batch "
                          f"(config.microbatches)") from error
  seconds["compile"] = time.perf_counter() - start

  analysis = cost_analysis(compiled)
  predicted = analysis.get("optimal_seconds") if chip else None
  return Plan(
      config=config, target=target,
      method=f"compiled by XLA for {device.device_kind} ({device.platform})",
      mesh_shape=dict(mesh.shape), chip=chip, device_share=share,
      memory=memory_analysis(compiled),
      model_flops=flops_lib.step_flops(config, _shapes(batches)),
      device_flops=float(analysis.get("flops", 0.0)),
      compute_seconds=float(predicted) if predicted else None,
      compute_basis="XLA's cost model: compute and HBM traffic per op",
      communication_bytes=communication_bytes(s),
      largest=sharding_lib.describe(s.abstract_state.params, s.state_sharding.params, top),
      parameters=parameters, batch_shapes=_shapes(batches), seconds=seconds, compiled=compiled)


# -- the analytic estimate (GPU clusters) ---------------------------------------------------------

def _remats(config: ml_collections.ConfigDict) -> bool:
  """Whether blocks recompute their forward in the backward pass. The analytic estimates count
  every remat policy as ``full`` (keep block inputs only, recompute the whole block)."""
  return remat_lib.policy_name(config.model.remat) != "none"


def activation_bytes(config: ml_collections.ConfigDict,
                     shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                     mesh_shape: Mapping[str, int], batch_shards: int) -> int:
  """An estimate of the peak activation bytes per device of one dataset's forward and backward
  (the largest dataset; they run one after the other): block inputs kept for the backward pass
  (every block's, with remat), one block's working set, the f32 logits and their gradient, and
  one frozen vision layer's working set (the tower runs under stop_gradient, nothing is kept)."""
  model, act = config.model, jnp.dtype(config.model.dtype).itemsize
  lm, vision, tensor = model.lm, model.vision, mesh_shape["tensor"]
  blocks = sum(1 for i in range(lm.num_layers) if (i + 1) % model.xattn.every_n_layers == 0)
  vocab = lm.vocab_size + model.num_added_tokens
  peak = 0
  for batch in shapes.values():
    b, length = batch["input_ids"]
    b = max(1, b // batch_shards)
    tokens = b * length
    heads = max(1, lm.num_heads // tensor)
    block = tokens * (4 * lm.embed_dim + 3 * lm.mlp_dim // tensor) * act
    block += b * heads * length * length * 4  # f32 attention probabilities
    per_layer = tokens * lm.embed_dim * act if _remats(config) else block
    kept = (lm.num_layers + blocks) * per_layer
    logits = 3 * tokens * vocab // tensor * 4
    working = block
    if "images" in batch:
      _, t, f = batch["images"][:3]
      patches = (vision.image_size // vision.patch_size) ** 2 + 1
      images = b * t * f
      working = max(working, images * patches * (4 * vision.width + vision.mlp_dim // tensor) * act
                    + images * vision.num_heads * patches * patches * 4)
    peak = max(peak, kept + logits + working)
  return peak


def _remat_flops(config: ml_collections.ConfigDict, shapes) -> float:
  """The forward FLOPs that per-block remat recomputes in the backward pass (LM and gated
  blocks; the frozen vision tower keeps no activations, so recomputes nothing)."""
  if not _remats(config):
    return 0.0
  total = 0.0
  for batch in shapes.values():
    b, length = batch["input_ids"]
    total += flops_lib.lm_forward(config.model.lm, b, length, head=False)
    if config.stage == "flamingo":
      media = batch["images" if "images" in batch else "features"][1]
      total += flops_lib.xattn_forward(config.model, b, length, media)
  return total


def analytic_plan(config: ml_collections.ConfigDict, gpu: str, count: int,
                  top: int = 8) -> Plan:
  """An estimate for ``count`` GPUs of kind ``gpu`` (a ``GPU_CHIPS`` key), without XLA.

  Exact: per-device bytes of the train state (arguments; the outputs alias them by donation) and
  of the batch. Estimated: temporaries (f32 gradients of the trainable shard, optimizer-update
  temporaries of the same size, ``activation_bytes``) and the compute time, a roofline
  max(FLOPs / peak, HBM bytes / bandwidth) with per-block remat recomputation counted.
  """
  if gpu not in GPU_CHIPS:
    raise ValueError(f"--gpu={gpu}:{count}: unknown GPU {gpu!r}; expected one of "
                     f"{sorted(GPU_CHIPS)}")
  chip = GPU_CHIPS[gpu]
  shape = sharding_lib.mesh_shape(config.mesh, count)
  mesh = AbstractMesh(shape, configs.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
  s, batches, parameters = _setup(config, mesh)
  shapes = _shapes(batches)
  state = device_bytes(s.abstract_state, s.state_sharding)
  batch = sum(device_bytes(b, jax.tree.map(lambda x: x.sharding, b)) for b in batches.values())
  trainable = device_bytes(nnx.filter_state(s.abstract_state.params, s.stage.trainable),
                           nnx.filter_state(s.state_sharding.params, s.stage.trainable))
  activations = activation_bytes(config, shapes, dict(mesh.shape),
                                 sharding_lib.data_parallel_size(s.rules, mesh))
  memory = Memory(arguments=state + batch, outputs=state, aliased=state,
                  temporaries=2 * trainable + activations, generated_code=0)

  model_flops = flops_lib.step_flops(config, shapes)
  device_flops = (model_flops + _remat_flops(config, shapes)) / count
  # Each pass (forward, remat forward, backward) reads the tensor-parallel share of every
  # parameter once; the optimizer reads and writes the trainable state.
  params = s.abstract_state.params
  weights = sum(_nbytes(x) for x in jax.tree.leaves(params)) / shape[2]
  passes = 3 if _remats(config) else 2
  hbm_bytes = passes * weights + 6 * trainable + activations
  return Plan(
      config=config, target=f"{count} x {chip.name}",
      method="ANALYTIC ESTIMATE (XLA cannot compile for a GPU cluster here): state and batch "
             "bytes exact from the shardings; activations and times estimated",
      mesh_shape=dict(mesh.shape), chip=chip, device_share=1.0, memory=memory,
      model_flops=model_flops, device_flops=device_flops,
      compute_seconds=max(device_flops / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth),
      compute_basis="roofline max(FLOPs / peak, HBM bytes / bandwidth)",
      communication_bytes=communication_bytes(s),
      largest=sharding_lib.describe(params, s.state_sharding.params, top),
      parameters=parameters, batch_shapes=shapes)


# -- the report -----------------------------------------------------------------------------------

def _gib(n: float) -> str:
  return f"{n / GiB:,.2f} GiB"


def _time(seconds: float) -> str:
  return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def report(plan: Plan) -> str:
  """The plan as the text ``python -m xattn_vlm.plan`` prints."""
  trainable, total = plan.parameters
  batches = ", ".join(f"{name} {shape['input_ids'][0]} x {shape['input_ids'][1]} tokens"
                      for name, shape in plan.batch_shapes.items())
  mem = plan.memory
  lines = [
      f"target: {plan.target}; {plan.method}",
      "mesh: " + " x ".join(f"{k} {v}" for k, v in plan.mesh_shape.items())
      + f" = {plan.num_devices} devices",
      f"parameters: {total:,} ({trainable:,} trainable); batch per step: {batches}",
      "largest parameters (shape -> sharding):",
      *[f"  {line}" for line in plan.largest],
      "memory per device:",
      f"  arguments       {mem.arguments:>18,} B  {_gib(mem.arguments)}",
      f"  outputs         {mem.outputs:>18,} B  {_gib(mem.outputs)}",
      f"  aliased         {mem.aliased:>18,} B  {_gib(mem.aliased)}  (donated, not counted twice)",
      f"  temporaries     {mem.temporaries:>18,} B  {_gib(mem.temporaries)}",
      f"  generated code  {mem.generated_code:>18,} B  {_gib(mem.generated_code)}",
  ]
  if plan.chip is None:
    lines.append(f"  total           {mem.total:>18,} B  {_gib(mem.total)}")
  else:
    lines.append(f"  total           {mem.total:>18,} B  {_gib(mem.total)} of "
                 f"{_gib(plan.device_memory)} HBM per device ({mem.total / plan.device_memory:.0%})"
                 f" -> {'fits' if plan.fits else 'DOES NOT FIT'}")
  lines.append(f"FLOPs per step: {plan.model_flops:.3e} model (analytic, all devices); "
               f"{plan.device_flops:.3e} per device as executed "
               f"(x {plan.num_devices} = {plan.device_flops * plan.num_devices:.3e})")
  if plan.chip is not None:
    lines.append(f"communication per device and step: {_gib(plan.communication_bytes)} "
                 f"(analytic: FSDP gathers, gradient reduction) = "
                 f"{_time(plan.communication_seconds)} at "
                 f"{bandwidth(plan.chip, plan.mesh_shape) * plan.device_share / 1e9:,.0f} GB/s")
  if plan.compute_seconds:
    lines.append(f"compute per step: {_time(plan.compute_seconds)} [{plan.compute_basis}]; "
                 f"{_time(plan.model_flops / plan.num_devices / plan.device_peak)} at 100% MFU")
  if plan.step_seconds:
    fast, slow = plan.step_seconds
    low, high = plan.mfu
    lines.append(f"predicted step time: {_time(fast)} - {_time(slow)} (communication fully / not "
                 f"overlapped); MFU {high:.0%} - {low:.0%} of {plan.device_peak / 1e12:,.1f} "
                 f"TFLOP/s per device ({plan.chip.name} peak)")
  if plan.seconds:
    lines.append("on this host: " + ", ".join(f"{k} {v:.1f} s" for k, v in plan.seconds.items()))
  return "\n".join(lines)


def markdown_row(plan: Plan, config_name: str) -> str:
  """``| config | target | mesh | memory per device | fits | step time | MFU |``."""
  mesh = "x".join(str(v) for v in plan.mesh_shape.values())
  memory = f"{plan.memory.total / GiB:,.1f} GiB"
  if plan.chip is not None:
    memory += f" of {plan.device_memory / GiB:,.0f} ({plan.memory.total / plan.device_memory:.0%})"
  step = mfu = "-"
  if plan.step_seconds:
    step = " - ".join(_time(t) for t in plan.step_seconds)
    mfu = " - ".join(f"{m:.0%}" for m in reversed(plan.mfu))
  return (f"| {config_name} | {plan.target} | {mesh} | {memory} | "
          f"{'yes' if plan.fits else 'NO'} | {step} | {mfu} |")


def summary(plan: Plan) -> dict[str, Any]:
  """The plan's headline figures as JSON-ready values (``python -m xattn_vlm.plan --json``): what
  a table over many targets needs, without the compiled step."""
  return dict(
      target=plan.target, mesh=plan.mesh_shape, devices=plan.num_devices,
      chips=plan.num_devices * plan.device_share,
      chip=None if plan.chip is None else plan.chip.name,
      memory_bytes=plan.memory.total, device_memory_bytes=plan.device_memory, fits=plan.fits,
      model_flops=plan.model_flops, device_flops=plan.device_flops,
      compute_seconds=plan.compute_seconds, communication_seconds=plan.communication_seconds,
      step_seconds=plan.step_seconds, mfu=plan.mfu, host_seconds=plan.seconds)


def does_not_fit_message(plan: Plan) -> str:
  return (f"does not fit: the step needs {_gib(plan.memory.total)} per device on {plan.target}, "
          f"which has {_gib(plan.device_memory)}; use more chips, shard more (config.mesh.fsdp, "
          f"config.mesh.tensor) or split each batch (config.microbatches)")
