"""The trainer: one loop for every stage, reading top to bottom as big_vision's.

mesh -> data -> abstract init (``nnx.eval_shape``) -> shardings -> resume or jitted init with
``out_shardings`` (+ pretrained towers) -> jitted update step (donated state) -> loop with metrics,
async checkpoints and preemption handling.

The update takes gradients w.r.t. the stage's trainable parameters only, per dataset of the
mixture and per microbatch, and sums ``lambda_m * grad(loss_m)`` (``loss_m``: the dataset batch's
mean over supervised tokens). A step whose loss or gradient norm is NaN/Inf leaves parameters and
optimizer state untouched and is counted; ``config.max_nonfinite_in_a_row`` such steps in a row
stop the run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
import tqdm
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from xattn_vlm import checkpoint
from xattn_vlm import console
from xattn_vlm import lock
from xattn_vlm.models import layers
from xattn_vlm.models import scan
from xattn_vlm.models import parameters
from xattn_vlm.train import checkpoint as checkpoint_lib
from xattn_vlm.train import configs
from xattn_vlm.train import flops as flops_lib
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import metrics as metrics_lib
from xattn_vlm.train import optimizer as optimizer_lib
from xattn_vlm.train import sharding as sharding_lib
from xattn_vlm.train import stages as stages_lib

_log = logging.getLogger(__name__)


@struct.dataclass
class TrainState:
  """Everything a step changes, as one pytree (what a checkpoint holds)."""
  step: jax.Array  # int32 []: updates attempted (skipped ones included)
  params: nnx.State  # every parameter, trainable and frozen
  opt_state: Any  # optimizer state of the trainable parameters only
  skipped: jax.Array  # int32 []: steps skipped for a NaN/Inf loss or gradient
  skipped_in_a_row: jax.Array  # int32 []


@dataclasses.dataclass(frozen=True)
class Setup:
  """What a config determines before any array exists: the mesh, the stage, the model's graph,
  the optimizer, and the abstract train state with its shardings."""
  config: ml_collections.ConfigDict
  mesh: Mesh
  rules: dict[str, tuple[str, ...]]
  stage: stages_lib.Stage
  graphdef: nnx.GraphDef
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  abstract_state: TrainState
  state_sharding: TrainState


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises on a setting the trainer does not know (a typo would otherwise be ignored) and on
  values that cannot work, naming the setting."""
  def walk(given, known, prefix):
    for key in given:
      if key not in known:
        raise ValueError(f"{prefix}.{key}: unknown setting; expected one of {sorted(known)}")
      if (isinstance(known[key], ml_collections.ConfigDict) and known[key]
          and prefix + "." + key not in ("config.model", "config.contrastive.text")):
        walk(given[key], known[key], f"{prefix}.{key}")
  walk(config, configs.base_config(), "config")
  stage = stages_lib.get_stage(config.stage)
  for name in ("total_steps", "microbatches", "log_every_steps", "max_nonfinite_in_a_row"):
    if config[name] < 1:
      raise ValueError(f"config.{name}: expected >= 1, got {config[name]}")
  if not stage.splits_into_microbatches and config.microbatches != 1:
    raise ValueError(f"config.microbatches: the {stage.name} loss needs the whole batch at once "
                     f"(contrastive negatives); expected 1, got {config.microbatches}")
  if config.data.max_tokens > config.model.lm.max_length:
    raise ValueError(f"config.data.max_tokens={config.data.max_tokens} exceeds "
                     f"config.model.lm.max_length={config.model.lm.max_length}")
  max_num_media = config.model.resampler.max_num_media
  if max_num_media and config.data.max_images > max_num_media:
    raise ValueError(f"config.data.max_images={config.data.max_images} exceeds "
                     f"config.model.resampler.max_num_media={config.model.resampler.max_num_media}")


def check_batch_sizes(config: ml_collections.ConfigDict, data_parallel: int) -> None:
  """Every dataset's global batch must split over the data-parallel devices and microbatches."""
  multiple = data_parallel * config.microbatches
  for name, dataset in config.data.datasets.items():
    if dataset.batch_size % multiple:
      raise ValueError(
          f"config.data.datasets.{name}.batch_size={dataset.batch_size} is not divisible by "
          f"data-parallel size x microbatches = {data_parallel} x {config.microbatches}; use a "
          f"multiple of {multiple}")


def setup(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Setup:
  """Mesh, abstract train state and shardings, with the FSDP check; nothing is materialised.

  ``mesh`` defaults to ``config.mesh`` over this machine's devices; an ``AbstractMesh`` checks a
  config for a larger machine (its shardings then describe, but cannot place, arrays).
  """
  check_config(config)
  mesh = sharding_lib.create_mesh(config.mesh) if mesh is None else mesh
  rules = sharding_lib.parse_rules(config.sharding.rules)
  stage = stages_lib.get_stage(config.stage)
  tx, schedule = optimizer_lib.create_optimizer(config.optimizer, config.total_steps)

  model = nnx.eval_shape(lambda: stage.build_model(config, nnx.Rngs(config.seed)))
  graphdef, params = nnx.split(model, nnx.Param)
  trainable = nnx.filter_state(params, stage.trainable(config))
  params_sharding = sharding_lib.param_shardings(params, mesh, rules)
  opt_state = jax.eval_shape(tx.init, trainable)
  opt_sharding = sharding_lib.opt_state_shardings(
      tx, opt_state, nnx.filter_state(params_sharding, stage.trainable(config)), mesh)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  replicated = NamedSharding(mesh, P())
  abstract_state = TrainState(step=scalar, params=params, opt_state=opt_state, skipped=scalar,
                              skipped_in_a_row=scalar)
  state_sharding = TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding,
                              skipped=replicated, skipped_in_a_row=replicated)

  sharding_lib.check_fsdp(params, params_sharding, mesh, config.sharding.fsdp_min_size)
  _log.info("mesh %s; largest parameters:\n  %s", dict(mesh.shape),
               "\n  ".join(sharding_lib.describe(params, params_sharding)))
  _log.info("parameters: %s trainable, %s frozen", f"{parameters.size(trainable):,}",
               f"{parameters.size(params) - parameters.size(trainable):,}")
  return Setup(config, mesh, rules, stage, graphdef, tx, schedule, abstract_state, state_sharding)


def create_train_state(s: Setup) -> TrainState:
  """A fresh state, initialised directly into its shardings (jit with ``out_shardings``), with
  the stage's pretrained parameters loaded in place of random ones."""
  towers = s.stage.pretrained(s.config)
  loaded = {tower.target for tower in towers}

  def without_loaded(params: nnx.State) -> nnx.State:
    # What a pretrained tower replaces is never an output, so XLA drops its random init: a
    # frozen 30-layer LM's took longer to compile and run than loading the file.
    if "" in loaded:  # the whole model
      return nnx.State({})
    kept = jax.tree.map(lambda x: x, params)  # a copy to pop from
    for target in loaded:
      kept.pop(target)
    return kept

  def init():
    model = s.stage.build_model(s.config, nnx.Rngs(s.config.seed))
    params = nnx.state(model, nnx.Param)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=without_loaded(params),
                      opt_state=s.tx.init(nnx.filter_state(params, s.stage.trainable(s.config))),
                      skipped=zero, skipped_in_a_row=zero)

  sharding = dataclasses.replace(s.state_sharding,
                                 params=without_loaded(s.state_sharding.params))
  state = jax.jit(init, out_shardings=sharding)()
  for tower in towers:
    if tower.target:
      state.params[tower.target] = load_pretrained(s, tower)
    else:
      state = dataclasses.replace(state, params=load_pretrained(s, tower))
  return state


def load_pretrained(s: Setup, tower: stages_lib.Pretrained) -> nnx.State:
  """The parameters of ``tower`` (an earlier run's or a Hugging Face folder's), placed with the
  train state's shardings of ``tower.target`` ('' = all parameters)."""
  sharding = s.state_sharding.params[tower.target] if tower.target else s.state_sharding.params
  abstract = s.abstract_state.params[tower.target] if tower.target else s.abstract_state.params
  if tower.hf_loader is not None:
    module = nnx.eval_shape(lambda: stages_lib.build_tower(s.config, tower.model_key))
    tower.hf_loader(module, tower.path)
    # The tower is built unrolled; a scanned model takes its layers stacked.
    loaded = jax.device_put(scan.layout(nnx.state(module, nnx.Param),
                                        bool(scan.scanned_layout(abstract))), sharding)
  else:
    target = checkpoint.abstract_with_shardings(abstract, sharding)
    loaded = checkpoint.load_params(
        tower.path, target, source=tower.source, stage=tower.stage,
        model_key=tower.model_key, config=s.config, setting=tower.setting)
  _log.info("%s: loaded from %s", tower.target or "all parameters", tower.path)
  return loaded


def _microbatches(batch: Mapping[str, jax.Array], k: int, mesh: Mesh,
                  batch_axes) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...], microbatch j holding rows j, j+k, ...: every device keeps its own
  rows, so splitting moves no data."""
  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    spec = P(None, batch_axes, *([None] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
  return {key: split(x) for key, x in batch.items()}


def make_train_step(s: Setup, weights: Mapping[str, float]) -> Callable:
  """The update ``(state, {name: batch}) -> (state, metrics)``, not yet jitted; the model's
  activations at block boundaries are constrained to the mesh by the parameters' rules
  (``sharding.activation_constraint``)."""
  stage, config, graphdef = s.stage, s.config, s.graphdef
  k = config.microbatches
  batch_axes = sharding_lib.batch_spec(s.rules, s.mesh)[0]
  constraint = sharding_lib.activation_constraint(s.mesh, s.rules)

  def train_step(state: TrainState, batches):
    with layers.activation_sharding(constraint):
      return update(state, batches)

  def update(state: TrainState, batches):
    trainable, frozen = nnx.split_state(state.params, stage.trainable(config), ...)

    def loss_and_grad(micro):
      loss_sum = lambda p: stage.loss_sum(nnx.merge(graphdef, p, frozen), micro)
      return jax.value_and_grad(loss_sum)(trainable)

    def accumulate(carry, micro):
      loss_sum, grads = loss_and_grad(micro)
      return (carry[0] + loss_sum, jax.tree.map(jnp.add, carry[1], grads)), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, total, metrics = zeros, jnp.zeros((), jnp.float32), {}
    for name in sorted(batches):
      batch = batches[name]
      denominator = jnp.maximum(stage.normalizer(batch), 1.0)  # no supervised token: loss 0
      if k == 1:
        loss_sum, batch_grads = loss_and_grad(batch)
      else:
        init = (jnp.zeros((), jnp.float32), zeros)
        (loss_sum, batch_grads), _ = jax.lax.scan(accumulate, init,
                                                  _microbatches(batch, k, s.mesh, batch_axes))
      scale = weights[name] / denominator
      grads = jax.tree.map(lambda g, b: g + scale * b, grads, batch_grads)
      metrics[f"loss/{name}"] = loss_sum / denominator
      total += weights[name] * metrics[f"loss/{name}"]

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)

    def apply_update(old):
      updates, opt_state = s.tx.update(grads, old[1], old[0])
      return optax.apply_updates(old[0], updates), opt_state

    # A cond, not a select between new and old values: selecting made XLA copy the whole
    # (donated) optimizer state every step to keep the old values alive next to the new ones.
    trainable, opt_state = jax.lax.cond(finite, apply_update, lambda old: old,
                                        (trainable, state.opt_state))
    params = nnx.merge_state(trainable, frozen)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           skipped=skipped,
                           skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1))
    metrics.update(loss=total, grad_norm=grad_norm, skipped=skipped,
                   skipped_in_a_row=new_state.skipped_in_a_row,
                   learning_rate=s.schedule(state.step - state.skipped),
                   **stage.model_metrics(config, params))
    return new_state, metrics

  return train_step


def jit_train_step(s: Setup, weights: Mapping[str, float], batch_shardings) -> Callable:
  """The update step as the trainer runs it: jitted with the state donated, the state's
  shardings in and out, and batches sharded as ``batch_shardings`` (the planner compiles this
  very function for other machines)."""
  return jax.jit(make_train_step(s, weights), donate_argnums=(0,),
                 in_shardings=(s.state_sharding, batch_shardings),
                 out_shardings=(s.state_sharding, NamedSharding(s.mesh, P())))


class PreemptionGuard:
  """Turns SIGTERM/SIGINT into a request to save and stop at the end of the current step.

  On several processes JAX's preemption service (``jax.distributed``) catches the signal and every
  process agrees on the step through Orbax's ``reached_preemption``; on one process a signal
  handler sets a flag.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}
    if jax.process_count() == 1:
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    _log.warning("received %s: saving a checkpoint and stopping after this step",
                    signal.Signals(signum).name)
    self.signal = signum

  def requested(self, step: int, manager) -> bool:
    if jax.process_count() > 1:
      return manager.reached_preemption(step)
    return self.signal is not None

  def close(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class _Reporter:
  """Per-step metrics, fetched one step late (the device keeps working meanwhile): NaN guard,
  throughput and MFU, TensorBoard / metrics.jsonl every ``log_every_steps``, the progress bar."""

  def __init__(self, s: Setup, workdir: str, first_step: int, peak: float):
    config = s.config
    self.config = config
    self.devices = s.mesh.size
    self.peak = peak
    self.writer = metrics_lib.MetricWriter(workdir)
    self.bar = tqdm.tqdm(total=config.total_steps, initial=first_step, unit="step",
                         disable=not config.progress_bar or jax.process_index() != 0)
    self.step_flops = None
    self.tokens = self.examples = 0
    self.window: list[float] = []
    self.last_time = None
    self.last_loss: float | None = None

  def set_shapes(self, shapes) -> None:
    self.step_flops = flops_lib.step_flops(self.config, shapes)
    self.tokens = sum(math.prod(b["input_ids"]) for b in shapes.values())
    self.examples = sum(b["input_ids"][0] for b in shapes.values())

  def report(self, step: int, metrics, last: bool) -> None:
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    self.last_loss = scalars["loss"]
    now = time.perf_counter()
    if self.last_time is not None:  # the first step's time includes compilation
      self.window.append(now - self.last_time)
    self.last_time = now
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", refresh=False)
    if scalars["skipped_in_a_row"] >= self.config.max_nonfinite_in_a_row:
      raise FloatingPointError(
          f"{int(scalars['skipped_in_a_row'])} steps in a row (up to step {step}) had a NaN/Inf "
          f"loss or gradient and were skipped (config.max_nonfinite_in_a_row="
          f"{self.config.max_nonfinite_in_a_row}); parameters and checkpoints hold the last "
          f"finite update. Check the data, or lower config.optimizer.learning_rate")
    if step % self.config.log_every_steps and not last:
      return
    if self.window:
      seconds = sum(self.window) / len(self.window)
      tflops = self.step_flops / seconds / self.devices / 1e12
      scalars.update(step_time=seconds, tokens_per_second=self.tokens / seconds,
                     examples_per_second=self.examples / seconds,
                     tflops_per_device=tflops, mfu=tflops * 1e12 / self.peak)
      self.window = []
    self.writer.write(step, scalars)

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final
  state. Stops early, with a checkpoint, on SIGTERM/SIGINT. Holds ``workdir``'s lock throughout
  (``xattn_vlm.lock``): a second run there fails at start, naming the one that holds it."""
  with lock.hold(workdir, "--workdir"):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  s = setup(config)
  check_batch_sizes(config, sharding_lib.data_parallel_size(s.rules, s.mesh))
  iterator = input_pipeline.create_iterator(config)
  checkpointer = checkpoint_lib.Checkpointer(workdir, config.checkpoint)
  checkpointer.check_compatible(config)
  target = checkpoint.abstract_with_shardings(s.abstract_state, s.state_sharding)
  restored = checkpointer.restore_latest(target, iterator)
  if restored is None:
    state = create_train_state(s)
    _log.info("starting %s from scratch in %s", config.stage, workdir)
  else:
    state, step = restored
    _log.info("resumed %s from step %d in %s", config.stage, step, workdir)
  started = time.perf_counter()

  spec = sharding_lib.batch_spec(s.rules, s.mesh)
  compiled = None
  peak = config.peak_flops_per_device or flops_lib.measure_matmul_peak()
  step = int(jax.device_get(state.step))
  reporter = _Reporter(s, workdir, step, peak)
  guard = PreemptionGuard()
  first_step = step
  if step < config.total_steps:
    console.say(f"{config.stage}: training steps {step + 1}-{config.total_steps} in {workdir}")
  pending, saved_step = None, step
  try:
    while step < config.total_steps:
      batches = sharding_lib.global_batch(next(iterator), s.mesh, spec)
      if compiled is None:
        compiled = jit_train_step(s, iterator.weights,
                                  jax.tree.map(lambda x: x.sharding, batches))
        reporter.set_shapes(jax.tree.map(lambda x: x.shape, batches))
      state, metrics = compiled(state, batches)
      step += 1
      if pending is not None:
        reporter.report(*pending, last=False)
      pending = (step, metrics)
      if checkpointer.due(step):  # the step's metrics row first: a kill after its save keeps both
        reporter.report(*pending, last=True)
        pending = None
      if checkpointer.save(step, state, iterator, config):
        saved_step = step
      if guard.requested(step, checkpointer.manager):
        break
    if pending is not None:
      reporter.report(*pending, last=True)
    if saved_step != step:
      checkpointer.save(step, state, iterator, config, force=True)
  finally:
    guard.close()
    try:
      checkpointer.wait()
    finally:
      checkpointer.close()
      reporter.close()
      iterator.close()
  if config.plots and jax.process_index() == 0 and step > first_step:
    metrics_lib.plot(workdir)
  if step > first_step:
    how = "stopped by " + signal.Signals(guard.signal).name if guard.signal else "done"
    loss = f", loss {reporter.last_loss:.4f}" if reporter.last_loss is not None else ""
    console.say(f"{config.stage}: {how} at step {step} after "
                f"{time.perf_counter() - started:.0f} s{loss}; checkpoint in {workdir}")
  return state
