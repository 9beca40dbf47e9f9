"""Benchmark metrics against their references: pycocoevalcap's CIDEr-D, hand-computed VQA accuracy,
brute-force ROC-AUC and top-k."""

import itertools
import random
import shutil

import numpy as np
import pytest

from xattn_vlm.eval import metrics

# Captions with several references each, some sharing n-grams across items (so document
# frequencies matter), some repetitive (so clipping matters), lengths far apart (the penalty).
CAPTION_REFERENCES = {
    "dog": ["A dog runs across the green grass.", "A brown dog running on a lawn.",
            "The dog is playing in the park with a ball.", "A puppy runs on grass."],
    "pizza": ["A pizza with cheese, tomatoes and basil.", "A close up of a cheese pizza.",
              "Pizza on a plate next to a glass of wine."],
    "bus": ["A red double-decker bus on a city street.", "A bus drives down the street.",
            "Two buses parked near a building.", "A red bus in London.", "People wait for a bus."],
    "cat": ["A cat sleeping on a couch.", "A grey cat lies on the sofa."],
    "kitchen": ["A kitchen with a stove and a fridge.", "An empty kitchen with white cabinets.",
                "A small kitchen has a stove, a sink and a window."],
}
CAPTION_PREDICTIONS = {
    "dog": "A dog running on the grass.",
    "pizza": "A pizza pizza pizza pizza with cheese.",
    "bus": "A red bus driving down a city street next to a tall building with many windows.",
    "cat": "A cat.",
    "kitchen": "A dog in a park.",
}


def _reference_cider(predictions, references):
  from pycocoevalcap.cider.cider import Cider
  keys = list(references)
  score, per_item = Cider().compute_score(references, {k: [predictions[k]] for k in keys})
  return score, dict(zip(keys, per_item))


def _assert_cider_matches_reference(predictions, references):
  score, per_item = metrics.cider(predictions, references)
  ref_score, ref_per_item = _reference_cider(predictions, references)
  assert score == pytest.approx(ref_score, abs=1e-6)
  for key in references:
    assert per_item[key] == pytest.approx(ref_per_item[key], abs=1e-6), key


def test_cider_equals_pycocoevalcap_on_captions():
  references = {k: [metrics.tokenize_caption(c) for c in caps]
                for k, caps in CAPTION_REFERENCES.items()}
  predictions = {k: metrics.tokenize_caption(c) for k, c in CAPTION_PREDICTIONS.items()}
  _assert_cider_matches_reference(predictions, references)
  score, per_item = metrics.cider(predictions, references)
  assert per_item["dog"] > per_item["kitchen"] and score > 0


def test_cider_equals_pycocoevalcap_on_random_sentences():
  rng = random.Random(0)
  vocab = "a the man dog cat sits on red blue table with ball grass runs park two".split()

  def sentence(low=1):
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(low, 14)))

  references = {i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(40)}
  predictions = {i: sentence() for i in range(40)}
  predictions[0] = ""  # an empty prediction scores 0
  predictions[1] = references[1][0]  # an exact copy of one reference
  _assert_cider_matches_reference(predictions, references)


def test_cider_rejects_mismatched_ids_and_bad_references():
  with pytest.raises(ValueError, match="same ids"):
    metrics.cider({"a": "x"}, {"a": ["x"], "b": ["y"]})
  with pytest.raises(ValueError, match="non-empty list"):
    metrics.cider({"a": "x"}, {"a": []})
  with pytest.raises(ValueError, match="non-empty list"):
    metrics.cider({"a": "x"}, {"a": "x"})


def test_tokenize_caption_golden():
  cases = {
      "A man's dog is running.": "a man 's dog is running",
      "Two people don't like the well-known U.S. president!":
          "two people do n't like the well-known u.s. president",
      "A plate with 1,000 items (and 3.5 cups) on it":
          "a plate with 1,000 items -lrb- and 3.5 cups -rrb- on it",
      'A "quoted" word; a colon: here -- dash - single': "a quoted word a colon here dash single",
      "It costs $5 & 50% off, right?": "it costs $ 5 & 50 % off right",
      "Can't won't they're we'll I'm you've he'd":
          "ca n't wo n't they 're we 'll i 'm you 've he 'd",
      "Mr. Smith at 5 p.m. o'clock ...": "mr. smith at 5 p.m. o'clock",
      "A sign that says \u2018STOP\u2019.": "a sign that says stop",
  }
  for text, expected in cases.items():
    assert metrics.tokenize_caption(text) == expected, text


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer needs Java")
def test_simple_tokenizer_agrees_with_ptb_tokenizer():
  captions = [c for caps in CAPTION_REFERENCES.values() for c in caps] + [
      "Two dogs' bowls at 10:30 on a\nrainy day.", "A cat [in a box] {braces} a/b #tag @home",
      "A caf\u00e9 na\u00efve \u2019quote\u2019 it\u2019s", "the 1990s. the 80's", "e-mail and x-ray"]
  ptb = metrics.tokenize_captions({i: [c] for i, c in enumerate(captions)}, backend="ptb")
  for i, caption in enumerate(captions):
    assert metrics.tokenize_caption(caption) == ptb[i][0], caption


def test_tokenize_captions_rejects_unknown_backend():
  with pytest.raises(ValueError, match="backend"):
    metrics.tokenize_captions({"a": ["x"]}, backend="spacy")


# ---- VQA normalisation: one case per rule, expected values worked out by hand ---------------------

@pytest.mark.parametrize("text, expected", [
    ("\tyes\n", "yes"),                # tabs and newlines are spaces, then stripped
    ("Yes", "yes"),                    # lower-cased
    ("red/white", "red white"),        # a mark with no space beside it becomes a space
    ("red, white", "red white"),       # a mark next to a space is deleted
    ("yes !", "yes"),                  # (" !" deletes the mark; the words rule drops the space)
    ("(left)", "left"),                # brackets: "(" and ")" become spaces, then stripped
    ("1,000", "1000"),                 # a comma between digits: the comma is deleted
    ("1,000 red/white", "1000 redwhite"),  # ... and every other mark in that answer too
    ("3.", "3"),                       # a period not followed by a digit goes
    ("3.5", "3.5"),                    # a period before a digit stays
    (".5", ".5"),
    ("mr. smith", "mr smith"),
    ("50%: it's", "50%: it's"),        # % : ' are not in the list and stay
    ("two", "2"),                      # number words become digits
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),              # only zero..ten (and none)
    ("two.", "2"),                     # punctuation first, then numbers
    ("a dog", "dog"),                  # articles go
    ("the one", "1"),
    ("an apple", "apple"),
    ("dont", "don't"),                 # contractions, official map
    ("hes", "he's"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("yall'd've", "y'all'd've"),
    ("twas", "'twas"),
    ("somebody'd", "somebodyd"),       # the official map's one backwards entry
    ("im", "im"),                      # its key is "Im": never matches lower-cased answers
    ("its", "its"),                    # not a key
    ("shes", "shes"),                  # the official map has only the identity "she's"
])
def test_normalize_vqa_answer(text, expected):
  assert metrics.normalize_vqa_answer(text) == expected


def test_contraction_map_size_and_entries():
  # 118 entries: the official 120 less its two identities ("let's", "she's"), which change nothing.
  assert len(metrics.CONTRACTIONS) == 118
  assert metrics.CONTRACTIONS["couldnt've"] == metrics.CONTRACTIONS["couldn'tve"] == "couldn't've"
  assert metrics.CONTRACTIONS["'ow'sat"] == "'ow's'at"
  assert "couldntve" not in metrics.CONTRACTIONS  # only one apostrophe is ever left out


# ---- VQA accuracy: leave-one-annotator-out averaging --------------------------------------------

@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    # 1 match: the 9 subsets without the matching annotator hold 1 match (1/3), the one subset
    # without it holds 0: (9 * 1/3 + 1 * 0) / 10 = 0.3.
    (1, 0.3),
    # 2 matches: 8 subsets hold 2 (2/3), 2 subsets hold 1 (1/3): (8 * 2/3 + 2 * 1/3) / 10 = 0.6.
    (2, 0.6),
    # 3 matches: 7 subsets hold 3 (1), 3 subsets hold 2 (2/3): (7 + 3 * 2/3) / 10 = 0.9.
    (3, 0.9),
    # 4 matches: 6 subsets hold 4 (1), 4 subsets hold 3 (1): 1.
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(matches, expected):
  answers = ["cat"] * matches + ["dog"] * (10 - matches)
  assert metrics.vqa_question_accuracy("cat", answers) == pytest.approx(expected)
  if matches < 10:
    # Other annotators' answers count nothing, however many agree among themselves.
    assert metrics.vqa_question_accuracy("horse", answers) == 0.0


def test_vqa_accuracy_normalises_prediction_and_ground_truth_as_official():
  # Prediction "Two." -> "2". The annotators disagree, so their answers get the punctuation rule
  # only: "2." -> "2" matches, "two" stays "two" and does not. 2 matches -> 0.6.
  answers = ["2."] * 2 + ["two"] * 8
  assert metrics.vqa_question_accuracy("Two.", answers) == pytest.approx(0.6)
  # "red/white" -> "red white" for both: 3 matches -> 0.9.
  answers = ["red/white"] * 3 + ["red"] * 7
  assert metrics.vqa_question_accuracy("red white", answers) == pytest.approx(0.9)
  # Unanimous annotators get no processing at all: "yes." never equals a normalised prediction.
  assert metrics.vqa_question_accuracy("yes.", ["yes."] * 10) == 0.0
  assert metrics.vqa_question_accuracy("Yes.", ["yes"] * 10) == 1.0


def test_vqa_accuracy_over_questions():
  answers = {1: ["cat"] * 10, 2: ["dog"] + ["cat"] * 9, "q3": ["2"] * 3 + ["3"] * 7}
  predictions = {1: "a cat", 2: "dog", "q3": "two"}
  score, per_item = metrics.vqa_accuracy(predictions, answers)
  assert per_item == pytest.approx({1: 1.0, 2: 0.3, "q3": 0.9})
  assert score == pytest.approx((1.0 + 0.3 + 0.9) / 3)
  with pytest.raises(ValueError, match="same question ids"):
    metrics.vqa_accuracy({1: "cat"}, answers)
  with pytest.raises(ValueError, match="every annotator"):
    metrics.vqa_question_accuracy("cat", ["cat"])


@pytest.mark.parametrize("generated, expected", [
    (" yes Question: what is it?", "yes"),
    ("two dogs\nQuestion", "two dogs"),
    ("red Short answer: blue", "red"),
    ("Answer: blue", ""),
    ("blue\nred", "blue"),
    ("a question mark", "a question mark"),  # case-sensitive: only the turn words cut
])
def test_postprocess_vqa_generation(generated, expected):
  assert metrics.postprocess_vqa_generation(generated) == expected


@pytest.mark.parametrize("text, expected", [
    ("running", "run"), ("riding", "ride"), ("skating", "skate"), ("eating", "eat"),
    ("skiing", "ski"), ("dancing", "dance"), ("juggling", "juggle"), ("falling", "fall"),
    ("king", "king"), ("morning", "morn"), ("buildings", "build"), ("weddings", "wed"),
    ("flying", "fly"), ("using", "use"), ("nothing", "nothing"),
    ("cats", "cat"), ("berries", "berry"), ("pies", "pie"), ("boxes", "box"), ("dishes", "dish"),
    ("glasses", "glass"), ("buses", "bus"), ("horses", "horse"), ("potatoes", "potato"),
    ("shoes", "shoe"), ("leaves", "leaf"), ("waves", "wave"), ("men", "man"),
    ("people", "person"), ("boy's", "boy"), ("tennis", "tennis"), ("yes", "yes"), ("gas", "gas"),
    ("Riding Horses.", "ride horse."),
])
def test_stem_ok_vqa_answer(text, expected):
  assert metrics.stem_ok_vqa_answer(text) == expected


def test_postprocess_ok_vqa_generation():
  assert metrics.postprocess_ok_vqa_generation(" Surfing waves Question: x") == "surf wave"


# ---- Classification ----------------------------------------------------------------------------


def _brute_force_auc(scores, labels):
  pairs = [(p, n) for p, n in itertools.product(scores[labels == 1], scores[labels == 0])]
  return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])


def test_roc_auc_equals_pairwise_definition():
  rng = np.random.default_rng(0)
  for _ in range(5):
    labels = rng.integers(0, 2, 60)
    scores = rng.integers(0, 8, 60) / 4.0  # coarse values: many ties, within and across classes
    assert metrics.roc_auc(scores, labels) == pytest.approx(_brute_force_auc(scores, labels))


def test_roc_auc_hand_cases():
  assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
  assert metrics.roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
  # Pairs (pos, neg): (0.5, 0.5) tie = 0.5, (0.5, 0.1) = 1, (0.3, 0.5) = 0, (0.3, 0.1) = 1 -> 2.5/4.
  assert metrics.roc_auc([0.5, 0.3, 0.5, 0.1], [True, True, False, False]) == 0.625
  with pytest.raises(ValueError, match="both classes"):
    metrics.roc_auc([0.1, 0.2], [1, 1])
  with pytest.raises(ValueError, match="0 or 1"):
    metrics.roc_auc([0.1, 0.2], [1, 2])


def test_top_k_accuracy():
  scores = np.array([[0.1, 0.7, 0.2],    # label 1 is best
                     [0.5, 0.3, 0.2],    # label 2 is third
                     [0.4, 0.4, 0.2],    # label 1 ties with class 0, which has the lower index
                     [0.4, 0.4, 0.2]])   # label 0 wins the tie
  labels = [1, 2, 1, 0]
  assert metrics.top_k_accuracy(scores, labels, k=1) == 0.5
  assert metrics.top_k_accuracy(scores, labels, k=2) == 0.75
  assert metrics.top_k_accuracy(scores, labels, k=3) == 1.0
  rng = np.random.default_rng(1)
  scores, labels = rng.normal(size=(50, 20)), rng.integers(0, 20, 50)
  top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
  expected = np.mean([label in row for label, row in zip(labels, top5)])
  assert metrics.top_k_accuracy(scores, labels, k=5) == pytest.approx(expected)
  with pytest.raises(ValueError, match="k must be"):
    metrics.top_k_accuracy(scores, labels, k=21)
