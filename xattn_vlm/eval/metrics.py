"""Benchmark metrics: CIDEr-D, VQA accuracy, OK-VQA stemming, ROC-AUC and top-k accuracy.

Each metric follows the algorithm its benchmark publishes, so our numbers sit beside the published
tables: CIDEr-D as in Vedantam et al. 2015 and the COCO caption evaluation, VQA accuracy as in the
official VQA evaluation (Antol et al. 2015; Goyal et al. 2017), and the answer post-processing of
the OpenFlamingo evaluation. Scores come back on their natural scale (CIDEr about 0-10, accuracies
and ROC-AUC in [0, 1]); published tables print them times 100.
"""

from __future__ import annotations

import collections
import math
import re
import shutil
from typing import Hashable, Mapping, Sequence, TypeVar

import numpy as np

K = TypeVar("K", bound=Hashable)

# --------------------------------------------------------------------------------------------------
# Caption tokenisation
# --------------------------------------------------------------------------------------------------

# Tokens the COCO caption evaluation deletes after Stanford's PTB tokenizer has run. Bracket
# tokens are in that list upper-case (-LRB-) while the tokenizer emits them lower-cased, so
# brackets survive as "-lrb-" & co.; we keep that quirk so that both tokenizers agree.
PTB_DROPPED_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'])
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_PTB_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "st", "jr", "sr", "vs", "mt", "prof", "inc", "ltd",
                      "co", "etc")
_CAPTION_TOKEN = re.compile(
    r"(?:[a-z]\.){2,}"                                                # u.s.  p.m.
    rf"|\b(?:{'|'.join(_PTB_ABBREVIATIONS)})\.(?=\s|$)"               # mr.  dr.
    r"|\d+(?:[.,:]\d+)+"                                              # 1,000  3.5  10:30
    r"|[#@]?\w+(?:['/&-]\w+)*"                                        # well-known  o'clock  a/b
    r"|\S")                                                           # any other character
_CLITIC = re.compile(r"^(\w+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_QUOTE_FORMS = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def tokenize_caption(text: str) -> str:
  """Lower-cased, space-separated tokens in the convention of the COCO caption evaluation.

  The official evaluation runs Stanford's PTB tokenizer (which needs Java) and then deletes
  punctuation tokens. This is a small approximation of it in plain Python: lower-case; split off
  the clitics "n't 's 're 've 'll 'd 'm" ("don't" -> "do n't"); keep numbers with separators
  ("1,000", "3.5"), hyphenated and slashed words ("x-ray", "a/b"), dotted abbreviations ("u.s.",
  "mr.") and #/@ words whole; split every other symbol off as its own token ("$ 5", "50 %"); map
  brackets to PTB's "-lrb-" forms; delete quotes and . ? ! , : ; - . Use
  ``tokenize_captions(..., backend="ptb")`` for the exact Java tokenizer.
  """
  tokens = []
  for match in _CAPTION_TOKEN.finditer(text.translate(_QUOTE_FORMS).lower()):
    token = match.group()
    clitic = _CLITIC.match(token)
    if clitic:
      tokens.extend(clitic.groups())
    elif token in _PTB_BRACKETS:
      tokens.append(_PTB_BRACKETS[token])
    elif token not in PTB_DROPPED_PUNCTUATION:
      tokens.append(token)
  return " ".join(tokens)


def tokenize_captions(captions: Mapping[K, Sequence[str]], *,
                      backend: str = "simple") -> dict[K, list[str]]:
  """Tokenises every caption of ``{id: [caption, ...]}`` for ``cider``.

  ``backend="simple"`` uses ``tokenize_caption``; ``backend="ptb"`` uses pycocoevalcap's
  PTBTokenizer (Stanford's Java tokenizer, exactly what the COCO evaluation runs; needs ``java``).
  """
  if backend == "simple":
    return {key: [tokenize_caption(c) for c in caps] for key, caps in captions.items()}
  if backend != "ptb":
    raise ValueError(f"backend must be 'simple' or 'ptb', got {backend!r}")
  if shutil.which("java") is None:
    raise RuntimeError("backend='ptb' runs Stanford's PTB tokenizer, which needs `java` on PATH; "
                       "install a JRE or use backend='simple'")
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # optional: only the 'ptb' backend
  # The Java tokenizer reads one caption per line: a newline inside a caption would misalign them.
  flat = {key: [{"caption": c.replace("\n", " ")} for c in caps] for key, caps in captions.items()}
  return PTBTokenizer().tokenize(flat)


# --------------------------------------------------------------------------------------------------
# CIDEr-D
# --------------------------------------------------------------------------------------------------


def _ngram_counts(sentence: str, max_n: int) -> collections.Counter:
  """Counts of every 1..max_n-gram of a whitespace-tokenised sentence."""
  words = sentence.split()
  return collections.Counter(
      tuple(words[i:i + n]) for n in range(1, max_n + 1) for i in range(len(words) - n + 1))


def cider(predictions: Mapping[K, str], references: Mapping[K, Sequence[str]], *,
          max_n: int = 4, sigma: float = 6.0) -> tuple[float, dict[K, float]]:
  """CIDEr-D of tokenised predictions against tokenised references (Vedantam et al. 2015).

  For each n-gram order n = 1..max_n, every sentence becomes a tf-idf vector: the n-gram's count
  times log(#items / df), with df the number of items whose references contain the n-gram (so the
  idf is estimated on the evaluated set's references, as the COCO evaluation does). A prediction
  scores against each reference the cosine of their vectors with the prediction's counts clipped
  to the reference's (the "-D" that stops repetition from paying), damped by the Gaussian length
  penalty exp(-(len_pred - len_ref)^2 / (2 sigma^2)). Per item: 10 x the mean over orders and
  references; overall: the mean over items. Returns ``(score, {id: item score})``.

  Args:
    predictions: ``{id: tokenised caption}`` (tokens separated by whitespace).
    references: ``{id: [tokenised reference, ...]}`` with the same ids, at least one each.
    max_n: the highest n-gram order.
    sigma: the width of the length penalty, in tokens.
  """
  if set(predictions) != set(references):
    missing = set(references) - set(predictions)
    extra = set(predictions) - set(references)
    raise ValueError("predictions and references must have the same ids; "
                     f"ids without a prediction: {sorted(map(repr, missing))[:5]}, "
                     f"ids without references: {sorted(map(repr, extra))[:5]}")
  if not references:
    raise ValueError("references is empty: CIDEr needs at least one item")
  for key, refs in references.items():
    if isinstance(refs, str) or not refs:
      raise ValueError(f"references[{key!r}] must be a non-empty list of captions, got {refs!r}")
  for key, pred in predictions.items():
    if not isinstance(pred, str):
      raise TypeError(f"predictions[{key!r}] must be a str, got {type(pred).__name__}")

  ref_counts = {key: [_ngram_counts(r, max_n) for r in refs] for key, refs in references.items()}
  document_frequency = collections.Counter()
  for counts in ref_counts.values():
    document_frequency.update(set().union(*counts))
  log_items = math.log(len(references))

  def tfidf(counts: collections.Counter) -> tuple[list[dict], list[float], int]:
    """Per-order tf-idf vectors, their norms, and the sentence length in tokens."""
    vectors = [{} for _ in range(max_n)]
    for gram, count in counts.items():
      idf = log_items - math.log(max(1, document_frequency[gram]))
      vectors[len(gram) - 1][gram] = count * idf
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    length = sum(count for gram, count in counts.items() if len(gram) == 1)
    return vectors, norms, length

  per_item = {}
  for key, pred in predictions.items():
    pred_vectors, pred_norms, pred_length = tfidf(_ngram_counts(pred, max_n))
    total = 0.0
    for counts in ref_counts[key]:
      ref_vectors, ref_norms, ref_length = tfidf(counts)
      penalty = math.exp(-((pred_length - ref_length) ** 2) / (2 * sigma ** 2))
      for n in range(max_n):
        if pred_norms[n] == 0 or ref_norms[n] == 0:
          continue
        ref_vector = ref_vectors[n]
        clipped = sum(min(value, ref_vector[gram]) * ref_vector[gram]
                      for gram, value in pred_vectors[n].items() if gram in ref_vector)
        total += penalty * clipped / (pred_norms[n] * ref_norms[n])
    per_item[key] = 10.0 * total / (max_n * len(ref_counts[key]))
  return float(np.mean(list(per_item.values()))), per_item


# --------------------------------------------------------------------------------------------------
# VQA accuracy
# --------------------------------------------------------------------------------------------------

# Contractions as the official evaluation writes them. Its map sends each spelling with exactly one
# apostrophe missing to the full form ("dont" -> "don't", "hed've" and "he'dve" -> "he'd've"), so we
# list the full forms and derive the map. The forms with a capital I yield keys ("Im", "Ive") that
# never match the lower-cased answers: as in the official map, which has them too.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't "
    "haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am "
    "mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't "
    "she'd've should've shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've "
    "we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've "
    "who'll who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll "
    "y'all'd've you'd you'd've you'll you're you've").split()


def _contraction_map() -> dict[str, str]:
  """Every spelling of a contraction with one apostrophe left out -> the contraction."""
  mapping = {}
  for full in _CONTRACTIONS:
    for i, char in enumerate(full):
      if char == "'":
        mapping[full[:i] + full[i + 1:]] = full
  # The official map also turns "somebody'd" into "somebodyd" (the reverse of its other entries).
  mapping["somebody'd"] = "somebodyd"
  return mapping


CONTRACTIONS = _contraction_map()
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset(["a", "an", "the"])
# Punctuation the official evaluation deletes or turns into a space (periods have their own rule).
VQA_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                   "@", "`", ",", "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"\d,\d")
# The official pattern reads "(?!<=\d)(\.)(?!\d)": its look-behind is written as a look-ahead,
# which always passes, so in effect a period goes unless a digit follows it ("3." loses its
# period, "3.5" and ".5" keep theirs).
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_vqa_punctuation(text: str) -> str:
  """The official punctuation rule for VQA answers.

  Each mark of ``VQA_PUNCTUATION`` is deleted where the answer has it next to a space, or anywhere
  once the answer has a comma between two digits ("1,000" -> "1000"); otherwise it becomes a space
  ("red/white" -> "red white"). Then every period not followed by a digit is deleted.
  """
  deletes = _COMMA_BETWEEN_DIGITS.search(text) is not None
  out = text
  for mark in VQA_PUNCTUATION:
    if deletes or mark + " " in text or " " + mark in text:
      out = out.replace(mark, "")
    else:
      out = out.replace(mark, " ")
  return _PERIOD.sub("", out)


def normalize_vqa_words(text: str) -> str:
  """The official word rule: lower-case, number words to digits, no articles, contractions fixed."""
  words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
  return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_vqa_answer(text: str) -> str:
  """A predicted answer as the official evaluation compares it: whitespace, punctuation, words."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return normalize_vqa_words(normalize_vqa_punctuation(text))


def vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Accuracy of one predicted answer against the annotators' answers (10 in VQAv2).

  An answer counts as right when at least 3 annotators gave it: for each annotator left out in
  turn, ``min(1, #matches among the others / 3)``, averaged over the annotators. As the official
  evaluation does, the prediction is normalised with ``normalize_vqa_answer``; the annotators'
  answers (already normalised in the official annotation files) only get the punctuation rule, and
  only when they disagree.
  """
  if isinstance(answers, str) or len(answers) < 2:
    raise ValueError("answers must be the list of every annotator's answer (10 in VQAv2), as "
                     f"accuracy leaves one annotator out at a time; got {answers!r}. For data "
                     "with a single reference answer use exact match instead")
  prediction = normalize_vqa_answer(prediction)
  if len(set(answers)) > 1:
    answers = [normalize_vqa_punctuation(a) for a in answers]
  matches = sum(answer == prediction for answer in answers)
  # Leaving out an annotator who gave the prediction leaves matches - 1 among the others.
  per_annotator = [min(1.0, (matches - (answer == prediction)) / 3) for answer in answers]
  return sum(per_annotator) / len(per_annotator)


def vqa_accuracy(predictions: Mapping[K, str],
                 answers: Mapping[K, Sequence[str]]) -> tuple[float, dict[K, float]]:
  """Mean VQA accuracy over questions; returns ``(score, {id: question accuracy})``.

  Args:
    predictions: ``{question id: predicted answer}`` (post-processed, see
      ``postprocess_vqa_generation``).
    answers: ``{question id: [every annotator's answer]}`` with the same ids.
  """
  if set(predictions) != set(answers):
    raise ValueError("predictions and answers must have the same question ids; "
                     f"{len(set(answers) - set(predictions))} ids lack a prediction and "
                     f"{len(set(predictions) - set(answers))} ids lack answers")
  if not answers:
    raise ValueError("answers is empty: VQA accuracy needs at least one question")
  per_item = {key: vqa_question_accuracy(predictions[key], answers[key]) for key in answers}
  return float(np.mean(list(per_item.values()))), per_item


_VQA_CUT = re.compile(r"Question|Answer|Short|\n")


def postprocess_vqa_generation(text: str) -> str:
  """The answer part of a generated continuation.

  Models keep writing after a short answer: a new "Question:", "Answer:" or "Short answer:" turn,
  or a new line. The text is cut at the first of those (case-sensitive, as OpenFlamingo) and
  stripped.
  """
  return _VQA_CUT.split(text, maxsplit=1)[0].strip()


# OK-VQA v1.1 compares stemmed answers: plural nouns singular, "-ing" verbs in their base form.
# OpenFlamingo reproduces that with NLTK's part-of-speech tagger, WordNet's lemmatiser and the
# `inflection` package plus a list of fixes; we use rules that need no tagger or lexicon. Words the
# rules would get wrong, as OK-VQA's stemmed answers have them, and words to leave as they are:
_OK_VQA_WORDS = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
    "leaves": "leaf", "knives": "knife", "wives": "wife", "wolves": "wolf", "halves": "half",
    "clothes": "cloth", "clothing": "cloth", "lenses": "lens", "using": "use", "dying": "die",
    "lying": "lie", "tying": "tie",
    **{word: word for word in (
        "yes", "does", "always", "perhaps", "series", "species", "news", "christmas", "vegas",
        "las", "texas", "dallas", "kansas", "nothing", "something", "anything", "everything",
        "ceiling", "during")},
}
_VOWELS = frozenset("aeiou")


def _vowel_consonant_pattern(word: str) -> str:
  """'v'/'c' per letter; y is a vowel after a consonant (Porter's convention)."""
  pattern = []
  for letter in word:
    vowel = letter in _VOWELS or (letter == "y" and pattern and pattern[-1] == "c")
    pattern.append("v" if vowel else "c")
  return "".join(pattern)


def _strip_ing(word: str) -> str:
  """The base form of an "-ing" word: "running" -> "run", "riding" -> "ride", "king" -> "king"."""
  stem = word[:-3]
  pattern = _vowel_consonant_pattern(stem)
  if len(stem) < 2 or "v" not in pattern:
    return word  # "king", "thing", "spring": no verb inside
  if stem[-1] == stem[-2] and pattern[-1] == "c" and stem[-1] not in "lsfz":
    return stem[:-1]  # a doubled final consonant: "swimming", "setting"
  syllables = pattern.count("vc")
  needs_e = (
      stem[-1] in "cuv"  # "dancing", "continuing", "serving"
      or stem.endswith(("dg", "rg", "lg", "iz"))  # "judging", "charging", "socializing"
      or (stem[-1] == "l" and stem[-2] in "bcdfgkptz")  # "juggling", "cycling"
      or (stem.endswith("at") and pattern[-3:-2] == "c")  # "skating", "decorating" (not "eating")
      or (syllables == 1 and pattern.endswith("cvc") and stem[-1] not in "wxy"))  # "riding"
  return stem + "e" if needs_e else stem


def _singularize(word: str) -> str:
  """A plural noun's singular: "berries" -> "berry", "boxes" -> "box", "cats" -> "cat"."""
  if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
    return word
  if word.endswith("ies") and len(word) > 4:
    return word[:-3] + "y"
  if word.endswith(("xes", "ches", "shes", "sses", "zzes")) or re.search(r"[^aeiou]uses$", word):
    return word[:-2]
  if word.endswith("oes") and len(word) > 5:
    return word[:-2]  # "potatoes", but "shoes" and "toes" keep their e
  return word[:-1]


def _stem_word(word: str) -> str:
  """One lower-case word in OK-VQA's stemmed form: the first rule that applies wins."""
  if word in _OK_VQA_WORDS:
    return _OK_VQA_WORDS[word]
  if word.endswith("'s"):
    return word[:-2]
  if word.endswith("ings"):
    return _strip_ing(word[:-1])
  if word.endswith("ing"):
    return _strip_ing(word)
  return _singularize(word)


def stem_ok_vqa_answer(text: str) -> str:
  """An answer in OK-VQA's stemmed form, lower-cased: "Riding horses" -> "ride horse".

  Per word, the first rule that applies: the fixed words above; a possessive "'s" goes; "-ing"
  and "-ings" words get their base form (undoubling a final consonant, restoring a silent e
  after a short syllable or an ending such as "-dg" or "-v"); other words ending in "s" lose
  their plural ending ("ies" -> "y"; "es" after x, ch, sh, ss, zz, a consonant + "us", or "o" in
  longer words; else "s"), except words ending in "ss", "us" or "is" and words of 3 letters or
  fewer. Unlike a tagger, the rules also singularise verbs ("he runs" -> "he run"); answers are
  mostly noun phrases, where that rarely matters.
  """
  return re.sub(r"[a-z0-9']+", lambda m: _stem_word(m.group()), text.lower())


def postprocess_ok_vqa_generation(text: str) -> str:
  """``postprocess_vqa_generation`` then ``stem_ok_vqa_answer``, as OK-VQA is scored."""
  return stem_ok_vqa_answer(postprocess_vqa_generation(text))


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[int] | np.ndarray) -> float:
  """Area under the ROC curve (Hateful Memes): the chance that a random positive outscores a
  random negative, ties counting half.

  Computed from ranks (the Mann-Whitney U statistic): tied scores share their mean rank, and
  ``AUC = (sum of positive ranks - P (P + 1) / 2) / (P N)`` for P positives and N negatives.

  Args:
    scores: ``[n]`` scores, higher meaning more positive (e.g. the probability of "yes").
    labels: ``[n]`` labels in {0, 1} (or booleans), with both classes present.
  """
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 1 or labels.shape != scores.shape:
    raise ValueError("scores and labels must be 1-D of the same length, got shapes "
                     f"{scores.shape} and {labels.shape}")
  if not np.all(np.isfinite(scores)):
    raise ValueError("scores must be finite, got NaN or infinity")
  if not np.all((labels == 0) | (labels == 1)):
    raise ValueError(f"labels must be 0 or 1, got values {np.unique(labels)[:5]}")
  positive = labels == 1
  num_pos, num_neg = int(positive.sum()), int((~positive).sum())
  if num_pos == 0 or num_neg == 0:
    raise ValueError(f"ROC-AUC needs both classes, got {num_pos} positives and {num_neg} negatives")
  _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
  mid_ranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based mean rank of each tied group
  ranks = mid_ranks[group]
  return float((ranks[positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def top_k_accuracy(scores: np.ndarray, labels: Sequence[int] | np.ndarray, k: int = 1) -> float:
  """Fraction of examples whose true class is among the k best-scored classes (ImageNet).

  A class's rank is the number of classes scored higher plus the number scored equal with a lower
  index (the order a stable sort gives), so ties never let two classes share a place.

  Args:
    scores: ``[n, num_classes]`` scores, e.g. length-normalised log-probabilities of class names.
    labels: ``[n]`` true class indices.
    k: how many of the best classes count.
  """
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.ndim != 2 or labels.shape != scores.shape[:1] or not len(labels):
    raise ValueError("scores must be [n, num_classes] and labels [n] with n > 0, got shapes "
                     f"{scores.shape} and {labels.shape}")
  if np.isnan(scores).any():
    raise ValueError("scores contain NaN")
  num_classes = scores.shape[1]
  if not 1 <= k <= num_classes:
    raise ValueError(f"k must be in [1, {num_classes}] (the number of classes), got {k}")
  if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must be class indices in [0, {num_classes}), got {labels[:5]}")
  true_scores = np.take_along_axis(scores, labels[:, None], axis=1)  # [n, 1]
  before = np.arange(num_classes)[None, :] < labels[:, None]  # [n, num_classes]
  rank = (scores > true_scores).sum(1) + ((scores == true_scores) & before).sum(1)
  return float(np.mean(rank < k))
