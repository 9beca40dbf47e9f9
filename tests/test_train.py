"""The trainer in-process on 8 forced CPU devices: sharding, restore onto another mesh, frozen
weights, the NaN guard, start-up checks and the loss pieces. Tiny config (experiments/tiny_test.py).
"""

import importlib.util
import pathlib
import shutil

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType

from xattn_vlm.data.sequence import IGNORE_INDEX
from xattn_vlm.models import flamingo as flamingo_lib
from xattn_vlm.models import scan
from xattn_vlm import checkpoint
from xattn_vlm.train import checkpoint as checkpoint_lib
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import metrics as metrics_lib
from xattn_vlm.train import sharding as sharding_lib
from xattn_vlm.train import stages
from xattn_vlm.train import trainer

from helpers import MESH_222, REPO, SGD, experiment_config, leaves, losses, tiny

@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
  """3 SGD steps of the Flamingo stage on mesh (2, 2, 2)."""
  workdir = tmp_path_factory.mktemp("sharded")
  state = trainer.train(tiny(**MESH_222, **SGD), str(workdir))
  return workdir, state


def test_sharded_equals_single_device(sharded_run, tmp_path):
  """Mesh (2, 2, 2) vs one device, the latter also accumulating 2 microbatches per dataset: the
  same losses and parameters (up to float reassociation)."""
  workdir, sharded = sharded_run
  single = trainer.train(
      tiny(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "microbatches": 2}, **SGD),
      str(tmp_path))
  assert len(jax.tree.leaves(single.params)[0].sharding.device_set) == 1
  np.testing.assert_allclose(losses(tmp_path), losses(workdir), rtol=1e-5, atol=1e-5)
  assert len(losses(workdir)) == 3
  expected = leaves(sharded.params)
  got = leaves(single.params)
  assert got.keys() == expected.keys()
  for name in expected:
    np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-5, err_msg=name)
  # The gates did move: the comparison is not between untouched initial values.
  assert abs(float(sharded.params["gated_blocks"][0]["attn_gate"][...])) > 1e-4


def test_restore_onto_another_mesh(sharded_run):
  """The (2, 2, 2) run's last checkpoint restored onto mesh (1, 4, 2): bit-identical params."""
  workdir, sharded = sharded_run
  restored = trainer.train(
      tiny(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}, **SGD), str(workdir))
  kernel = restored.params["lm"]["blocks"][0]["mlp"]["up"]["kernel"][...]
  assert dict(kernel.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  expected, got = leaves(sharded.params), leaves(restored.params)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_corrupt_latest_checkpoint_falls_back(sharded_run, tmp_path, caplog):
  """Garbage in the latest step's array files: a warning, the step moved aside (not deleted), the
  previous step restored, and the rerun last step reproduces the original parameters."""
  workdir, sharded = sharded_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  data_files = [p for p in (copy / "checkpoints" / "3" / "state").rglob("*")
                if p.is_file() and "d" in p.relative_to(copy).parts]
  assert data_files
  for path in data_files:
    path.write_bytes(b"garbage" * 10)
  state = trainer.train(tiny(**MESH_222, **SGD), str(copy))
  assert "checkpoint step 3" in caplog.text and "cannot be restored" in caplog.text
  assert (copy / "checkpoints_corrupt" / "3").is_dir()
  assert sorted(p.name for p in (copy / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
  expected, got = leaves(sharded.params), leaves(state.params)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_incompatible_workdir_fails_at_start(sharded_run):
  workdir, _ = sharded_run
  config = tiny(**MESH_222, **SGD)
  config.model.lm.num_layers = 3
  with pytest.raises(ValueError, match=r"different model.*config\.model\.lm\.num_layers: saved 2"):
    trainer.train(config, str(workdir))


def test_a_run_resumes_in_the_other_layer_layout(sharded_run, tmp_path):
  """An unrolled run's checkpoint restores into a scanned run (parameters and optimizer state
  bit-identical, the blocks stacked) and training goes on from it; the scanned run's checkpoint
  restores back into the unrolled layout bit-identically."""
  workdir, sharded = sharded_run
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  scanned = {"model.scan_layers": True}
  restored = trainer.train(tiny(**MESH_222, **SGD, **scanned), str(copy))
  kernel = restored.params["lm"]["blocks"]["mlp"]["up"]["kernel"][...]
  assert kernel.shape[0] == tiny().model.lm.num_layers
  assert kernel.sharding.spec[0] is None  # the layers axis is not sharded
  assert jax.tree.structure(restored) == jax.tree.structure(
      scan.layout(sharded, scanned=True))
  expected = leaves(scan.layout(sharded, scanned=True))
  got = leaves(restored)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
  longer = tiny(**MESH_222, **SGD, **scanned, **{"total_steps": 5})
  trained = trainer.train(longer, str(copy))
  assert [row["step"] for row in metrics_lib.read_metrics(str(copy))][-2:] == [4, 5]
  unrolled_again = trainer.train(tiny(**MESH_222, **SGD, **{"total_steps": 5}), str(copy))
  expected = leaves(scan.layout(trained, scanned=False))
  got = leaves(unrolled_again)
  for name in expected:
    np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_another_mixture_fails_at_start_and_keeps_the_checkpoints(sharded_run):
  """A renamed dataset cannot take over the saved iterator position: a clear error at start, not
  a fallback that sets every good checkpoint aside as corrupt and starts again."""
  workdir, _ = sharded_run
  config = tiny(**MESH_222, **SGD)
  datasets = {name: d.to_dict() for name, d in config.data.datasets.items()}
  datasets["captions"] = datasets.pop("pairs")
  config.data.datasets = datasets
  steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
  with pytest.raises(ValueError, match=r"config\.data\.datasets now names \['captions', 'docs'\]"):
    trainer.train(config, str(workdir))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
  assert not (workdir / "checkpoints_corrupt").exists()


def test_frozen_weights_stay_bit_identical(tmp_path):
  """AdamW on the Flamingo stage: the LM and vision tower do not change by a bit, and optimizer
  moments exist for exactly the trainable parameters."""
  config = tiny()
  initial = leaves(trainer.create_train_state(trainer.setup(config)).params)
  state = trainer.train(config, str(tmp_path))
  final = leaves(state.params)
  frozen = leaves(nnx.filter_state(state.params, flamingo_lib.frozen))
  trainable = leaves(nnx.filter_state(state.params, flamingo_lib.trainable))
  assert frozen and trainable and frozen.keys() | trainable.keys() == final.keys()
  for name in frozen:
    np.testing.assert_array_equal(final[name], initial[name], err_msg=name)
  assert any(not np.array_equal(final[n], initial[n]) for n in trainable)

  adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's first state is scale_by_adam's
  for moments in (adam.mu, adam.nu):
    assert leaves(moments).keys() == trainable.keys()
  opt_names = {sharding_lib.path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      state.opt_state)}
  assert not any(name.startswith(("lm/", "vision/")) or "/lm/" in name or "/vision/" in name
                 for name in opt_names)


class _NaNImages(grain.DatasetIterator):
  """Wraps the mixture iterator: the images of the given steps (1-based) become NaN."""

  def __init__(self, iterator, nan_steps):
    super().__init__()
    self.iterator, self.nan_steps, self.step = iterator, set(nan_steps), 0
    self.weights = iterator.weights

  def __next__(self):
    self.step += 1
    batches = next(self.iterator)
    if self.step in self.nan_steps or "all" in self.nan_steps:
      for batch in batches.values():
        batch["images"] = np.full_like(batch["images"], np.nan)
    return batches

  def get_state(self):
    return {"inner": self.iterator.get_state(), "step": self.step}

  def set_state(self, state):
    self.iterator.set_state(state["inner"])
    self.step = state["step"]

  def close(self):
    self.iterator.close()


def test_nan_batch_is_skipped(tmp_path, monkeypatch):
  """A NaN batch at step 2 leaves params and optimizer state as after step 1 (so the step-2
  checkpoint holds step-1 params), is counted, and training goes on; NaN at every step stops the
  run after max_nonfinite_in_a_row steps with a message."""
  create = input_pipeline.create_iterator
  monkeypatch.setattr(input_pipeline, "create_iterator",
                      lambda config: _NaNImages(create(config), [2]))
  config = tiny(**{"checkpoint.every_steps": 1})
  state = trainer.train(config, str(tmp_path))
  assert int(state.skipped) == 1 and int(state.step) == 3
  rows = metrics_lib.read_metrics(str(tmp_path))
  assert [r["skipped"] for r in rows] == [0, 1, 1]
  assert not np.isfinite(rows[1]["loss"]) and np.isfinite(rows[2]["loss"])

  s = trainer.setup(config)
  target = checkpoint.abstract_with_shardings(s.abstract_state.params, s.state_sharding.params)
  tree = {"params": target}
  restore = ocp.args.Composite(state=ocp.args.PyTreeRestore(
      tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree), partial_restore=True))
  checkpointer = checkpoint_lib.Checkpointer(str(tmp_path), config.checkpoint)
  by_step = {step: leaves(checkpointer.manager.restore(step, args=restore).state["params"])
             for step in (1, 2, 3)}
  checkpointer.close()
  for name, value in by_step[2].items():
    assert np.isfinite(value).all(), name
    np.testing.assert_array_equal(value, by_step[1][name], err_msg=name)
  assert any(not np.array_equal(by_step[3][n], by_step[2][n]) for n in by_step[2])

  monkeypatch.setattr(input_pipeline, "create_iterator",
                      lambda config: _NaNImages(create(config), ["all"]))
  config = tiny(**{"max_nonfinite_in_a_row": 2, "total_steps": 5})
  with pytest.raises(FloatingPointError, match=r"2 steps in a row.*max_nonfinite_in_a_row=2"):
    trainer.train(config, str(tmp_path / "all_nan"))


@pytest.mark.parametrize("overrides, message", [
    ({"totl_steps": 5}, r"config\.totl_steps: unknown setting"),
    ({"optimizer.lr": 1.0}, r"config\.optimizer\.lr: unknown setting"),
    ({"mesh.data": 3}, r"config\.mesh: .* must divide the 8 devices"),
    ({"microbatches": 2}, r"batch_size=8 is not divisible by data-parallel size x microbatches"),
    ({"stage": "pretrain"}, r"config\.stage: expected one of"),
    ({"data.datasets.docs.supervise": "answers"},
     r"config\.data\.datasets\.docs\.supervise: expected one of \('all', 'answer'\)"),
])
def test_bad_config_fails_at_start(tmp_path, overrides, message):
  config = tiny(**overrides)
  with pytest.raises(ValueError, match=message):
    trainer.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_text_datasets_refuse_answer_supervision():
  config = tiny("lm_pretrain", **{"data.datasets.text.supervise": "answer"})
  with pytest.raises(ValueError, match=r"config\.data\.datasets\.text\.supervise='answer': "
                                       r"text-only datasets supervise every token"):
    input_pipeline.components(config, input_pipeline.tokenizer_for(config))


def test_tokenizer_must_fit_the_vocabulary():
  """Smaller fails in every stage; larger is padding for an LM, but in the flamingo stage the
  model would look for <image> at the wrong id and silently train without images."""
  tokenizer = input_pipeline.tokenizer_for(tiny("lm_pretrain", **{"model.lm.vocab_size": 2048}))
  assert tokenizer.lm_vocab_size == 1024
  with pytest.raises(ValueError, match=r"config\.model\.lm\.vocab_size=512 is smaller than the "
                                       r"tokenizer's vocabulary \(1024\); set it to at least 1024"):
    input_pipeline.tokenizer_for(tiny("lm_pretrain", **{"model.lm.vocab_size": 512}))
  with pytest.raises(ValueError, match=r"config\.model\.lm\.vocab_size=2048 must equal the "
                                       r"tokenizer's vocabulary \(1024\) in the flamingo stage"):
    input_pipeline.tokenizer_for(tiny("flamingo", **{"model.lm.vocab_size": 2048}))


def test_contrastive_stage_refuses_microbatches():
  with pytest.raises(ValueError, match=r"config\.microbatches: the vision_pretrain loss"):
    trainer.check_config(tiny("vision_pretrain", microbatches=2))


def test_fsdp_check_refuses_replicated_large_params():
  """With fsdp > 1, a large parameter that no rule shards over fsdp is an error at start."""
  config = tiny()
  config.sharding.rules = (("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"),
                           ("heads", "tensor"), ("vocab", "tensor"), ("kv", None),
                           ("latents", None), ("media", None))
  config.sharding.fsdp_min_size = 1024
  mesh = AbstractMesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  with pytest.raises(ValueError, match=r"mesh\.fsdp=4 but parameter .* is not sharded over fsdp"):
    trainer.setup(config, mesh)
  config.sharding.rules = tiny().sharding.rules
  trainer.setup(config, mesh)


def test_logical_to_spec_skips_indivisible_and_reused_axes():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  rules = {"embed": ("fsdp",), "mlp": ("tensor",), "vocab": ("tensor",)}
  assert sharding_lib.logical_to_spec(("embed", "mlp"), (32, 64), rules, sizes) == \
      jax.sharding.PartitionSpec("fsdp", "tensor")
  assert sharding_lib.logical_to_spec(("embed", "mlp"), (30, 5461), rules, sizes) == \
      jax.sharding.PartitionSpec(None, None)
  assert sharding_lib.logical_to_spec(("vocab", "mlp"), (8, 8), rules, sizes) == \
      jax.sharding.PartitionSpec("tensor", None)
  with pytest.raises(ValueError, match="no rule for logical axis 'heads'"):
    sharding_lib.logical_to_spec(("heads",), (8,), rules, sizes)


def test_token_loss_has_a_safe_denominator():
  """A batch with no supervised token gives loss 0 and finite gradients, not NaN."""
  logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
  labels = jnp.full((2, 5), IGNORE_INDEX)
  batch = {"labels": labels}

  def loss(x):
    return stages.next_token_loss_sum(x, labels) / jnp.maximum(stages.supervised_tokens(batch), 1)

  value, grad = jax.value_and_grad(loss)(logits)
  assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()
  labels = labels.at[0, 2].set(3)
  expected = -jax.nn.log_softmax(logits[0, 1])[3]
  np.testing.assert_allclose(stages.next_token_loss_sum(logits, labels), expected, rtol=1e-6)


def test_a_batch_without_supervised_tokens_through_the_trainers_step():
  """The trainer's own jitted update on batches whose every label is ignored: loss 0, gradient 0,
  nothing NaN, the step counted as taken (not skipped) and, under SGD, parameters unchanged."""
  config = tiny(**{"mesh.data": 1}, **SGD)
  s = trainer.setup(config)
  state = trainer.create_train_state(s)
  before = leaves(state.params)
  iterator = input_pipeline.create_iterator(config, process_index=0, process_count=1)
  local = {name: dict(batch, labels=np.full_like(batch["labels"], IGNORE_INDEX))
           for name, batch in next(iterator).items()}
  iterator.close()
  spec = sharding_lib.batch_spec(s.rules, s.mesh)
  batches = sharding_lib.global_batch(local, s.mesh, spec)
  weights = {name: dataset.weight for name, dataset in config.data.datasets.items()}
  step = trainer.jit_train_step(s, weights, jax.tree.map(lambda x: x.sharding, batches))
  state, metrics = step(state, batches)
  metrics = jax.device_get(metrics)
  assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
  assert int(metrics["skipped"]) == 0 and int(state.step) == 1
  after = leaves(state.params)
  for name, value in before.items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)


def test_info_nce_is_symmetric_and_low_for_matching_pairs():
  emb = jnp.eye(4)
  matched = stages.info_nce(emb, emb, jnp.float32(10.0))
  shuffled = stages.info_nce(emb, emb[::-1], jnp.float32(10.0))
  assert float(matched) < 0.01 < float(shuffled)
  a, b = jax.random.normal(jax.random.key(1), (2, 4, 3))
  np.testing.assert_allclose(stages.info_nce(a, b, 2.0), stages.info_nce(b, a, 2.0), rtol=1e-6)


def test_a_relative_workdir_trains_saves_and_loads(tmp_path, monkeypatch):
  """``--workdir=runs/...`` as the README writes it (Orbax itself refuses relative paths)."""
  monkeypatch.chdir(tmp_path)
  config = tiny(**{"total_steps": 2, "checkpoint.every_steps": 1})
  trainer.train(config, "runs/relative")
  assert sorted(p.name for p in (tmp_path / "runs/relative/checkpoints").iterdir()) == ["1", "2"]
  model = checkpoint.load_flamingo("runs/relative")
  assert model.config.lm.num_layers == config.model.lm.num_layers


def _one_step(config):
  """Loss and gradient norm of the trainer's jitted step on the first batches, and the step's
  lowered text."""
  s = trainer.setup(config)
  state = trainer.create_train_state(s)
  iterator = input_pipeline.create_iterator(config, process_index=0, process_count=1)
  local = next(iterator)
  iterator.close()
  batches = sharding_lib.global_batch(local, s.mesh, sharding_lib.batch_spec(s.rules, s.mesh))
  weights = {name: dataset.weight for name, dataset in config.data.datasets.items()}
  step = trainer.jit_train_step(s, weights, jax.tree.map(lambda x: x.sharding, batches))
  text = step.lower(state, batches).as_text()
  _, metrics = step(state, batches)
  metrics = jax.device_get(metrics)
  return float(metrics["loss"]), float(metrics["grad_norm"]), text


def test_activation_constraints_keep_the_loss_of_one_device():
  """Activations at block boundaries are constrained by the parameters' rules (batch over data x
  fsdp, heads and mlp over tensor): on an fsdp mesh of 8 devices, and on fsdp 4 x tensor 2, the
  jitted step holds those constraints and gives the unsharded step's loss and gradient norm."""
  one = _one_step(tiny(**{"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1}))
  fsdp = _one_step(tiny(**{"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}))
  mixed = _one_step(tiny(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}))
  for loss, grad_norm, _ in (fsdp, mixed):
    np.testing.assert_allclose([loss, grad_norm], one[:2], rtol=2e-5)
  # Each LM block's residual stream [B=8, L=32, D=32] in and out, the batch over fsdp.
  residual = '<@mesh, [{"fsdp"}, {}, {}]> : tensor<8x32x32xf32>'
  assert fsdp[2].count(residual) >= 2 * tiny().model.lm.num_layers
  # The LM's attention [B, L, H, Dh] and MLP [B, L, mlp] with heads and mlp over tensor.
  assert '<@mesh, [{"fsdp"}, {}, {"tensor"}, {}]> : tensor<8x32x2x8xf32>' in mixed[2]
  assert '<@mesh, [{"fsdp"}, {}, {"tensor"}]> : tensor<8x32x64xf32>' in mixed[2]


def test_scanned_layers_train_with_the_unrolled_loss_on_an_fsdp_mesh():
  """The trainer's step with ``model.scan_layers`` (the LM's blocks stacked, their ``layers``
  axis unsharded, ``embed`` still over fsdp) gives the unrolled step's loss and gradient norm."""
  mesh = {"mesh.data": 1, "mesh.fsdp": 8, "mesh.tensor": 1}
  unrolled = _one_step(tiny(**mesh))
  scanned = _one_step(tiny(**mesh, **{"model.scan_layers": True}))
  np.testing.assert_allclose(scanned[:2], unrolled[:2], rtol=1e-5)
  assert "stablehlo.while" in scanned[2] and "stablehlo.while" not in unrolled[2]


def test_a_checkpoint_saved_before_scan_layers_existed_is_unrolled():
  saved = checkpoint.config_json(tiny())
  del saved["model"]["scan_layers"]
  assert not checkpoint.saved_scanned(saved)
  scanned = checkpoint.config_json(tiny(**{"model.scan_layers": True}))
  assert checkpoint.saved_scanned(scanned)
  assert checkpoint.model_differences(saved, scanned) == []  # either layout restores
  scanned["stage"] = "lm_pretrain"
  assert not checkpoint.saved_scanned(scanned)  # only the flamingo stage scans
