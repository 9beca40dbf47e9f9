"""``python -m xattn_vlm.prompt``: continue one interleaved prompt and print the new text.

  python -m xattn_vlm.prompt --checkpoint=WORKDIR --image a.jpg --image b.jpg \\
      --text "<image>A photo of a cat.<|endofchunk|><image>A photo of"
  python -m xattn_vlm.prompt --config=tiny --image a.jpg --text "<image>Output:"

``--checkpoint`` is the workdir of a ``flamingo``-stage training run (its latest checkpoint) or
a converted published model (``python -m xattn_vlm.convert``);
``--config`` names a model preset (``xattn_vlm.models.config``) and builds a fresh random model,
with the LM vocabulary sized to the tokenizer. The images fill the ``<image>`` placeholders in
order.
"""

from __future__ import annotations

from absl import flags
from flax import nnx

from xattn_vlm import checkpoint
from xattn_vlm import cli
from xattn_vlm.data import Tokenizer, default_tokenizer
from xattn_vlm.data import images as images_lib
from xattn_vlm.inference import Processor, generate
from xattn_vlm.models import config as model_config
from xattn_vlm.models.flamingo import Flamingo

flags.DEFINE_string("checkpoint", None, "Workdir of a flamingo-stage training run, or a "
                    "model converted by python -m xattn_vlm.convert.")
flags.DEFINE_string("config", None, "Model preset name for a fresh random model, e.g. tiny.")
flags.DEFINE_string("tokenizer", None, "Local Hugging Face tokenizer folder (default: the "
                    "checkpoint's tokenizer/ folder, which a conversion writes, else the run's "
                    "config.data.tokenizer, else the built-in shapes-world tokenizer).")
flags.DEFINE_enum("image_mode", "pad", images_lib.MODES, "How an image becomes the tower's "
                  "square: pad (keep all of it) or crop (CLIP's centre crop, as OpenFlamingo's "
                  "models were evaluated).")
flags.DEFINE_multi_string("image", [], "An image file; repeat for each <image> in --text.")
flags.DEFINE_string("text", None, "The prompt, with one <image> placeholder per --image.")
flags.DEFINE_integer("max_new_tokens", 20, "At most this many new tokens.")
flags.DEFINE_integer("num_beams", 3, "Beam width (1: greedy, or sampling with --do_sample).")
flags.DEFINE_float("length_penalty", 0.0, "Beam ranking: log-prob / length ** length_penalty.")
flags.DEFINE_bool("do_sample", False, "Sample (with --temperature, --top_k, --top_p).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set of tokens with this mass.")
flags.DEFINE_integer("seed", 0, "Seed of the random model and of sampling.")
flags.mark_flags_as_required(["text"])
flags.mark_flags_as_mutual_exclusive(["checkpoint", "config"], required=True)
FLAGS = flags.FLAGS


def build(checkpoint_dir: str | None, preset: str | None, tokenizer_dir: str | None,
          seed: int, image_mode: str = "pad") -> tuple[Flamingo, Processor]:
  """The model (from a checkpoint, or fresh from a preset) and its processor."""
  if checkpoint_dir is not None:
    model = checkpoint.load_flamingo(checkpoint_dir, setting="--checkpoint")
    tokenizer = checkpoint.load_tokenizer(checkpoint_dir, model.config, tokenizer_dir)
  else:
    tokenizer = (default_tokenizer() if tokenizer_dir is None else
                 Tokenizer.from_pretrained(tokenizer_dir))
    config = model_config.get_model_config(preset)
    # A fresh model takes the tokenizer's vocabulary and special-token order.
    config.lm.vocab_size = tokenizer.lm_vocab_size
    config.added_tokens = tokenizer.added_tokens
    model = nnx.jit(lambda: Flamingo(config, rngs=nnx.Rngs(seed)))()
  return model, Processor.from_model_config(model.config, tokenizer, image_mode=image_mode)


def prompt() -> None:
  model, processor = build(FLAGS.checkpoint, FLAGS.config, FLAGS.tokenizer, FLAGS.seed,
                           FLAGS.image_mode)
  result = generate(model, processor, [FLAGS.text], [FLAGS.image],
                    max_new_tokens=FLAGS.max_new_tokens, num_beams=FLAGS.num_beams,
                    length_penalty=FLAGS.length_penalty, do_sample=FLAGS.do_sample,
                    temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                    rng=FLAGS.seed)
  print(result.text[0])


def main() -> None:
  cli.run(prompt, name="prompt", doc=__doc__, module=__name__)


if __name__ == "__main__":
  main()
