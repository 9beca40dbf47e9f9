"""``python -m xattn_vlm.evaluate``: few-shot evaluation of a trained model (the Flamingo protocol).

  python -m xattn_vlm.evaluate --checkpoint=runs/shapes_tiny/flamingo \\
      --output_dir=runs/shapes_tiny/eval_8shot --eval.shots=0,4,8
  python -m xattn_vlm.evaluate --checkpoint=/ckpt/of9b --output_dir=/results/of9b \\
      --tokenizer=/models/mpt-7b --eval.tasks=coco,vqav2,ok_vqa --eval.data_root=/data \\
      --eval.demonstrations=rices

``--checkpoint`` is the workdir of a flamingo-stage training run. ``--eval.*`` are the settings of
``xattn_vlm.eval.runner.default_config`` (tasks, shots, trials, demonstrations, batch size, ...);
``--eval.data_root`` and ``--eval.data.<task>.<train|test>.<argument>`` say where the official
benchmark files are (``xattn_vlm.eval.tasks.default_data_config`` lists the expected layout).
Predictions go to ``<output_dir>/predictions`` as they come; rerunning the same command resumes.
The results are ``<output_dir>/results.json`` and ``results.md``. ``--multiprocess`` calls
``jax.distributed.initialize()`` first; the queries are then split over the processes.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

import jax

from xattn_vlm.data import Tokenizer, default_tokenizer
from xattn_vlm.eval import runner
from xattn_vlm.inference import Processor
from xattn_vlm.train import checkpoint as checkpoint_lib

flags.DEFINE_string("checkpoint", None, "Workdir of a flamingo-stage training run.")
flags.DEFINE_string("output_dir", None, "Where predictions and results are written.")
flags.DEFINE_string("tokenizer", None, "Local Hugging Face tokenizer folder (default: the "
                    "built-in shapes-world tokenizer).")
flags.DEFINE_string("model_name", "ours", "Name of our rows in the results table.")
flags.DEFINE_bool("multiprocess", False, "Initialise jax.distributed before evaluating.")
config_flags.DEFINE_config_dict("eval", runner.default_config(), "Evaluation settings.")
flags.mark_flags_as_required(["checkpoint", "output_dir"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.multiprocess:
    jax.distributed.initialize()
  runner.check_config(FLAGS.eval)
  model = checkpoint_lib.load_flamingo(FLAGS.checkpoint)
  tokenizer = (default_tokenizer() if FLAGS.tokenizer is None else
               Tokenizer.from_pretrained(FLAGS.tokenizer, model.config.lm.vocab_size))
  processor = Processor.from_model_config(model.config, tokenizer)
  runner.evaluate(model, processor, FLAGS.eval, FLAGS.output_dir, model_name=FLAGS.model_name)


if __name__ == "__main__":
  app.run(main)
