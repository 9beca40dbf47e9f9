"""``python -m xattn_vlm.convert``: a published Flamingo-family checkpoint -> a checkpoint that
``evaluate``, ``prompt``, ``xattn_vlm.from_pretrained`` and the trainer read.

  python -m xattn_vlm.convert --from=openflamingo --preset=openflamingo_3b \\
      --checkpoint=/models/OpenFlamingo-3B-vitl-mpt1b/checkpoint.pt \\
      --lm=/models/mpt-1b-redpajama-200b --vision=/models/clip-vit-large-patch14 \\
      --output=/ckpt/of3b
  python -m xattn_vlm.convert --from=idefics --checkpoint=/models/idefics-9b \\
      --model.param_dtype=bfloat16 --output=/ckpt/idefics9b

OpenFlamingo: ``--checkpoint`` is its ``checkpoint.pt``, ``--lm`` the base LM's folder,
``--vision`` the CLIP ViT-L/14 folder, ``--tokenizer`` the tokenizer folder (default: ``--lm``)
and ``--preset`` the model preset; ``--model.<field>=<value>`` changes a preset field (e.g.
``--model.dtype=float32``). IDEFICS: ``--checkpoint`` is the folder (weights, config and
tokenizer); only ``--model.dtype`` and ``--model.param_dtype`` apply. docs/checkpoints.md lists
each published checkpoint with its command.

Every tensor is mapped and every parameter filled, or the conversion fails naming each that is
not (and each tensor of the wrong shape, and a tokenizer whose special-token ids disagree with the
weights); ``--output`` is then not created. It is written whole or not at all: into a new
directory beside it, renamed at the end. Tensors are read one at a time (``checkpoint.pt``
memory-mapped), so the host holds the weights once.
"""

from __future__ import annotations

import importlib.util

from absl import flags
from ml_collections import config_flags

from xattn_vlm import cli
from xattn_vlm import console
from xattn_vlm.inference import loading
from xattn_vlm.models import config as model_config

flags.DEFINE_enum("from", None, loading.FORMATS, "The published checkpoint's format.")
flags.DEFINE_string("checkpoint", None, "OpenFlamingo's checkpoint.pt, or the IDEFICS folder.")
flags.DEFINE_string("lm", None, "OpenFlamingo: the base LM's Hugging Face folder.")
flags.DEFINE_string("vision", None, "OpenFlamingo: the CLIP ViT-L/14 Hugging Face folder.")
flags.DEFINE_string("preset", None, "OpenFlamingo: the model preset, e.g. openflamingo_3b "
                    f"(one of {sorted(n for n in model_config.PRESETS if 'openflamingo' in n)}).")
flags.DEFINE_string("tokenizer", None, "The tokenizer folder (default: --lm for OpenFlamingo, "
                    "--checkpoint for IDEFICS).")
config_flags.DEFINE_config_dict("model", model_config.openflamingo_3b(),
                                 "Changes to the preset's fields, e.g. --model.dtype=float32 "
                                 "(the default shown is openflamingo_3b's).")
flags.DEFINE_string("output", None, "The new directory to write (must not exist).")
flags.mark_flags_as_required(["from", "checkpoint", "output"])
FLAGS = flags.FLAGS


def _changes() -> dict:
  """The ``--model.*`` fields given on the command line, by dotted name."""
  return dict(FLAGS["model"].override_values)


def main() -> None:
  def job():
    if FLAGS["from"].value == "openflamingo" and importlib.util.find_spec("torch") is None:
      cli.fail("convert", "reading OpenFlamingo's checkpoint.pt (a torch pickle) needs torch: "
               "pip install 'xattn_vlm[convert]'")
    loading.convert_published(FLAGS["from"].value, FLAGS.checkpoint, FLAGS.output,
                              lm=FLAGS.lm, vision=FLAGS.vision, preset=FLAGS.preset,
                              tokenizer=FLAGS.tokenizer, changes=_changes())
    console.say(f"wrote {FLAGS.output}: python -m xattn_vlm.prompt --checkpoint={FLAGS.output} "
                "--image=... --text=...")

  cli.run(job, name="convert", doc=__doc__, module=__name__)


if __name__ == "__main__":
  main()
