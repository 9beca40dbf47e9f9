"""``python -m xattn_vlm.plan --config=experiments/<name>.py[:preset] TARGET``: does it fit, how fast?

Compiles the trainer's update step ahead of time for a target and prints per-device memory
(against the chip's HBM), FLOPs per step, how the largest parameters are sharded, and the
predicted step time and MFU; exits 1 when the step does not fit (``--json=FILE`` also writes the
headline figures there, for ``benchmarks/plan_table.py``). TARGET is one of:

  --topology=v5p:8x8x8  a Cloud TPU slice, compiled by libtpu on this host (no TPU needed;
                        pip install -e '.[tpu]'); --num_slices=N for N such slices over DCN
  --cpu_devices=8       this host's CPU with that many forced devices
  --gpu=H100:1024       an analytic estimate, labelled as such (XLA cannot compile for a GPU
                        cluster here)

Config overrides work as in training, e.g. ``--config.mesh.fsdp=64 --config.mesh.data=-1``.
"""

import json
import sys

from absl import flags
import jax
from ml_collections import config_flags

from xattn_vlm import cli
from xattn_vlm.plan import analytic
from xattn_vlm.plan import compile as compile_lib
from xattn_vlm.plan import plans
from xattn_vlm.plan import report

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("topology", None, "Cloud TPU topology, e.g. v5e:16x16 or v5p:8x8x8.")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology (data parallel over DCN).")
flags.DEFINE_integer("cpu_devices", None, "Forced CPU devices of this host.")
flags.DEFINE_string("gpu", None, "KIND:COUNT, KIND one of A100, H100, H200.")
flags.DEFINE_integer("top", 8, "How many of the largest parameters to show.")
flags.DEFINE_string("json", None, "Also write the plan's headline figures (plan.report.summary) "
                    "to this file; when the step does not fit, {\"fits\": false, \"error\": ...}.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _plan() -> plans.Plan:
  targets = [name for name in ("topology", "cpu_devices", "gpu") if FLAGS[name].value is not None]
  if len(targets) != 1:
    raise ValueError(f"expected exactly one of --topology, --cpu_devices, --gpu; got "
                     f"{['--' + t for t in targets] or 'none'}")
  # Plans compile for a target; they never run on this host's accelerators.
  jax.config.update("jax_platforms", "cpu")
  if FLAGS.gpu is not None:
    kind, _, count = FLAGS.gpu.partition(":")
    if not count.isdigit() or int(count) < 1:
      raise ValueError(f"--gpu={FLAGS.gpu}: expected KIND:COUNT such as H100:1024")
    return analytic.analytic_plan(FLAGS.config, kind, int(count), FLAGS.top)
  if FLAGS.cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    return compile_lib.compile_plan(FLAGS.config, jax.devices("cpu"),
                                    f"{FLAGS.cpu_devices} CPU devices", FLAGS.top)
  slices = f" x {FLAGS.num_slices} slices" if FLAGS.num_slices > 1 else ""
  return compile_lib.compile_plan(FLAGS.config,
                                  compile_lib.tpu_devices(FLAGS.topology, FLAGS.num_slices),
                                  f"TPU topology {FLAGS.topology}{slices}", FLAGS.top)


def _write_json(figures: dict) -> None:
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(figures, f, indent=1)


def plan() -> None:
  try:
    result = _plan()
  except plans.DoesNotFitError as error:
    _write_json(dict(fits=False, error=str(error), state_bytes=error.state_bytes))
    sys.exit(str(error))
  _write_json(report.summary(result))
  print(report.report(result))
  if not result.fits:
    sys.exit(report.does_not_fit_message(result))


def main() -> None:
  cli.run(plan, name="plan", doc=__doc__, module=__name__, skip_tpu=False)


if __name__ == "__main__":
  main()
