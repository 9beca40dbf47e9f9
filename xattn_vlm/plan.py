"""``python -m xattn_vlm.plan --config=experiments/<name>.py[:preset] TARGET``: will it fit, how fast?

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

from absl import app
from absl import flags
from ml_collections import config_flags

import jax

from xattn_vlm.train import plan_lib

config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].",
                                lock_config=True)
flags.DEFINE_string("topology", None, "Cloud TPU topology, e.g. v5e:16x16 or v5p:8x8x8.")
flags.DEFINE_integer("num_slices", 1, "Slices of --topology (data parallel over DCN).")
flags.DEFINE_integer("cpu_devices", None, "Forced CPU devices of this host.")
flags.DEFINE_string("gpu", None, f"KIND:COUNT, KIND one of {sorted(plan_lib.GPU_CHIPS)}.")
flags.DEFINE_integer("top", 8, "How many of the largest parameters to show.")
flags.DEFINE_string("markdown", None, "Also print the plan as a Markdown table row naming the "
                    "config so (the README's plan table).")
flags.DEFINE_string("json", None, "Also write the plan's headline figures (plan_lib.summary) to "
                    "this file; when XLA refuses the step, {\"fits\": false, \"error\": ...}.")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def _plan() -> plan_lib.Plan:
  targets = [name for name in ("topology", "cpu_devices", "gpu") if FLAGS[name].value is not None]
  if len(targets) != 1:
    raise app.UsageError(f"expected exactly one of --topology, --cpu_devices, --gpu; got "
                         f"{['--' + t for t in targets] or 'none'}")
  # Plans compile for a target; they never run on this host's accelerators.
  jax.config.update("jax_platforms", "cpu")
  if FLAGS.gpu is not None:
    kind, _, count = FLAGS.gpu.partition(":")
    if not count.isdigit() or int(count) < 1:
      raise app.UsageError(f"--gpu={FLAGS.gpu}: expected KIND:COUNT such as H100:1024")
    return plan_lib.analytic_plan(FLAGS.config, kind, int(count), FLAGS.top)
  if FLAGS.cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    return plan_lib.compile_plan(FLAGS.config, jax.devices("cpu"),
                                 f"{FLAGS.cpu_devices} CPU devices", FLAGS.top)
  slices = f" x {FLAGS.num_slices} slices" if FLAGS.num_slices > 1 else ""
  return plan_lib.compile_plan(FLAGS.config,
                               plan_lib.tpu_devices(FLAGS.topology, FLAGS.num_slices),
                               f"TPU topology {FLAGS.topology}{slices}", FLAGS.top)


def _write_json(figures: dict) -> None:
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(figures, f, indent=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    plan = _plan()
  except plan_lib.DoesNotFitError as error:
    _write_json(dict(fits=False, error=str(error)))
    sys.exit(str(error))
  _write_json(plan_lib.summary(plan))
  print(plan_lib.report(plan))
  if FLAGS.markdown:
    print(plan_lib.markdown_row(plan, FLAGS.markdown))
  if not plan.fits:
    sys.exit(plan_lib.does_not_fit_message(plan))


if __name__ == "__main__":
  app.run(main)
