"""Harness fidelity: our evaluation of a converted tiny OpenFlamingo model against OpenFlamingo
2.0.1's own evaluation code (``open_flamingo/eval/evaluate.py``: ``evaluate_captioning``,
``evaluate_vqa``, its CIDEr through pycocoevalcap and its VQA accuracy) on a tiny COCO-format and
VQAv2-format set written here (Karpathy JSON, COCO caption annotations, VQAv2 questions and
annotations, JPEG files), at 0 and 4 shots, greedy: the same prediction for every query and the
same score.

The demonstration pools hold copies of one example, so both harnesses' (differently seeded)
random demonstrations are the same prompts. The pip package lacks OpenFlamingo's ``EvalModel``
(``eval/models/open_flamingo.py``), so ``_TheirEvalModel`` plays it: its prompts and its
``generate`` call (left padding, images [B, T, 1, C, H, W], new tokens decoded without special
tokens). The tokenizer splits on spaces only, so the newline OpenFlamingo puts after each
demonstration is a token of its own and the prompts must agree on it.

One policy differs, by design, and is aligned here: our decoding never emits ``<image>``;
OpenFlamingo's ``generate`` may (this tiny random model does), and its decoded text then drops
the token silently while the continuation went on from it. ``_TheirEvalModel`` suppresses it too.
"""

import importlib.util
import json
import os
import pathlib
import sys
import types

import numpy as np
import PIL.Image
import pycocoevalcap.eval as pycocoevalcap_eval
import pytest
import tokenizers
import torch
import transformers

import reference_models as ref
import xattn_vlm
from xattn_vlm.inference import loading
from xattn_vlm.eval import runner

pytestmark = pytest.mark.slow

SHOTS = (0, 4)
TEST_IDS = (11, 12, 13, 14)
TRAIN_IDS = (1, 2, 3, 4, 5)


def _write_tokenizer(folder):
  """The references' 64 words, split on spaces only (a newline stays a token: unknown, w0)."""
  vocab = {f"w{i}": i for i in range(ref.TOKENIZER_VOCAB)}
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
  raw.pre_tokenizer = tokenizers.pre_tokenizers.Split(" ", "removed")
  transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="w2").save_pretrained(
      folder)


def _image(path, seed):
  pixels = np.random.default_rng(seed).integers(0, 256, (ref.IMAGE_SIZE, ref.IMAGE_SIZE, 3))
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)


def _write_data(root):
  """COCO (Karpathy split + caption annotations) and VQAv2 files under ``root`` as they ship."""
  for split, ids in (("train2014", TRAIN_IDS), ("val2014", TEST_IDS)):
    for i in ids:
      # Every training image is the same picture: the demonstrations cannot differ.
      _image(root / "coco" / split / f"COCO_{split}_{i:012d}.jpg", 0 if split == "train2014" else i)
  karpathy = {"images": [
      {"filepath": "train2014" if i in TRAIN_IDS else "val2014",
       "filename": f"COCO_{'train' if i in TRAIN_IDS else 'val'}2014_{i:012d}.jpg", "cocoid": i,
       "split": "train" if i in TRAIN_IDS else "test",
       "sentences": [{"raw": "w10 w11 w12", "tokens": ["w10", "w11", "w12"]}]}
      for i in TRAIN_IDS + TEST_IDS]}
  (root / "karpathy").mkdir()
  (root / "karpathy" / "dataset_coco.json").write_text(json.dumps(karpathy))
  (root / "vqav2").mkdir()
  for split, ids in (("train2014", TRAIN_IDS), ("val2014", TEST_IDS)):
    questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
                 "data_subtype": split, "license": {}, "questions": [
        {"image_id": i, "question": "w20 w21", "question_id": 100 * i} for i in ids]}
    (root / "vqav2" / f"v2_OpenEnded_mscoco_{split}_questions.json").write_text(
        json.dumps(questions))
  _write_references(root, {i: ["w30"] * 10 for i in TEST_IDS}, {i: "w30 w31" for i in TEST_IDS})


def _write_references(root, answers, captions):
  """The test split's references: VQA ``answers`` (10 per image id), one caption per image id
  (in the Karpathy file ours reads and in the COCO annotations OpenFlamingo's CIDEr reads); the
  training split's answer is w30."""
  for split, ids in (("train2014", TRAIN_IDS), ("val2014", TEST_IDS)):
    annotations = {"info": {}, "data_type": "mscoco", "data_subtype": split, "license": {},
                   "annotations": [
        {"question_id": 100 * i, "image_id": i, "question_type": "what", "answer_type": "other",
         "multiple_choice_answer": (answers[i] if split == "val2014" else ["w30"])[0],
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1}
                     for k, a in enumerate(answers[i] if split == "val2014" else ["w30"] * 10)]}
        for i in ids]}
    (root / "vqav2" / f"v2_mscoco_{split}_annotations.json").write_text(json.dumps(annotations))
  path = root / "karpathy" / "dataset_coco.json"
  karpathy = json.loads(path.read_text())
  for entry in karpathy["images"]:
    if entry["split"] == "test":
      entry["sentences"] = [{"raw": captions[entry["cocoid"]],
                             "tokens": captions[entry["cocoid"]].split()}]
  path.write_text(json.dumps(karpathy))
  coco = {"info": {}, "licenses": [], "type": "captions",
          "images": [{"id": i} for i in TEST_IDS],
          "annotations": [{"image_id": i, "id": i, "caption": captions[i]} for i in TEST_IDS]}
  (root / "captions_val2014.json").write_text(json.dumps(coco))


def _import_their_evaluation():
  """open_flamingo/eval/evaluate.py with the packages it imports but these tasks never use
  stubbed (open_clip, torchvision, sklearn, nltk, inflection), then removed again, as are its
  sibling modules (utils, coco_metric, ...), whose bare names must not shadow later imports."""
  stubs = {"open_clip": {}, "torchvision": {}, "torchvision.datasets": {"ImageFolder": object},
           "sklearn": {}, "sklearn.metrics": {"roc_auc_score": None},
           "nltk": {"stem": types.SimpleNamespace(WordNetLemmatizer=object)},
           "nltk.corpus": {}, "nltk.corpus.reader": {"VERB": "v"}, "inflection": {}}
  added = [name for name in stubs if name not in sys.modules]
  for name in added:
    sys.modules[name] = types.ModuleType(name)
    for key, value in stubs[name].items():
      setattr(sys.modules[name], key, value)
  folder = pathlib.Path(importlib.util.find_spec("open_flamingo").origin).parent / "eval"
  # Its modules import each other by bare name (utils, coco_metric, ...).
  before = set(sys.modules)
  sys.path.insert(0, str(folder))
  try:
    spec = importlib.util.spec_from_file_location("openflamingo_evaluate", folder / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(str(folder))
    for name in added:
      del sys.modules[name]
    for name in set(sys.modules) - before:
      if (folder / f"{name}.py").is_file():
        del sys.modules[name]
  return module


class _TheirEvalModel:
  """OpenFlamingo's ``EvalModel`` for its own ``Flamingo`` (absent from the pip package)."""

  def __init__(self, model, tokenizer, mean, std):
    self.model, self.tokenizer, self.device = model, tokenizer, "cpu"
    # transformers 5 drops an all-ones attention mask from generate's calls, which OpenFlamingo's
    # LM forward requires (it was written for transformers 4): all ones is what it stood for.
    forward = model.lang_encoder.forward

    def forward_with_mask(input_ids=None, attention_mask=None, **kwargs):
      if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
      return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.lang_encoder.forward = forward_with_mask
    self.mean = torch.tensor(mean).view(3, 1, 1)
    self.std = torch.tensor(std).view(3, 1, 1)

  def get_caption_prompt(self, caption=None):
    return f"<image>Output:{caption if caption is not None else ''}" + (
        "<|endofchunk|>" if caption is not None else "")

  def get_vqa_prompt(self, question, answer=None):
    return f"<image>Question:{question} Short answer:{answer if answer is not None else ''}" + (
        "<|endofchunk|>" if answer is not None else "")

  def _pixels(self, image):
    x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255.0).permute(2, 0, 1)
    return (x - self.mean) / self.std

  def get_outputs(self, batch_text, batch_images, min_generation_length, max_generation_length,
                  num_beams, length_penalty):
    count = max(len(images) for images in batch_images)
    pixels = torch.zeros(len(batch_images), count, 1, 3, ref.IMAGE_SIZE, ref.IMAGE_SIZE)
    for b, images in enumerate(batch_images):
      for t, image in enumerate(images):
        pixels[b, t, 0] = self._pixels(image)
    self.tokenizer.padding_side = "left"
    text = self.tokenizer(batch_text, padding="longest", return_tensors="pt")
    with torch.no_grad():
      # min_new_tokens is 0 in both tasks; passed on, transformers 5 calls the LM without
      # the attention mask OpenFlamingo's forward requires.
      assert min_generation_length == 0
      out = self.model.generate(pixels, text["input_ids"], text["attention_mask"],
                                max_new_tokens=max_generation_length, num_beams=num_beams,
                                length_penalty=length_penalty,
                                suppress_tokens=[ref.PAD, ref.MEDIA])
    return self.tokenizer.batch_decode(out[:, text["input_ids"].shape[1]:],
                                       skip_special_tokens=True)


class _NoScorer:
  def compute_score(self, gts, res):
    del gts
    return 0.0, [0.0] * len(res)

  def method(self):
    return "none"


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


@pytest.fixture(scope="module")
def theirs_and_ours(tmp_path_factory, monkeypatch_module):
  monkeypatch = monkeypatch_module
  torch.set_num_threads(1)
  root = tmp_path_factory.mktemp("fidelity")
  reference = ref.openflamingo("mpt1b", root / "reference")
  _write_tokenizer(reference.lm)
  converted = root / "converted"
  loading.convert_published(
      "openflamingo", str(reference.checkpoint), str(converted), lm=str(reference.lm),
      vision=str(reference.vision), preset="openflamingo_3b",
      changes={"lm.vocab_size": ref.TOKENIZER_VOCAB, "dtype": "float32",
               "resampler.depth": ref.PERCEIVER_DEPTH})
  model, processor, _ = xattn_vlm.from_pretrained(converted)
  data = root / "data"
  _write_data(data)

  evaluate = _import_their_evaluation()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(reference.lm))
  tokenizer.add_special_tokens({"additional_special_tokens": ["<|endofchunk|>", "<image>"]})
  tokenizer.add_special_tokens({"pad_token": "<PAD>"})
  assert tokenizer.convert_tokens_to_ids(["<|endofchunk|>", "<image>", "<PAD>"]) == [
      ref.EOC, ref.MEDIA, ref.PAD]
  their_model = _TheirEvalModel(reference.model, tokenizer, model.config.vision.image_mean,
                                model.config.vision.image_std)
  args = types.SimpleNamespace(
      model="open_flamingo", num_samples=-1, batch_size=2, rices=False,
      query_set_size=len(TRAIN_IDS), rank=0, world_size=1,
      coco_train_image_dir_path=str(data / "coco" / "train2014"),
      coco_val_image_dir_path=str(data / "coco" / "val2014"),
      coco_karpathy_json_path=str(data / "karpathy" / "dataset_coco.json"),
      coco_annotations_json_path=str(data / "captions_val2014.json"),
      **{f"vqav2_{split}_{kind}": str(data / path)
         for split, subset in (("train", "train2014"), ("test", "val2014"))
         for kind, path in (
             ("image_dir_path", f"coco/{subset}"),
             ("questions_json_path", f"vqav2/v2_OpenEnded_mscoco_{subset}_questions.json"),
             ("annotations_json_path", f"vqav2/v2_mscoco_{subset}_annotations.json"))})
  captured = {}

  def capture(name, metric):
    def wrapped(*a, **kw):
      path = kw.get("result_path") or kw.get("result_json_path") or a[0]
      captured[name] = json.loads(pathlib.Path(path).read_text())
      return metric(*a, **kw)
    return wrapped

  # It gathers predictions over a process group: one process here.
  torch.distributed.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=0,
                                       world_size=1)
  compute_cider, compute_vqa_accuracy = evaluate.compute_cider, evaluate.compute_vqa_accuracy
  # Their CIDEr runs every COCO scorer; SPICE downloads Stanford CoreNLP and METEOR starts a
  # Java server, neither of which CIDEr uses: both score 0 here.
  for name in ("Spice", "Meteor"):
    monkeypatch.setattr(pycocoevalcap_eval, name, _NoScorer)
  evaluate.compute_cider = capture("coco", compute_cider)
  evaluate.compute_vqa_accuracy = capture("vqav2", compute_vqa_accuracy)
  predictions = {}
  cwd = os.getcwd()
  os.chdir(root)  # it writes its result files into the working directory
  try:
    for shots in SHOTS:
      evaluate.evaluate_captioning(args, their_model, num_beams=1, num_shots=shots)
      evaluate.evaluate_vqa(args, their_model, num_beams=1, num_shots=shots)
      predictions[("coco", shots)] = {p["image_id"]: p["caption"] for p in captured["coco"]}
      predictions[("vqav2", shots)] = {p["question_id"]: p["answer"] for p in captured["vqav2"]}
  finally:
    os.chdir(cwd)
    torch.distributed.destroy_process_group()

  # References that half the queries' predictions match (at the first shot count), so the scores
  # compare two nonzero numbers; the predictions do not depend on them.
  first = SHOTS[0]
  answers = {i: [predictions[("vqav2", first)][100 * i].strip()] * 3 + ["w31"] * 7
             if k % 2 == 0 else ["w31"] * 10 for k, i in enumerate(TEST_IDS)}
  captions = {i: predictions[("coco", first)][i].strip() if k % 2 == 0 else "w40 w41 w42"
              for k, i in enumerate(TEST_IDS)}
  _write_references(data, answers, captions)
  scores = {}
  for (task, shots), predicted in predictions.items():
    path = root / f"{task}_{shots}.json"
    if task == "coco":
      path.write_text(json.dumps([{"image_id": k, "caption": v} for k, v in predicted.items()]))
      scores[(task, shots)] = compute_cider(
          result_path=str(path), annotations_path=args.coco_annotations_json_path)["CIDEr"] * 100
    else:
      path.write_text(json.dumps([{"question_id": k, "answer": v} for k, v in predicted.items()]))
      scores[(task, shots)] = compute_vqa_accuracy(
          str(path), args.vqav2_test_questions_json_path, args.vqav2_test_annotations_json_path)

  config = runner.default_config()
  config.tasks = "coco,vqav2"
  config.shots = SHOTS
  config.trials = 1
  config.num_beams = 1
  config.batch_size = 8
  config.pool_subset = len(TRAIN_IDS)
  config.data_root = str(data)
  output = root / "ours"
  runner.evaluate(model, processor, config, str(output))
  return predictions, scores, output


@pytest.mark.parametrize("task", ["coco", "vqav2"])
@pytest.mark.parametrize("shots", SHOTS)
def test_same_predictions_and_scores_as_openflamingo(theirs_and_ours, task, shots):
  predictions, scores, output = theirs_and_ours
  rows = [json.loads(line) for line in
          (output / "predictions" / task / f"{shots}shot_trial0.jsonl").read_text().splitlines()]
  ours = {row["id"]: row["prediction"].strip() for row in rows}
  theirs = {k: v.strip() for k, v in predictions[(task, shots)].items()}
  assert ours == theirs and any(theirs.values())
  results = json.loads((output / "results.json").read_text())["results"]
  assert results[task][str(shots)]["mean"] == pytest.approx(scores[(task, shots)], abs=1e-6)
  if shots == SHOTS[0]:
    assert scores[(task, shots)] > 0
