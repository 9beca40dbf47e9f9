"""Interleaved sequences: layout, the label mask position by position, truncation invariants."""

import functools

import numpy as np
import pytest
import tokenizers

from xattn_vlm.data import images, sequence
from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.data.sequence import IGNORE_INDEX
from xattn_vlm.data.shapes.tokenizer import default_tokenizer
from xattn_vlm.data.tokenizer import Tokenizer

WORDS = ("<|endoftext|>", "<s>", "p", "q", "a", "b", "c", "d", "e")
SHAPE = (1, 2, 2, 3)  # [F, H, W, C] of the test images


def word_tokenizer(bos: bool = False) -> Tokenizer:
  """One token per word, so hand-written documents have hand-countable positions."""
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)},
                                                         unk_token="<|endoftext|>"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return Tokenizer(raw, eos_token="<|endoftext|>", bos_token="<s>" if bos else None)


def image(value: float, shape=SHAPE[1:]) -> np.ndarray:
  return np.full(shape, value, np.float32)


@pytest.fixture(scope="module")
def tok():
  return word_tokenizer()


def ids_of(tok, *tokens):
  ids = {"<image>": tok.media_token_id, "<eoc>": tok.eoc_token_id, "<eos>": tok.eos_token_id}
  return [ids[t] if t in ids else WORDS.index(t) for t in tokens]


def test_layout_and_label_mask_position_by_position(tok):
  chunks = ["p q", image(1), "a b", image(2), "c"]
  ex = sequence.build_example(chunks, tok, max_tokens=12, max_images=3, image_shape=SHAPE)
  expected_ids = ids_of(tok, "p", "q", "<image>", "a", "b", "<eoc>", "<image>", "c", "<eoc>",
                        "<eos>") + [tok.pad_token_id] * 2
  np.testing.assert_array_equal(ex["input_ids"], expected_ids)
  np.testing.assert_array_equal(ex["attention_mask"], [1] * 10 + [0] * 2)
  #            p      q      <img>  a     b     <eoc> <img>  c     <eoc> <eos>  pad    pad
  supervised = [False, False, False, True, True, True, False, True, True, False, False, False]
  np.testing.assert_array_equal(ex["labels"],
                                np.where(supervised, expected_ids, IGNORE_INDEX))
  assert ex["input_ids"].dtype == ex["labels"].dtype == ex["attention_mask"].dtype == np.int32
  assert ex["images"].shape == (3, *SHAPE) and ex["images"].dtype == np.float32
  np.testing.assert_array_equal(ex["images"][:, 0, 0, 0, 0], [1, 2, 0])
  np.testing.assert_array_equal(ex["media_mask"], [True, True, False])
  assert ex["num_images"] == 2 and ex["num_images"].dtype == np.int32


def test_image_text_pair_supervises_caption_and_endofchunk_not_final_eos(tok):
  ex = sequence.build_example([image(1), "a b"], tok, max_tokens=5, max_images=1,
                              image_shape=SHAPE)
  ids = ids_of(tok, "<image>", "a", "b", "<eoc>", "<eos>")
  np.testing.assert_array_equal(ex["input_ids"], ids)
  np.testing.assert_array_equal(ex["labels"], [IGNORE_INDEX, ids[1], ids[2], ids[3], IGNORE_INDEX])


def test_text_after_endofchunk_is_ignored_until_the_next_image(tok):
  img, eoc, pad = tok.media_token_id, tok.eoc_token_id, tok.pad_token_id
  a, b, c, d, e = (WORDS.index(w) for w in "abcde")
  ids = np.array([[a, img, b, eoc, c, d, img, e, eoc, pad],
                  [img, eoc, a, img, img, b, c, pad, pad, pad]])
  attention = np.array([[1] * 9 + [0], [1] * 7 + [0] * 3])
  expected = [[0, 0, 1, 1, 0, 0, 0, 1, 1, 0],
              [0, 1, 0, 0, 0, 1, 1, 0, 0, 0]]
  mask = sequence.supervised_mask(ids, img, eoc, attention)
  np.testing.assert_array_equal(mask, np.array(expected, bool))


def test_bos_is_prepended_and_ignored():
  tok = word_tokenizer(bos=True)
  ex = sequence.build_example([image(1), "a"], tok, max_tokens=6, max_images=1, image_shape=SHAPE)
  assert ex["input_ids"][0] == WORDS.index("<s>")
  np.testing.assert_array_equal(ex["labels"][:5], [IGNORE_INDEX, IGNORE_INDEX, WORDS.index("a"),
                                                   tok.eoc_token_id, IGNORE_INDEX])


def masked_mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """The loss as training computes it: logits[t] predict labels[t + 1], over supervised tokens,
  divided by max(count, 1)."""
  logits, targets = logits[:-1], labels[1:]
  mask = targets != IGNORE_INDEX
  shifted = logits - logits.max(-1, keepdims=True)
  log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_probs, np.where(mask, targets, 0)[:, None], -1)[:, 0]
  return float(-(picked * mask).sum() / max(mask.sum(), 1))


@pytest.mark.parametrize("chunks, max_tokens", [
    (["p q a"], 6),  # no image at all
    (["p", image(1), "a b"], 2),  # cut right after <image>
    ([image(1), "a"], 1),  # only the <image> token fits
])
def test_fully_masked_document_gives_zero_loss_not_nan(tok, chunks, max_tokens):
  ex = sequence.build_example(chunks, tok, max_tokens=max_tokens, max_images=2, image_shape=SHAPE)
  assert np.all(ex["labels"] == IGNORE_INDEX)
  assert (ex["input_ids"] == tok.media_token_id).sum() == ex["media_mask"].sum()
  logits = np.random.default_rng(0).normal(size=(max_tokens, tok.vocab_size)).astype(np.float32)
  loss = masked_mean_cross_entropy(logits, ex["labels"])
  assert loss == 0.0 and not np.isnan(loss)
  ex = sequence.build_example([image(1), "a b"], tok, max_tokens=5, max_images=1,
                              image_shape=SHAPE)
  assert masked_mean_cross_entropy(np.zeros((5, tok.vocab_size)), ex["labels"]) == pytest.approx(
      np.log(tok.vocab_size))


def test_images_beyond_max_images_drop_their_token_and_text(tok):
  chunks = ["p", image(1), "a", image(2), "b", image(3), "c"]
  ex = sequence.build_example(chunks, tok, max_tokens=10, max_images=1, image_shape=SHAPE)
  ids = ids_of(tok, "p", "<image>", "a", "<eoc>", "<eos>")
  np.testing.assert_array_equal(ex["input_ids"][:5], ids)
  assert ex["attention_mask"].sum() == 5 and ex["num_images"] == 1
  np.testing.assert_array_equal(ex["images"][0], image(1)[None])


def test_token_truncation_drops_the_image_of_a_cut_token(tok):
  chunks = [image(1), "a b", image(2), "c"]
  ex = sequence.build_example(chunks, tok, max_tokens=5, max_images=2, image_shape=SHAPE)
  np.testing.assert_array_equal(ex["input_ids"], ids_of(tok, "<image>", "a", "b", "<eoc>",
                                                        "<image>"))
  np.testing.assert_array_equal(ex["media_mask"], [True, True])
  ex = sequence.build_example(chunks, tok, max_tokens=4, max_images=2, image_shape=SHAPE)
  np.testing.assert_array_equal(ex["media_mask"], [True, False])
  np.testing.assert_array_equal(ex["images"][1], np.zeros(SHAPE))


def test_truncation_never_separates_images_from_their_tokens(tok):
  rng = np.random.default_rng(0)
  for _ in range(400):
    chunks, num_images = [], 0
    for _ in range(rng.integers(0, 9)):
      if rng.random() < 0.4:
        num_images += 1
        chunks.append(image(num_images))
      else:
        chunks.append(" ".join(rng.choice(list("pqabcde"), size=rng.integers(0, 4))))
    max_tokens, max_images = int(rng.integers(1, 16)), int(rng.integers(0, 4))
    ex = sequence.build_example(chunks, tok, max_tokens=max_tokens, max_images=max_images,
                                image_shape=SHAPE)
    n = int((ex["input_ids"] == tok.media_token_id).sum())
    assert n == ex["media_mask"].sum() == ex["num_images"] <= min(num_images, max_images)
    np.testing.assert_array_equal(ex["media_mask"], np.arange(max_images) < n)
    # The kept images are the first n, in order; the rest is zero.
    np.testing.assert_array_equal(ex["images"][:, 0, 0, 0, 0],
                                  np.where(np.arange(max_images) < n, np.arange(max_images) + 1, 0))
    # Nothing is supervised that the one rule does not supervise.
    mask = sequence.supervised_mask(ex["input_ids"], tok.media_token_id, tok.eoc_token_id,
                                    ex["attention_mask"])
    np.testing.assert_array_equal(ex["labels"], np.where(mask, ex["input_ids"], IGNORE_INDEX))


def test_video_frames_and_input_errors(tok):
  video_shape = (2, 2, 2, 3)
  ex = sequence.build_example([np.ones(video_shape, np.float32), "a"], tok, max_tokens=4,
                              max_images=1, image_shape=video_shape)
  assert ex["images"].shape == (1, *video_shape)
  with pytest.raises(ValueError, match="chunk 0: image must have shape"):
    sequence.build_example([image(1), "a"], tok, max_tokens=4, max_images=1,
                           image_shape=video_shape)
  with pytest.raises(ValueError, match="chunk 1: images must be preprocessed float"):
    sequence.build_example(["a", np.zeros((2, 2, 3), np.uint8)], tok, max_tokens=4, max_images=1,
                           image_shape=SHAPE)
  with pytest.raises(ValueError, match="after image 0 contains <image>"):
    sequence.build_example([image(1), "a <image> b"], tok, max_tokens=8, max_images=1,
                           image_shape=SHAPE)
  with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
    sequence.build_example(["a"], tok, max_tokens=0, max_images=1, image_shape=SHAPE)


def test_answer_supervision_keeps_the_last_chunk_and_its_endofchunk(tok):
  """supervise="answer": only the last text chunk's tokens and the <eoc> after them; the inputs
  are those of supervise="all", which supervises the question too."""
  chunks = ["p", image(1), "a b", image(2), "c d ", "e"]
  answer = sequence.build_example(chunks, tok, max_tokens=12, max_images=2, image_shape=SHAPE,
                                  supervise="answer")
  every = sequence.build_example(chunks, tok, max_tokens=12, max_images=2, image_shape=SHAPE)
  ids = ids_of(tok, "p", "<image>", "a", "b", "<eoc>", "<image>", "c", "d", "e", "<eoc>",
               "<eos>") + [tok.pad_token_id]
  np.testing.assert_array_equal(answer["input_ids"], ids)
  np.testing.assert_array_equal(every["input_ids"], ids)
  #          p  <img>  a  b  <eoc> <img>  c  d  e  <eoc> <eos> pad
  expected = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0]
  np.testing.assert_array_equal(answer["labels"],
                                np.where(expected, ids, IGNORE_INDEX))
  assert (every["labels"] != IGNORE_INDEX).sum() == 7


def test_answer_supervision_through_the_shapes_bpe(tmp_path):
  """A shapes-world VQA record: the supervised tokens decode to the answer and <|endofchunk|>."""
  tok = default_tokenizer(cache_dir=tmp_path)
  item = shapes_world.vqa_example("train", 0, 5, image_size=16)
  chunks = [image(1, (16, 16, 3)), f"Question:{item['question']} Short answer:", item["answer"]]
  ex = sequence.build_example(chunks, tok, max_tokens=64, max_images=1,
                              image_shape=(1, 16, 16, 3), supervise="answer")
  assert tok.decode(ex["labels"][ex["labels"] != IGNORE_INDEX]) == (
      item["answer"] + "<|endofchunk|>")


def test_answer_supervision_errors_and_truncation(tok):
  with pytest.raises(ValueError, match="supervise must be one of"):
    sequence.build_example([image(1), "a"], tok, max_tokens=6, max_images=1, image_shape=SHAPE,
                           supervise="answers")
  with pytest.raises(ValueError, match="end with a text chunk after an image"):
    sequence.build_example([image(1), "a", image(2)], tok, max_tokens=6, max_images=2,
                           image_shape=SHAPE, supervise="answer")
  with pytest.raises(ValueError, match="end with a text chunk after an image"):
    sequence.build_example(["a"], tok, max_tokens=6, max_images=1, image_shape=SHAPE,
                           supervise="answer")
  # The answer's image dropped by max_images: no answer, nothing supervised.
  ex = sequence.build_example([image(1), "a", image(2), "b"], tok, max_tokens=8, max_images=1,
                              image_shape=SHAPE, supervise="answer")
  assert ex["num_images"] == 1 and (ex["labels"] == IGNORE_INDEX).all()


def test_text_only_example_supervises_every_real_token(tok):
  ex = sequence.build_text_example("a b c", tok, max_tokens=6)
  ids = ids_of(tok, "a", "b", "c", "<eos>")
  np.testing.assert_array_equal(ex["input_ids"][:4], ids)
  np.testing.assert_array_equal(ex["labels"], ids + [IGNORE_INDEX] * 2)
  np.testing.assert_array_equal(ex["attention_mask"], [1, 1, 1, 1, 0, 0])
  with pytest.raises(ValueError, match="contains <image>"):
    sequence.build_text_example("a <image>", tok, max_tokens=6)


def test_shapes_world_document_through_default_tokenizer(tmp_path):
  tok = default_tokenizer(cache_dir=tmp_path)
  doc = shapes_world.interleaved_example("train", 0, 3, image_size=32)
  preprocess = functools.partial(images.preprocess_image, size=16, mean=(0.5,) * 3,
                                 std=(0.25,) * 3)
  ex = sequence.build_example(sequence.map_images(doc["chunks"], preprocess), tok,
                              max_tokens=256, max_images=8, image_shape=(1, 16, 16, 3))
  assert ex["num_images"] == len(doc["scenes"])
  chunks = doc["chunks"]
  intro = chunks[0] if isinstance(chunks[0], str) else ""
  texts = [c for c in chunks[1 if intro else 0:] if isinstance(c, str)]
  assert len(texts) == len(doc["scenes"])
  text = tok.decode(ex["input_ids"][:ex["attention_mask"].sum()])
  assert text == intro + "".join(f"<image>{t}<|endofchunk|>" for t in texts) + "<|endoftext|>"
  supervised = tok.decode(ex["labels"][ex["labels"] != IGNORE_INDEX])
  assert supervised == "".join(f"{t}<|endofchunk|>" for t in texts)
