"""Sources read every supported layout from small fixtures written here; bad input is skipped and
counted; a missing dataset path fails at construction naming the path."""

import io
import json
import pathlib
import tarfile

import numpy as np
import PIL.Image
import pytest

from xattn_vlm.data.shapes import records as shapes_records
from xattn_vlm.data import images
from xattn_vlm.data.shapes import world as shapes_world
from xattn_vlm.data import sources


def jpeg_bytes(seed: int, size: int = 12) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  PIL.Image.fromarray(pixels).save(buffer, format="JPEG")
  return buffer.getvalue()


def write_jpeg(path: pathlib.Path, seed: int) -> pathlib.Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(jpeg_bytes(seed))
  return path


def test_image_text_folder_pairs_txt_and_json_and_skips_unpaired(tmp_path):
  write_jpeg(tmp_path / "000" / "a.jpg", 0)
  (tmp_path / "000" / "a.txt").write_text("a red circle\n")
  write_jpeg(tmp_path / "000" / "b.jpg", 1)
  (tmp_path / "000" / "b.json").write_text(json.dumps({"caption": "a blue square", "url": "x"}))
  write_jpeg(tmp_path / "001" / "c.jpg", 2)  # no caption file
  (tmp_path / "001" / "d.txt").write_text("no image")  # no image
  write_jpeg(tmp_path / "001" / "e.jpg", 3)
  (tmp_path / "001" / "e.txt").write_text("   ")  # empty caption: found on read

  source = sources.ImageTextFolder(tmp_path)

  assert len(source) == 3
  assert source.skipped == {"missing text": 1, "missing image": 1}
  first, second = source[0], source[1]
  assert first["id"] == "000/a" and first["chunks"][1] == "a red circle"
  assert second["id"] == "000/b" and second["chunks"][1] == "a blue square"
  image = first["chunks"][0]
  assert isinstance(image, sources.ImageRef) and image.key == str(tmp_path / "000" / "a.jpg")
  assert image.load().mode == "RGB" and image.load().size == (12, 12)
  with pytest.raises(sources.BadRecordError) as error:
    source[2]
  assert error.value.reason == "missing text" and "e.txt" in str(error.value)


def test_webdataset_tar_shards_are_random_access(tmp_path):
  shard = tmp_path / "00000.tar"
  members = {"s/0001.jpg": jpeg_bytes(0), "s/0001.txt": b"first caption",
             "s/0002.jpg": jpeg_bytes(1), "s/0002.json": b'{"caption": "second caption"}',
             "s/0003.jpg": jpeg_bytes(2)}
  with tarfile.open(shard, "w") as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))

  source = sources.WebDatasetTars(tmp_path)  # a directory: all its shards

  assert len(source) == 2 and source.skipped == {"missing text": 1}
  second, first = source[1], source[0]
  assert first["chunks"][1] == "first caption" and second["chunks"][1] == "second caption"
  assert first["chunks"][0].data == members["s/0001.jpg"]
  assert second["chunks"][0].key == f"{shard}::s/0002.jpg"
  np.testing.assert_array_equal(np.asarray(second["chunks"][0].load()),
                                np.asarray(images.load_image(members["s/0002.jpg"])))


def mmc4_doc(names, similarity, sentences=("A.", "B.", "C.")):
  return {"text_list": list(sentences), "url": "http://x",
          "image_info": [{"image_name": n, "raw_url": "u", "matched_text_index": 0,
                          "matched_sim": 0.5, "face_detections": None} for n in names],
          "similarity_matrix": similarity}


def test_mmc4_places_images_before_their_optimally_matched_sentences(tmp_path):
  write_jpeg(tmp_path / "img" / "i0.jpg", 0)
  write_jpeg(tmp_path / "img" / "i1.jpg", 1)
  # Greedy matching would put i0 on A.; the one-to-one optimum puts i1 on A. and i0 on B.
  similarity = [[0.90, 0.80, 0.10], [0.85, 0.20, 0.10]]
  lines = [json.dumps(mmc4_doc(["i0.jpg", "i1.jpg"], similarity)),
           "{not json",
           json.dumps(mmc4_doc(["gone.jpg", "i0.jpg"], [[0.9, 0.8, 0.1], [0.5, 0.2, 0.1]])),
           json.dumps({"text_list": ["x"]})]
  (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")

  source = sources.MMC4Documents(tmp_path / "docs.jsonl", tmp_path / "img")
  strict = sources.MMC4Documents(tmp_path / "docs.jsonl", tmp_path / "img",
                                 similarity_threshold=0.83)

  assert len(source) == 2
  assert source.skipped == {"malformed json": 2, "missing image": 1}
  chunks = source[0]["chunks"]
  assert [c if isinstance(c, str) else pathlib.Path(c.path).name for c in chunks] == [
      "i1.jpg", "A.", "i0.jpg", "B. C."]
  # With gone.jpg missing, i0 (row 1 of its matrix) alone takes its best sentence, A.
  assert [c if isinstance(c, str) else pathlib.Path(c.path).name
          for c in source[1]["chunks"]] == ["i0.jpg", "A. B. C."]
  # The threshold drops i0 from the first document (matched at 0.80) and the second (0.50).
  assert len(strict) == 1 and strict.skipped["no matched image"] == 1
  assert [c if isinstance(c, str) else pathlib.Path(c.path).name
          for c in strict[0]["chunks"]] == ["i1.jpg", "A. B. C."]


def test_karpathy_captions_coco_and_flickr_layouts(tmp_path):
  write_jpeg(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000042.jpg", 0)
  write_jpeg(tmp_path / "coco" / "train2014" / "COCO_train2014_000000000007.jpg", 1)
  coco = {"dataset": "coco", "images": [
      {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "test",
       "cocoid": 42, "imgid": 0, "sentids": [0, 1],
       "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"], "imgid": 0, "sentid": 0},
                     {"raw": "A brown dog. ", "tokens": [], "imgid": 0, "sentid": 1}]},
      {"filepath": "train2014", "filename": "COCO_train2014_000000000007.jpg",
       "split": "restval", "cocoid": 7, "imgid": 1, "sentids": [2],
       "sentences": [{"raw": "A cat.", "tokens": [], "imgid": 1, "sentid": 2}]},
      {"filepath": "val2014", "filename": "missing.jpg", "split": "test", "cocoid": 9,
       "imgid": 2, "sentids": [3], "sentences": [{"raw": "Gone.", "imgid": 2, "sentid": 3}]}]}
  (tmp_path / "dataset_coco.json").write_text(json.dumps(coco))
  write_jpeg(tmp_path / "flickr" / "1000.jpg", 2)
  flickr = {"dataset": "flickr30k", "images": [
      {"filename": "1000.jpg", "split": "test", "imgid": 5, "sentids": [0],
       "sentences": [{"raw": "Two people.", "imgid": 5, "sentid": 0}]}]}
  (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(flickr))

  test = sources.KarpathyCaptions(tmp_path / "dataset_coco.json", tmp_path / "coco",
                                  split="test")
  train = sources.KarpathyCaptions(tmp_path / "dataset_coco.json", tmp_path / "coco",
                                   split=("train", "restval"))
  flickr_test = sources.KarpathyCaptions(tmp_path / "dataset_flickr30k.json",
                                         tmp_path / "flickr", split="test")

  assert len(test) == 1 and test.skipped == {"missing image": 1}
  assert test[0] == {"id": 42, "captions": ["A dog.", "A brown dog."],
                     "image": str(tmp_path / "coco/val2014/COCO_val2014_000000000042.jpg")}
  assert [r["id"] for r in train] == [7]
  assert flickr_test[0] == {"id": 5, "captions": ["Two people."],
                            "image": str(tmp_path / "flickr" / "1000.jpg")}
  pairs = sources.CaptionPairs(test, captions_per_image=3)
  assert [p["chunks"][1] for p in pairs] == ["A dog.", "A brown dog.", "A dog."]
  with pytest.raises(ValueError, match="split: expected some of"):
    sources.KarpathyCaptions(tmp_path / "dataset_coco.json", tmp_path / "coco", split="tset")


def vqa_files(tmp_path, subtype="val2014"):
  write_jpeg(tmp_path / "images" / f"COCO_{subtype}_000000000042.jpg", 0)
  questions = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco",
               "data_subtype": subtype, "license": {}, "questions": [
                   {"image_id": 42, "question": "What colour is it?", "question_id": 420},
                   {"image_id": 42, "question": "How many?", "question_id": 421},
                   {"image_id": 43, "question": "Where?", "question_id": 430}]}
  answers = [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
             for i, a in enumerate(["red"] * 9 + ["pink"])]
  annotations = {"info": {}, "license": {}, "data_subtype": subtype, "annotations": [
      {"question_id": 420, "image_id": 42, "question_type": "what color is the",
       "answer_type": "other", "multiple_choice_answer": "red", "answers": answers},
      {"question_id": 430, "image_id": 43, "question_type": "where", "answer_type": "other",
       "multiple_choice_answer": "home", "answers": answers}]}
  (tmp_path / "questions.json").write_text(json.dumps(questions))
  (tmp_path / "annotations.json").write_text(json.dumps(annotations))
  return tmp_path / "questions.json", tmp_path / "images", tmp_path / "annotations.json"


def test_vqav2_and_okvqa_layout(tmp_path):
  questions, image_root, annotations = vqa_files(tmp_path)

  with_answers = sources.VqaQuestions(questions, image_root, annotations)
  questions_only = sources.VqaQuestions(questions, image_root)

  assert len(with_answers) == 1
  assert with_answers.skipped == {"missing answers": 1, "missing image": 1}
  record = with_answers[0]
  assert record["id"] == 420 and record["question"] == "What colour is it?"
  assert record["answers"] == ["red"] * 9 + ["pink"] and record["multiple_choice_answer"] == "red"
  assert record["question_type"] == "what color is the" and record["answer_type"] == "other"
  assert record["image"] == str(image_root / "COCO_val2014_000000000042.jpg")
  assert [r["id"] for r in questions_only] == [420, 421]
  assert "answers" not in questions_only[1]


def test_textvqa_vizwiz_and_hateful_memes_layouts(tmp_path):
  write_jpeg(tmp_path / "train_images" / "abc123.jpg", 0)
  textvqa = {"dataset_type": "val", "dataset_name": "textvqa", "dataset_version": "0.5.1",
             "data": [{"question": "what brand?", "image_id": "abc123", "image_classes": ["Bottle"],
                       "flickr_original_url": "u", "flickr_300k_url": "u", "image_width": 12,
                       "image_height": 12, "answers": ["coke"] * 10, "question_tokens": ["what"],
                       "question_id": 7, "set_name": "val"}]}
  (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(textvqa))
  write_jpeg(tmp_path / "vizwiz" / "VizWiz_val_00000000.jpg", 1)
  vizwiz = [{"image": "VizWiz_val_00000000.jpg", "question": "What is this?",
             "answers": [{"answer": "soup", "answer_confidence": "yes"}] * 10,
             "answer_type": "other", "answerable": 1},
            {"image": "VizWiz_val_00000001.jpg", "question": "And this?", "answers": [],
             "answer_type": "unanswerable", "answerable": 0}]
  (tmp_path / "val.json").write_text(json.dumps(vizwiz))
  write_jpeg(tmp_path / "memes" / "img" / "01234.png", 2)
  lines = [json.dumps({"id": 1234, "img": "img/01234.png", "label": 1, "text": "some text"}),
           '{"id": 5, "img": ',
           json.dumps({"id": 1235, "img": "img/01234.png", "text": "test split, no label"})]
  (tmp_path / "memes" / "dev.jsonl").write_text("\n".join(lines))

  text = sources.TextVqa(tmp_path / "TextVQA_0.5.1_val.json", tmp_path / "train_images")
  viz = sources.VizWiz(tmp_path / "val.json", tmp_path / "vizwiz")
  memes = sources.HatefulMemes(tmp_path / "memes" / "dev.jsonl")

  assert text[0] == {"id": 7, "image": str(tmp_path / "train_images" / "abc123.jpg"),
                     "question": "what brand?", "answers": ["coke"] * 10}
  assert len(viz) == 1 and viz.skipped == {"missing image": 1}
  assert viz[0]["answers"] == ["soup"] * 10 and viz[0]["answerable"] == 1
  assert memes.skipped == {"malformed json": 1}
  assert memes[0] == {"id": 1234, "image": str(tmp_path / "memes" / "img" / "01234.png"),
                      "text": "some text", "label": 1}
  assert "label" not in memes[1]


def test_imagenet_class_folders_with_synset_mapping(tmp_path):
  for wnid, seed in (("n01440764", 0), ("n01443537", 1)):
    write_jpeg(tmp_path / "val" / wnid / f"ILSVRC2012_val_{seed:08d}.JPEG", seed)
  (tmp_path / "val" / "n01443537" / "notes.txt").write_text("not an image")
  (tmp_path / "LOC_synset_mapping.txt").write_text(
      "n01440764 tench, Tinca tinca\nn01443537 goldfish, Carassius auratus\n"
      "n01484850 great white shark\n")

  mapping = sources.read_synset_mapping(tmp_path / "LOC_synset_mapping.txt")
  named = sources.ImageClassFolders(tmp_path / "val", class_names=mapping)
  plain = sources.ImageClassFolders(tmp_path / "val")

  assert named.class_names == ["tench", "goldfish", "great white shark"]
  assert [(r["label"], r["class_name"]) for r in named] == [(0, "tench"), (1, "goldfish")]
  assert named[1]["id"] == "n01443537/ILSVRC2012_val_00000001.JPEG"
  assert plain.class_names == ["n01440764", "n01443537"]
  with pytest.raises(ValueError, match="class_names: expected an entry for every class folder"):
    sources.ImageClassFolders(tmp_path / "val", class_names={"n01440764": "tench"})


def test_shapes_world_source_is_deterministic():
  first = shapes_records.ShapesWorld("interleaved", num_records=4, seed=3, image_size=16)
  again = shapes_records.ShapesWorld("interleaved", num_records=4, seed=3, image_size=16)

  a, b = first[2], again[2]
  assert [c for c in a["chunks"] if isinstance(c, str)] == [
      c for c in b["chunks"] if isinstance(c, str)]
  refs = [c for c in a["chunks"] if isinstance(c, sources.ImageRef)]
  assert len(refs) >= 2 and refs[0].key == "shapes/interleaved/train/3/2/" + str(
      a["chunks"].index(refs[0]))
  np.testing.assert_array_equal(refs[0].array, [c for c in b["chunks"]
                                                if isinstance(c, sources.ImageRef)][0].array)
  vqa = shapes_records.ShapesWorld("vqa", num_records=1, image_size=16)[0]["chunks"]
  item = shapes_world.vqa_example("train", 0, 0, image_size=16)
  assert vqa[1:] == [f"Question:{item['question']} Short answer:", item["answer"]]
  assert "".join(vqa[1:]) == shapes_world.QA_FORMAT.format(question=item["question"],
                                                            answer=item["answer"])


@pytest.mark.parametrize("make, argument", [
    (lambda p: sources.ImageTextFolder(p / "nope"), "path"),
    (lambda p: sources.WebDatasetTars([p / "nope.tar"]), "path"),
    (lambda p: sources.MMC4Documents(p / "nope.jsonl", p), "path"),
    (lambda p: sources.KarpathyCaptions(p / "nope.json", p, split="test"), "annotation_file"),
    (lambda p: sources.VqaQuestions(p / "nope.json", p), "questions_file"),
    (lambda p: sources.TextVqa(p / "nope.json", p), "annotation_file"),
    (lambda p: sources.VizWiz(p / "nope.json", p), "annotation_file"),
    (lambda p: sources.HatefulMemes(p / "nope.jsonl"), "jsonl_file"),
    (lambda p: sources.ImageClassFolders(p / "nope"), "root"),
    (lambda p: sources.ArrayRecordRecords(p / "nope.array_record"), "path"),
])
def test_missing_dataset_path_fails_at_construction_naming_it(tmp_path, make, argument):
  with pytest.raises(FileNotFoundError) as error:
    make(tmp_path)
  assert argument in str(error.value) and str(tmp_path / "nope") in str(error.value)


def test_tfds_coco_captions_under_mock_data():
  pytest.importorskip("tensorflow", reason="TFDS builds coco_captions only with TensorFlow "
                      "installed (pip install tensorflow-cpu)")
  tfds = pytest.importorskip("tensorflow_datasets")

  with tfds.testing.mock_data(num_examples=3):
    source = sources.TfdsCocoCaptions("val")
    record = source[1]
    pairs = sources.CaptionPairs(source, captions_per_image=2)
    pair = pairs[3]

  assert len(source) == 3 and len(pairs) == 6
  assert isinstance(record["id"], int) and record["captions"]
  assert all(isinstance(c, str) for c in record["captions"])
  assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
  assert pair["chunks"][1] in record["captions"] and pair["chunks"][0].load().mode == "RGB"


def test_array_record_round_trip_keeps_text_image_bytes_and_keys(tmp_path):
  write_jpeg(tmp_path / "pairs" / "a.jpg", 0)
  (tmp_path / "pairs" / "a.txt").write_text("a caption")
  write_jpeg(tmp_path / "pairs" / "b.jpg", 1)
  (tmp_path / "pairs" / "b.txt").write_text("")  # fails on read: skipped while writing
  folder = sources.ImageTextFolder(tmp_path / "pairs")
  world = shapes_records.ShapesWorld("interleaved", num_records=2, image_size=8)

  assert sources.write_array_record(folder, tmp_path / "pairs.array_record") == 1
  assert sources.write_array_record(world, tmp_path / "world.array_record") == 2
  stored = sources.ArrayRecordRecords([tmp_path / "pairs.array_record",
                                        tmp_path / "world.array_record"])

  assert len(stored) == 3
  pair = stored[0]
  assert pair["id"] == "a" and pair["chunks"][1] == "a caption"
  assert pair["chunks"][0].key == str(tmp_path / "pairs" / "a.jpg")
  assert pair["chunks"][0].data == (tmp_path / "pairs" / "a.jpg").read_bytes()
  for original, copy in zip((world[0], world[1]), (stored[1], stored[2])):
    assert copy["id"] == original["id"] and len(copy["chunks"]) == len(original["chunks"])
    for want, have in zip(original["chunks"], copy["chunks"]):
      if isinstance(want, str):
        assert have == want
      else:
        assert have.key == want.key
        np.testing.assert_array_equal(np.asarray(have.load()), want.array)  # PNG: lossless
