"""A corpus of odd images, written here, through every reader and the processor: each image is
either read correctly (size, orientation and pixels checked) or skipped, counted and logged with
its name; never a crash, never a silently wrong image.

The corpus: grayscale, 16-bit grayscale, 16-bit RGB, CMYK, palette (with and without a
transparent index), alpha, EXIF-rotated, 1x1, 20000x1 and 1x20000 images, truncated JPEG and PNG
files, files whose extension lies, a text file and an empty file named as images, and a header
that claims 30000x30000 pixels (Pillow's decompression-bomb check). Web shards add a tar cut short
and half-written JSON (captions and MMC4 lines).
"""

import dataclasses
import io
import json
import logging
import struct
import tarfile
import zlib

import numpy as np
import PIL.Image
import pytest

from helpers import CLIP_MEAN, CLIP_STD
from xattn_vlm.data import default_tokenizer, images, pipeline, sources
from xattn_vlm.inference import Processor

SIZE = 8  # the tower's image side in these pipelines


def _base() -> np.ndarray:
  """16 x 24 RGB in four blocks (red, green / blue, white), so a rotation or a flip shows."""
  pixels = np.empty((16, 24, 3), np.uint8)
  pixels[:8, :12], pixels[:8, 12:] = (255, 0, 0), (0, 255, 0)
  pixels[8:, :12], pixels[8:, 12:] = (0, 0, 255), (255, 255, 255)
  return pixels


BASE = _base()


def _encode(image: PIL.Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _png16(pixels: np.ndarray, color_type: int, claimed_size: tuple[int, int] | None = None
           ) -> bytes:
  """A 16-bit PNG written by hand (Pillow writes no 16-bit RGB): ``pixels`` [H, W, C] uint16;
  ``claimed_size`` (height, width) puts other dimensions in its header."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  height, width = claimed_size or pixels.shape[:2]
  rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
  header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
          + chunk(b"IEND", b""))


@dataclasses.dataclass(frozen=True)
class Oddity:
  """One file of the corpus: its name and bytes, and the RGB pixels a correct reader gives
  (None: it must be skipped); ``tolerance`` is the mean absolute error allowed (lossy JPEG)."""
  name: str
  data: bytes
  expected: np.ndarray | None
  tolerance: float = 0.0

  @property
  def stem(self) -> str:
    return self.name.partition(".")[0]


def corpus() -> list[Oddity]:
  gray = np.asarray(PIL.Image.fromarray(BASE).convert("L"))
  gray_rgb = np.repeat(gray[..., None], 3, axis=-1)
  jpeg = _encode(PIL.Image.fromarray(BASE), "JPEG", quality=95, subsampling=0)
  png = _encode(PIL.Image.fromarray(BASE), "PNG")
  palette = PIL.Image.fromarray(BASE).convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=4)
  see_through = BASE.copy()
  see_through[:8, :12] = 255  # the red block is transparent: white once composited
  alpha = np.dstack([BASE, np.full(BASE.shape[:2], 255, np.uint8)])
  alpha[:8, :12, 3] = 0
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # orientation: shown rotated 90 degrees clockwise
  wide = np.zeros((1, 20000, 3), np.uint8)
  wide[:, :10000] = (255, 0, 0)
  wide[:, 10000:] = (0, 0, 255)
  bomb = _png16(np.zeros((1, 1, 1), np.uint16), 0, claimed_size=(30000, 30000))
  return [
      Oddity("gray.png", _encode(PIL.Image.fromarray(gray), "PNG"), gray_rgb),
      Oddity("gray16.png", _png16(gray[..., None].astype(np.uint16) * 257, 0), gray_rgb),
      Oddity("rgb48.png", _png16(BASE.astype(np.uint16) * 257, 2), BASE),
      Oddity("cmyk.jpg", _encode(PIL.Image.fromarray(BASE).convert("CMYK"), "JPEG", quality=95),
             BASE, 6.0),
      Oddity("palette.png", _encode(palette, "PNG"), BASE),
      Oddity("transparent.png", _encode(palette, "PNG", transparency=palette.getpixel((0, 0))),
             see_through),
      Oddity("alpha.png", _encode(PIL.Image.fromarray(alpha), "PNG"), see_through),
      Oddity("rotated.jpg", _encode(PIL.Image.fromarray(BASE), "JPEG", quality=95,
                                    subsampling=0, exif=exif.tobytes()),
             np.rot90(BASE, k=-1), 6.0),
      Oddity("one.png", _encode(PIL.Image.new("RGB", (1, 1), (0, 255, 0)), "PNG"),
             np.asarray([[[0, 255, 0]]], np.uint8)),
      Oddity("wide.png", _encode(PIL.Image.fromarray(wide), "PNG"), wide),
      Oddity("tall.png", _encode(PIL.Image.fromarray(wide.transpose(1, 0, 2)), "PNG"),
             wide.transpose(1, 0, 2)),
      Oddity("png_named.jpg", png, BASE),
      Oddity("jpeg_named.png", jpeg, BASE, 6.0),
      Oddity("cut_jpeg.jpg", jpeg[:len(jpeg) // 2], None),
      Oddity("cut_png.png", png[:len(png) // 2], None),
      Oddity("text.jpg", b"this is not an image\n", None),
      Oddity("empty.png", b"", None),
      Oddity("bomb.png", bomb, None),
  ]


CORPUS = corpus()
GOOD = {odd.stem: odd for odd in CORPUS if odd.expected is not None}
BAD = {odd.stem: odd for odd in CORPUS if odd.expected is None}


def assert_reads(odd: Oddity, pixels: np.ndarray) -> None:
  """``pixels`` (RGB uint8) are ``odd``'s image: same size and orientation, same colours."""
  assert pixels.shape == odd.expected.shape, odd.name
  error = np.abs(pixels.astype(np.float64) - odd.expected).mean()
  assert error <= odd.tolerance, f"{odd.name}: mean error {error:.2f}"


def assert_example_image(odd: Oddity, image: np.ndarray) -> None:
  """An example's preprocessed image is the preprocessed expected image."""
  expected = images.preprocess_image(odd.expected, size=SIZE, mean=CLIP_MEAN, std=CLIP_STD)
  error = np.abs(image - expected).mean() * min(CLIP_STD) * 255
  assert error <= odd.tolerance + 1.0, f"{odd.name}: mean error {error:.2f}"  # +1: resampling


def write_folder(folder) -> None:
  """The corpus as image-text pairs, each image captioned with its stem."""
  folder.mkdir(parents=True, exist_ok=True)
  for odd in CORPUS:
    (folder / odd.name).write_bytes(odd.data)
    (folder / f"{odd.stem}.txt").write_text(odd.stem)


def run_pipeline(source) -> tuple[dict[str, np.ndarray], pipeline.BatchIterator]:
  """Every example of one pass over ``source``, by caption; and the iterator (skip counts)."""
  tokenizer = default_tokenizer()
  transform = pipeline.ExampleTransform(tokenizer, max_tokens=16, max_images=1, image_size=SIZE,
                                        mean=CLIP_MEAN, std=CLIP_STD)
  iterator = pipeline.batch_iterator(source, transform, batch_size=1, seed=0, shuffle=False,
                                     num_epochs=1, process_index=0, process_count=1)
  examples = {}
  for batch in iterator:
    ids = batch["input_ids"][0][batch["attention_mask"][0] == 1]
    caption = tokenizer.decode(ids, skip_special_tokens=True)
    examples[caption] = batch["images"][0, 0, 0]
  return examples, iterator


def assert_skipped_by_name(caplog, names) -> None:
  logged = "\n".join(record.getMessage() for record in caplog.records)
  for name in names:
    assert name in logged, f"{name} was not logged as skipped:\n{logged}"


def test_image_folder_reads_or_skips_each_oddity(tmp_path, caplog):
  write_folder(tmp_path)
  source = sources.ImageTextFolder(tmp_path)
  for index in range(len(source)):
    record = source[index]
    ref, caption = record["chunks"]
    if caption in GOOD:
      assert_reads(GOOD[caption], np.asarray(ref.load()))
    else:
      with pytest.raises(images.ImageError, match=BAD[caption].name):
        ref.load()
  with caplog.at_level(logging.WARNING):
    examples, iterator = run_pipeline(source)
  assert set(examples) == set(GOOD)
  for stem, image in examples.items():
    assert_example_image(GOOD[stem], image)
  assert iterator.skipped == {"corrupt image": len(BAD)}
  assert_skipped_by_name(caplog, [odd.name for odd in BAD.values()])


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_with_oddities_a_cut_tar_and_half_written_json(tmp_path, caplog):
  with tarfile.open(tmp_path / "00000.tar", "w") as tar:
    for odd in CORPUS:
      _add(tar, odd.name, odd.data)
      _add(tar, f"{odd.stem}.txt", odd.stem.encode())
    _add(tar, "halfjson.png", GOOD["one"].data)
    _add(tar, "halfjson.json", b'{"caption": "one pix')
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w") as tar:
    for stem in ("gray", "palette"):
      _add(tar, f"{stem}.png", GOOD[stem].data)
      _add(tar, f"{stem}.txt", stem.encode())
  data = buffer.getvalue()
  cut_at = data.index(GOOD["palette"].data) + 20  # inside the second image
  (tmp_path / "00001.tar").write_bytes(data[:cut_at])

  with caplog.at_level(logging.WARNING):
    source = sources.WebDatasetTars(tmp_path)
  assert source.skipped == {"truncated member": 1, "corrupt shard": 1}
  assert_skipped_by_name(caplog, ["00001.tar::palette.png"])
  with caplog.at_level(logging.WARNING):
    examples, iterator = run_pipeline(source)
  assert set(examples) == set(GOOD) and len(source) == len(CORPUS) + 2
  for stem, image in examples.items():
    assert_example_image(GOOD[stem], image)
  assert iterator.skipped == {"corrupt image": len(BAD), "malformed json": 1}
  assert_skipped_by_name(caplog, [f"00000.tar::{odd.name}" for odd in BAD.values()]
                         + ["halfjson.json"])


def test_mmc4_documents_with_oddities_and_a_half_written_line(tmp_path, caplog):
  images_dir = tmp_path / "images"
  images_dir.mkdir()
  lines = []
  for odd in CORPUS:
    (images_dir / odd.name).write_bytes(odd.data)
    lines.append(json.dumps({"text_list": [odd.stem], "similarity_matrix": [[0.5]],
                             "image_info": [{"image_name": odd.name, "matched_text_index": 0,
                                             "matched_sim": 0.5}]}))
  text = "\n".join(lines) + "\n"
  (tmp_path / "docs.jsonl").write_text(text + lines[0][:len(lines[0]) // 2])  # a writer died
  source = sources.MMC4Documents(tmp_path / "docs.jsonl", images_dir)
  assert source.skipped == {"malformed json": 1} and len(source) == len(CORPUS)
  with caplog.at_level(logging.WARNING):
    examples, iterator = run_pipeline(source)
  assert set(examples) == set(GOOD)
  for stem, image in examples.items():
    assert_example_image(GOOD[stem], image)
  assert iterator.skipped == {"corrupt image": len(BAD)}
  assert_skipped_by_name(caplog, [odd.name for odd in BAD.values()])


def test_array_record_keeps_each_images_name_for_its_skip(tmp_path, caplog):
  write_folder(tmp_path / "pairs")
  assert sources.write_array_record(sources.ImageTextFolder(tmp_path / "pairs"),
                                    tmp_path / "pairs.array_record") == len(CORPUS)
  with caplog.at_level(logging.WARNING):
    examples, iterator = run_pipeline(sources.ArrayRecordRecords(tmp_path / "pairs.array_record"))
  assert set(examples) == set(GOOD)
  for stem, image in examples.items():
    assert_example_image(GOOD[stem], image)
  assert iterator.skipped == {"corrupt image": len(BAD)}
  assert_skipped_by_name(caplog, [odd.name for odd in BAD.values()])


def test_benchmark_readers_skip_images_that_are_not_images(tmp_path, caplog):
  """Benchmarks check each image's header at construction (cheap: no pixels are read): files
  that are not images, or too large to decode, are skipped and counted by name. A file damaged
  after its header is kept, and the evaluation's processor refuses it naming the file."""
  write_folder(tmp_path)
  annotation = {"images": [{"filename": odd.name, "imgid": odd.stem, "split": "test",
                            "sentences": [{"raw": odd.stem}]} for odd in CORPUS]}
  (tmp_path / "karpathy.json").write_text(json.dumps(annotation))
  with caplog.at_level(logging.WARNING):
    source = sources.KarpathyCaptions(tmp_path / "karpathy.json", tmp_path, split="test")
  kept = {source[i]["id"]: source[i]["image"] for i in range(len(source))}
  skipped = set(BAD) - set(kept)
  assert {"text", "empty", "bomb"} <= skipped and set(GOOD) <= set(kept)
  assert source.skipped == {"corrupt image": len(skipped)}
  assert_skipped_by_name(caplog, [BAD[stem].name for stem in skipped])
  processor = Processor(default_tokenizer(), image_size=SIZE, image_mean=CLIP_MEAN,
                        image_std=CLIP_STD, max_length=16)
  for stem, path in kept.items():
    if stem in GOOD:
      assert_reads(GOOD[stem], np.asarray(images.load_image(path)))
    else:
      with pytest.raises(ValueError, match=f"image 0 \\({path}\\) cannot be read"):
        processor(["<image>x"], [[path]])


def test_processor_reads_each_oddity_or_names_the_file(tmp_path):
  write_folder(tmp_path)
  processor = Processor(default_tokenizer(), image_size=SIZE, image_mean=CLIP_MEAN,
                        image_std=CLIP_STD, max_length=16)
  for odd in CORPUS:
    path = tmp_path / odd.name
    if odd.expected is None:
      with pytest.raises(ValueError, match=f"prompt 0: image 0 \\({path}\\) cannot be read"):
        processor(["<image>x"], [[path]])
    else:
      batch = processor(["<image>x"], [[path]])
      assert_example_image(odd, batch.images[0, 0, 0])
