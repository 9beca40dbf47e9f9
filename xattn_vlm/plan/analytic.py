"""The analytic plan of a training step on a GPU cluster, which XLA cannot compile for on this
host: the per-device bytes of the train state and batch are exact (from the trainer's shardings on
an ``AbstractMesh``); activations, peak temporaries and the roofline compute time are estimates,
and every report of it says so."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from xattn_vlm.models import flamingo
from xattn_vlm.plan import plans
from xattn_vlm.plan.chips import GPU_CHIPS
from xattn_vlm.train import configs
from xattn_vlm.train import flops as flops_lib
from xattn_vlm.train import sharding as sharding_lib


def activation_bytes(config: ml_collections.ConfigDict,
                     shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
                     mesh_shape: Mapping[str, int], batch_shards: int) -> int:
  """An estimate of the peak activation bytes per device of one dataset's forward and backward
  (the largest dataset; they run one after the other): block inputs kept for the backward pass
  (every block's, with remat), one block's working set, the f32 logits and their gradient, and
  one frozen vision layer's working set (the tower runs under stop_gradient, nothing is kept)."""
  model, act = config.model, jnp.dtype(config.model.dtype).itemsize
  lm, vision, tensor = model.lm, model.vision, mesh_shape["tensor"]
  blocks = len(flamingo.gated_layers(model))
  vocab = lm.vocab_size + len(model.added_tokens)
  peak = 0
  for batch in shapes.values():
    b, length = batch["input_ids"]
    b = max(1, b // batch_shards)
    tokens = b * length
    heads = max(1, lm.num_heads // tensor)
    block = tokens * (4 * lm.embed_dim + 3 * lm.mlp_dim // tensor) * act
    block += b * heads * length * length * 4  # f32 attention probabilities
    per_layer = tokens * lm.embed_dim * act if plans.remats(config) else block
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
  if not plans.remats(config):
    return 0.0
  total = 0.0
  for batch in shapes.values():
    b, length = batch["input_ids"]
    total += flops_lib.lm_forward(config.model.lm, b, length, head=False)
    if config.stage == "flamingo":
      media = batch["images" if "images" in batch else "features"][1]
      total += flops_lib.xattn_forward(config.model, b, length, media)
  return total


def executed_flops(config: ml_collections.ConfigDict, shapes) -> float:
  """The step's FLOPs on all devices as executed: the model's and what remat recomputes."""
  return flops_lib.step_flops(config, shapes) + _remat_flops(config, shapes)


def analytic_plan(config: ml_collections.ConfigDict, gpu: str, count: int,
                  top: int = 8) -> plans.Plan:
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
  config, fitted_from = plans.fit_mesh(config, count, f"{count} x {chip.name}")
  shape = sharding_lib.mesh_shape(config.mesh, count)
  mesh = AbstractMesh(shape, configs.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
  s, batches, parameters = plans.setup(config, mesh)
  shapes = plans.shapes(batches)
  state = plans.device_bytes(s.abstract_state, s.state_sharding)
  batch = sum(plans.device_bytes(b, jax.tree.map(lambda x: x.sharding, b))
              for b in batches.values())
  train_filter = s.stage.trainable(s.config)
  trainable = plans.device_bytes(nnx.filter_state(s.abstract_state.params, train_filter),
                                 nnx.filter_state(s.state_sharding.params, train_filter))
  activations = activation_bytes(config, shapes, dict(mesh.shape),
                                 sharding_lib.data_parallel_size(s.rules, mesh))
  memory = plans.Memory(arguments=state + batch, outputs=state, aliased=state,
                  temporaries=2 * trainable + activations, generated_code=0)

  model_flops = flops_lib.step_flops(config, shapes)
  device_flops = executed_flops(config, shapes) / count
  # Each pass (forward, remat forward, backward) reads the tensor-parallel share of every
  # parameter once; the optimizer reads and writes the trainable state.
  params = s.abstract_state.params
  weights = sum(plans.nbytes(x) for x in jax.tree.leaves(params)) / shape[2]
  passes = 3 if plans.remats(config) else 2
  hbm_bytes = passes * weights + 6 * trainable + activations
  return plans.Plan(
      config=config, target=f"{count} x {chip.name}",
      method="ANALYTIC ESTIMATE (XLA cannot compile for a GPU cluster here): state and batch "
             "bytes exact from the shardings; activations and times estimated",
      mesh_shape=dict(mesh.shape), chip=chip, device_share=1.0, memory=memory,
      model_flops=model_flops, device_flops=device_flops,
      compute_seconds=max(device_flops / chip.peak_flops, hbm_bytes / chip.hbm_bandwidth),
      compute_basis="roofline max(FLOPs / peak, HBM bytes / bandwidth)",
      communication_bytes=plans.communication_bytes(s),
      largest=sharding_lib.describe(params, s.state_sharding.params, top),
      parameters=parameters, batch_shapes=shapes, fitted_from=fitted_from)
