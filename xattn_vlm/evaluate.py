"""``python -m xattn_vlm.evaluate``: few-shot evaluation of a trained model (the Flamingo protocol).

  python -m xattn_vlm.evaluate --checkpoint=runs/shapes_tiny/flamingo \\
      --output_dir=runs/shapes_tiny/eval_8shot --eval.shots=0,4,8
  python -m xattn_vlm.evaluate --checkpoint=/ckpt/of9b --output_dir=/results/of9b \\
      --tokenizer=/models/mpt-7b --eval.tasks=coco,vqav2,ok_vqa --eval.data_root=/data \\
      --eval.demonstrations=rices

``--checkpoint`` is the workdir of a flamingo-stage training run or a converted published model
(``python -m xattn_vlm.convert``, docs/checkpoints.md). ``--eval.*`` are the settings of
``xattn_vlm.eval.runner.default_config`` (tasks, shots, trials, demonstrations, batch size, ...);
``--eval.data_root`` and ``--eval.data.<task>.<train|test>.<argument>`` say where the official
benchmark files are (``xattn_vlm.eval.tasks.default_data_config`` lists the expected layout).
Predictions go to ``<output_dir>/predictions`` as they come; rerunning the same command resumes.
The results are ``<output_dir>/results.json`` and ``results.md``, the log is in
``<output_dir>/logs/``. ``--multiprocess`` joins a multi-process run first
(``distributed.initialize``); the queries are then split over the processes.
"""

import pathlib

from absl import flags
import jax
from ml_collections import config_flags

from xattn_vlm import checkpoint
from xattn_vlm import cli
from xattn_vlm import distributed
from xattn_vlm.data import images as images_lib
from xattn_vlm.eval import runner
from xattn_vlm.inference import Processor

flags.DEFINE_string("checkpoint", None, "Workdir of a flamingo-stage training run, or a "
                    "model converted by python -m xattn_vlm.convert.")
flags.DEFINE_string("output_dir", None, "Where predictions and results are written.")
flags.DEFINE_string("tokenizer", None, "Local Hugging Face tokenizer folder (default: the "
                    "checkpoint's tokenizer/ folder, which a conversion writes, else the run's "
                    "config.data.tokenizer, else the built-in shapes-world tokenizer).")
flags.DEFINE_string("model_name", "ours", "Name of our rows in the results table.")
flags.DEFINE_enum("image_mode", "pad", images_lib.MODES, "How an image becomes the tower's "
                  "square: pad (keep all of it) or crop (CLIP's centre crop, as OpenFlamingo's "
                  "models were evaluated).")
flags.DEFINE_bool("multiprocess", False, "Join a multi-process run before evaluating.")
config_flags.DEFINE_config_dict("eval", runner.default_config(), "Evaluation settings.")
flags.mark_flags_as_required(["checkpoint", "output_dir"])
FLAGS = flags.FLAGS


def evaluate() -> None:
  if FLAGS.multiprocess:
    distributed.initialize()
  runner.check_config(FLAGS.eval)
  model = checkpoint.load_flamingo(FLAGS.checkpoint)
  tokenizer = checkpoint.load_tokenizer(FLAGS.checkpoint, model.config, FLAGS.tokenizer)
  processor = Processor.from_model_config(model.config, tokenizer, image_mode=FLAGS.image_mode)
  runner.evaluate(model, processor, FLAGS.eval, FLAGS.output_dir, model_name=FLAGS.model_name)
  if jax.process_index() == 0:
    print((pathlib.Path(FLAGS.output_dir) / runner.RESULTS_MD).read_text())


def main() -> None:
  cli.run(evaluate, name="evaluate", doc=__doc__, module=__name__,
          log_dir=lambda: FLAGS.output_dir)


if __name__ == "__main__":
  main()
