"""``python -m xattn_vlm.plan``: the training step compiled ahead of time for a Cloud TPU topology
through libtpu (no TPU here), and the analytic estimate for GPU clusters."""

import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from helpers import MESH_222, REPO, SGD, experiment_config, tiny
from xattn_vlm.plan import analytic
from xattn_vlm.plan import compile as compile_lib
from xattn_vlm.plan import plans
from xattn_vlm.plan import report
from xattn_vlm.train import input_pipeline
from xattn_vlm.train import sharding as sharding_lib


@pytest.fixture(scope="module")
def tpu_plan():
  """The tiny config's step compiled for a TPU v5e 2x2 slice (4 chips)."""
  return compile_lib.compile_plan(tiny(), compile_lib.tpu_devices("v5e:2x2"), "TPU topology v5e:2x2")


def test_printed_memory_is_xla_memory_analysis(tpu_plan):
  stats = tpu_plan.compiled.memory_analysis()
  text = report.report(tpu_plan)
  print(text)
  rows = {"arguments": stats.argument_size_in_bytes, "outputs": stats.output_size_in_bytes,
          "aliased": stats.alias_size_in_bytes, "temporaries": stats.temp_size_in_bytes,
          "generated code": stats.generated_code_size_in_bytes}
  for label, value in rows.items():
    assert re.search(rf"^  {label} +{value:,} B ", text, re.M), label
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
           + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)
  assert re.search(rf"^  total +{total:,} B .* of 16\.00 GiB HBM per device .*-> fits$", text,
                   re.M)
  assert tpu_plan.device_flops == compile_lib.cost_analysis(tpu_plan.compiled)["flops"] > 0
  assert "mesh: data 4 x fsdp 1 x tensor 1 = 4 devices" in text
  assert re.search(r"^  lm/token_embed/embedding \(1024, 32\) -> P\(", text, re.M)
  assert re.search(r"^compute per step: [0-9.]+ m?s \[XLA's cost model", text, re.M)
  assert re.search(r"^communication per device and step: .* at 200 GB/s$", text, re.M)
  assert re.search(r"^predicted step time: .* MFU .* of 197\.0 TFLOP/s per device \(TPU v5e peak\)",
                   text, re.M)


def test_a_scanned_step_is_predicted_from_the_full_flop_count():
  """XLA's cost analysis counts a scanned loop's body once: the plan scales its time by the
  analytic FLOPs over XLA's count, which the unrolled step's own count is close to."""
  config = tiny(**{"model.scan_layers": True, "model.lm.num_layers": 4})
  scanned = compile_lib.compile_plan(config, compile_lib.tpu_devices("v5e:2x2"), "v5e:2x2")
  counted = compile_lib.cost_analysis(scanned.compiled)
  executed = analytic.executed_flops(config, scanned.batch_shapes) / 4
  assert counted["flops"] < 0.6 * executed  # four LM and gated blocks counted as one
  assert scanned.device_flops == pytest.approx(executed)
  assert scanned.compute_seconds == pytest.approx(
      counted["optimal_seconds"] * executed / counted["flops"])
  assert "XLA counts each scanned loop's body once" in scanned.compute_basis
  unrolled = compile_lib.compile_plan(tiny(**{"model.lm.num_layers": 4}),
                                      compile_lib.tpu_devices("v5e:2x2"), "v5e:2x2")
  assert unrolled.device_flops == pytest.approx(executed, rel=0.25)


def test_unknown_topology_names_the_flag():
  with pytest.raises(ValueError, match=r"--topology='v9z:2x2': libtpu cannot describe it"):
    compile_lib.tpu_devices("v9z:2x2")


def test_abstract_batches_are_what_the_pipeline_yields():
  config = tiny()
  mesh = sharding_lib.create_mesh(config.mesh)
  rules = sharding_lib.parse_rules(config.sharding.rules)
  abstract = input_pipeline.abstract_batches(config, mesh, rules)
  iterator = input_pipeline.create_iterator(config, process_index=0, process_count=1)
  real = next(iterator)
  iterator.close()
  assert abstract.keys() == real.keys()
  for name, batch in real.items():
    assert {k: (v.shape, np.dtype(v.dtype)) for k, v in batch.items()} == {
        k: (x.shape, np.dtype(x.dtype)) for k, x in abstract[name].items()}, name


@pytest.mark.slow
def test_analytic_state_and_batch_bytes_equal_xla_arguments_on_cpu():
  """On CPU (no padding) the analytic argument bytes, from the shardings alone, are XLA's within
  a few scalars (XLA counts 24 bytes fewer here)."""
  config = tiny(**MESH_222, **SGD)  # test_train's sharded run: its compiled step is cached
  compiled = compile_lib.compile_plan(config, jax.devices(), "8 CPU devices")
  estimate = analytic.analytic_plan(config, "H100", 8)
  assert compiled.chip is None and compiled.fits
  assert 0 <= estimate.memory.arguments - compiled.memory.arguments <= 4 * 8


@pytest.mark.slow
def test_a_step_that_does_not_fit_the_tpu_exits_1_with_xla_reason():
  """The tiny model with 2**18 sequences per dataset: XLA refuses it for 4 v5e chips."""
  result = subprocess.run(
      [sys.executable, "-m", "xattn_vlm.plan", "--config=experiments/tiny_test.py",
       "--topology=v5e:2x2", "--config.data.datasets.docs.batch_size=262144",
       "--config.data.datasets.pairs.batch_size=262144"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr[-3000:]
  assert re.search(r"does not fit: XLA cannot place the step in the device memory of TPU "
                   r"topology v5e:2x2 \(RESOURCE_EXHAUSTED: .*\); use more chips", result.stderr)


def test_gpu_estimate_is_labelled_and_a_step_that_does_not_fit_exits_1():
  result = subprocess.run(
      [sys.executable, "-m", "xattn_vlm.plan", "--config=experiments/flamingo_80b.py:mesh=gpu",
       "--gpu=H100:8", "--config.mesh.data=1", "--config.mesh.fsdp=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "ANALYTIC ESTIMATE" in result.stdout
  assert re.search(r"-> DOES NOT FIT$", result.stdout, re.M)
  assert "does not fit: the step needs" in result.stderr
  assert "on 8 x H100, which has 74.51 GiB" in result.stderr


def test_gpu_estimate_of_80b_on_1024_h100s_fits():
  config = experiment_config("flamingo_80b", "mesh=gpu")
  plan = analytic.analytic_plan(config, "H100", 1024)
  assert plan.mesh_shape == {"data": 1, "fsdp": 128, "tensor": 8}
  assert plan.fits and 0 < plan.mfu[0] <= plan.mfu[1] < 1
  # The frozen LM's largest matrices, stacked over its 80 layers, are sharded over fsdp and tensor.
  assert re.search(r"\(80, \d+, \d+\) -> P\(None, '(fsdp', 'tensor|tensor', 'fsdp)'\)",
                   plan.largest[1]), plan.largest


def test_cli_needs_exactly_one_target():
  result = subprocess.run(
      [sys.executable, "-m", "xattn_vlm.plan", "--config=experiments/tiny_test.py",
       "--gpu=H100:8", "--cpu_devices=8"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.strip() == ("xattn-plan: error: expected exactly one of --topology, "
                                   "--cpu_devices, --gpu; got ['--cpu_devices', '--gpu']")


def test_a_train_state_larger_than_hbm_is_refused_before_compiling():
  """Flamingo-80B's f32 state on 4 v5e chips without fsdp: exact bytes from the shardings."""
  config = experiment_config("flamingo_80b", "mesh=tpu")
  config.mesh.update(data=4, fsdp=1, tensor=1)
  with pytest.raises(plans.DoesNotFitError,
                     match=r"the train state alone takes [0-9,.]+ GiB per device on v5e:2x2, "
                           r"which has 16\.00 GiB \(not compiled\)"):
    compile_lib.compile_plan(config, compile_lib.tpu_devices("v5e:2x2"), "v5e:2x2")


@pytest.mark.parametrize("remat", ["full", "dots_with_no_batch_dims_saveable"])
def test_the_train_step_compiles_under_remat(remat):
  """Remat'd blocks inside the jitted, sharded train step (the paper configs use ``full``)."""
  config = tiny(**{"model.remat": remat})
  compiled = compile_lib.compile_plan(config, jax.devices()[:1], "1 CPU device")
  assert compiled.fits and compiled.device_flops > 0


def test_analytic_plan_counts_recomputation_only_under_remat():
  none = analytic.analytic_plan(tiny(**{"model.remat": "none"}), "H100", 8)
  full = analytic.analytic_plan(tiny(**{"model.remat": "full"}), "H100", 8)
  assert none.model_flops == full.model_flops
  assert none.device_flops * 8 == pytest.approx(none.model_flops)
  assert full.device_flops > none.device_flops


def _mesh(**sizes):
  return ml_collections.ConfigDict(dict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1), **sizes))


def test_a_mesh_larger_than_the_slice_is_fitted_keeping_tensor():
  fit = sharding_lib.fitted_mesh_shape
  paper = _mesh(fsdp=128, tensor=8)
  assert fit(paper, 2048) == sharding_lib.mesh_shape(paper, 2048) == (2, 128, 8)
  assert fit(paper, 512) == (1, 64, 8)
  assert fit(paper, 96) == (1, 12, 8)  # the largest fsdp that divides what tensor leaves
  assert fit(_mesh(data=4, fsdp=8, tensor=2), 8) == (1, 4, 2)
  assert fit(_mesh(data=4, fsdp=-1, tensor=4), 8) == (1, 2, 4)
  assert fit(_mesh(fsdp=128, tensor=8, dcn_data=2), 64) == (2, 4, 8)  # 32 devices per slice
  with pytest.raises(ValueError, match=r"config\.mesh: data x fsdp x tensor = -1 x 128 x 8 does "
                                       r"not fit 4 devices, and tensor=8 cannot be kept on the 4 "
                                       r"devices; set config\.mesh\.tensor to a divisor of 4"):
    fit(paper, 4)
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn_data=3: expected a number of slices "
                                       r"that divides the 64 devices"):
    fit(_mesh(fsdp=128, tensor=8, dcn_data=3), 64)


def _plan_cli(*args):
  return subprocess.run([sys.executable, "-m", "xattn_vlm.plan", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_plan_of_80b_on_a_smaller_slice_fits_the_mesh_or_fails_in_one_line():
  """Flamingo-80B's TPU mesh (fsdp 128 x tensor 8) on 8 v5e chips: planned on data 1 x fsdp 1 x
  tensor 8, which the train state alone overfills (no compile); on 4 chips tensor 8 cannot be
  kept: one line naming config.mesh and the device count, exit 2."""
  fitted = _plan_cli("--config=experiments/flamingo_80b.py", "--topology=v5e:2x4")
  assert fitted.returncode == 1, fitted.stderr[-3000:]
  assert ("config.mesh data -1 x fsdp 128 x tensor 8 does not fit the 8 devices of TPU topology "
          "v5e:2x4; planning data 1 x fsdp 1 x tensor 8") in fitted.stdout
  (line,) = fitted.stderr.splitlines()  # libtpu, told there is no TPU here, stays quiet
  assert line.startswith("does not fit: the train state alone takes")
  failed = _plan_cli("--config=experiments/flamingo_80b.py", "--topology=v5e:2x2")
  assert failed.returncode == 2, failed.stderr[-3000:]
  assert failed.stderr.splitlines() == [(
      "xattn-plan: error: config.mesh: data x fsdp x tensor = -1 x 128 x 8 does not fit 4 "
      "devices, and tensor=8 cannot be kept on the 4 devices; set config.mesh.tensor to a "
      "divisor of 4")]


def test_80b_on_128_chips_shards_its_largest_parameters_over_fsdp_and_tensor():
  """The plan's setup of Flamingo-80B on a v5p 4x4x8 slice, abstract only (``jax.eval_shape``,
  no compile): the mesh fitted to data 1 x fsdp 16 x tensor 8, every large parameter cut into
  128 pieces, and the train state a 128th of its unsharded size per chip."""
  config = experiment_config("flamingo_80b", "mesh=tpu")
  devices = compile_lib.tpu_devices("v5p:4x4x8")
  config, fitted_from = plans.fit_mesh(config, len(devices), "v5p:4x4x8")
  assert fitted_from == "data -1 x fsdp 128 x tensor 8"
  mesh = sharding_lib.create_mesh(config.mesh, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 16, "tensor": 8}
  s, batches, (_, total) = plans.setup(config, mesh)
  assert total > 70e9
  params, shardings = s.abstract_state.params, s.state_sharding.params
  largest = sharding_lib.describe(params, shardings, top=4)
  # Scanned: the 80 LM blocks stacked, their layers axis unsharded.
  assert all(re.search(r"^lm/blocks/\S+ \(80, .* -> P\(None, '(fsdp', 'tensor|tensor', 'fsdp)'",
                       line) for line in largest), largest
  for (path, x), sharding in plans.with_shardings(params, shardings):
    if x.size >= 2**24:
      assert isinstance(sharding, NamedSharding) and sharding.mesh.shape == mesh.shape
      pieces = x.size // np.prod(sharding.shard_shape(x.shape))
      assert pieces == 128, (sharding_lib.path_name(path), sharding.spec)
  unsharded = sum(plans.nbytes(x) for x in jax.tree.leaves(s.abstract_state))
  per_chip = plans.device_bytes(s.abstract_state, s.state_sharding)
  assert unsharded / 128 <= per_chip < 1.01 * unsharded / 128
  assert batches["interleaved"]["input_ids"].sharding.spec == P("fsdp", None)
