"""Plans compiled by XLA: the trainer's own update step (``trainer.setup`` and
``trainer.jit_train_step``: its shardings and donation) lowered and compiled for a list of devices,
a Cloud TPU topology through libtpu (``tpu_devices``; no TPU needed) or this host's CPU devices.
XLA's ``memory_analysis`` gives the per-device memory; its ``cost_analysis`` the per-device FLOPs
and, on TPU, the compute time of XLA's cost model (``optimal_seconds``: compute and HBM traffic of
every op; collectives are not in it)."""

from __future__ import annotations

import os
import time
from typing import Sequence

import jax
import ml_collections
from jax.experimental import topologies

from xattn_vlm import checkpoint as checkpoint_lib
from xattn_vlm.plan import analytic
from xattn_vlm.plan import plans
from xattn_vlm.plan.chips import TPU_CHIPS
from xattn_vlm.plan.report import gib
from xattn_vlm.train import flops as flops_lib
from xattn_vlm.train import sharding as sharding_lib
from xattn_vlm.train import trainer


def allow_libtpu_in_several_processes() -> None:
  """libtpu locks /tmp/libtpu_lockfile so that one process owns the TPU; compiling for a
  topology uses no TPU, so plans (and tests in parallel) may share the library. Call before the
  TPU plugin loads."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def describe_no_local_tpu() -> None:
  """On a host without TPU chips, tells libtpu so (``TPU_ACCELERATOR_TYPE``,
  ``TPU_WORKER_HOSTNAMES``, unless set): otherwise it prints several lines of errors while it
  looks for a TPU VM's metadata, before any plan or one-line error. These describe the local
  host only; what is compiled for comes from the topology."""
  from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
  if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def tpu_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of a Cloud TPU topology such as ``v5p:8x8x8`` (libtpu's compiler; no TPU)."""
  allow_libtpu_in_several_processes()
  describe_no_local_tpu()
  try:
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                               num_slices=num_slices)
  except Exception as error:  # pylint: disable=broad-except  # libtpu raises plain runtime errors
    raise ValueError(
        f"--topology={topology!r}: libtpu cannot describe it ({type(error).__name__}: {error}); "
        f"expected a name such as v4:2x2x1, v5e:4x4, v5p:4x4x4 or v6e:8x8, with libtpu installed "
        f"(pip install -e '.[tpu]')") from error
  return list(description.devices)


def cost_analysis(compiled) -> dict[str, float]:
  """``compiled.cost_analysis()`` as one dict (some JAX versions return a one-element list)."""
  analysis = compiled.cost_analysis()
  return dict(analysis[0] if isinstance(analysis, (list, tuple)) else analysis)


def memory_analysis(compiled) -> plans.Memory:
  stats = compiled.memory_analysis()
  return plans.Memory(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                generated_code=stats.generated_code_size_in_bytes)


def compile_plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], target: str,
                 top: int = 8) -> plans.Plan:
  """Compiles the update step of ``config`` for ``devices`` (a TPU topology's, or CPU devices)
  and reads XLA's memory and cost analyses; a config's mesh that does not fit the devices is
  fitted to them (``plans.fit_mesh``). Raises ``ValueError`` naming the setting when the
  config does not suit the devices, ``DoesNotFitError`` when the train state alone (exact bytes
  from its shardings, no compile: minutes saved at paper size) or XLA's placement of the step
  exceeds the device memory, and XLA's own error for other compilation failures."""
  config, fitted_from = plans.fit_mesh(config, len(devices), target)
  mesh = sharding_lib.create_mesh(config.mesh, devices)
  device = mesh.devices.flat[0]
  chip = TPU_CHIPS.get(device.device_kind) if device.platform == "tpu" else None
  share = getattr(device, "num_cores", 1) / chip.cores if chip else 1.0
  s, batches, parameters = plans.setup(config, mesh)
  state_bytes = plans.device_bytes(s.abstract_state, s.state_sharding)
  if chip and state_bytes > chip.hbm_bytes * share:
    raise plans.DoesNotFitError(
        f"does not fit: the train state alone takes {gib(state_bytes)} per device on {target}, "
        f"which has {gib(chip.hbm_bytes * share)} (not compiled); use more chips or shard more "
        f"(config.mesh.fsdp, config.mesh.tensor)", state_bytes=state_bytes)
  state = checkpoint_lib.abstract_with_shardings(s.abstract_state, s.state_sharding)
  seconds = {}
  start = time.perf_counter()
  weights = {name: dataset.weight for name, dataset in config.data.datasets.items()}
  step = trainer.jit_train_step(s, weights, jax.tree.map(lambda x: x.sharding, batches))
  lowered = step.lower(state, batches)
  seconds["lower"] = time.perf_counter() - start
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as error:
    if "RESOURCE_EXHAUSTED" not in str(error):
      raise
    raise plans.DoesNotFitError(f"does not fit: XLA cannot place the step in the device memory of "
                          f"{target} ({str(error).splitlines()[0]}); use more chips, shard more "
                          f"(config.mesh.fsdp, config.mesh.tensor) or split each batch "
                          f"(config.microbatches)") from error
  seconds["compile"] = time.perf_counter() - start

  analysis = cost_analysis(compiled)
  predicted = analysis.get("optimal_seconds") if chip else None
  device_flops = float(analysis.get("flops", 0.0))
  basis = "XLA's cost model: compute and HBM traffic per op"
  if config.model.get("scan_layers") and device_flops:
    # XLA's cost analysis counts a loop's body once, whatever its trip count.
    executed = analytic.executed_flops(config, plans.shapes(batches)) / len(devices)
    if predicted:
      predicted *= executed / device_flops
    basis += (f", scaled by the analytic FLOPs over XLA's count ({executed / device_flops:.2f}x; "
              "XLA counts each scanned loop's body once)")
    device_flops = executed
  return plans.Plan(
      config=config, target=target,
      method=f"compiled by XLA for {device.device_kind} ({device.platform})",
      mesh_shape=dict(mesh.shape), chip=chip, device_share=share,
      memory=memory_analysis(compiled),
      model_flops=flops_lib.step_flops(config, plans.shapes(batches)),
      device_flops=device_flops,
      compute_seconds=float(predicted) if predicted else None,
      compute_basis=basis,
      communication_bytes=plans.communication_bytes(s),
      largest=sharding_lib.describe(s.abstract_state.params, s.state_sharding.params, top),
      parameters=parameters, batch_shapes=plans.shapes(batches), seconds=seconds, compiled=compiled,
      fitted_from=fitted_from)
