"""Images: pad vs crop geometry, normalisation, decoding errors, video frame sampling."""

import io

import numpy as np
import pytest
from PIL import Image

from xattn_vlm.data import images

MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def normalised(rgb) -> np.ndarray:
  return (np.float32(rgb) / 255 - np.float32(MEAN)) / np.float32(STD)


def solid(width: int, height: int, rgb) -> np.ndarray:
  return np.broadcast_to(np.uint8(rgb), (height, width, 3)).copy()


def png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


def test_pad_keeps_aspect_and_centres_the_padding():
  wide = images.preprocess_image(solid(40, 20, RED), size=16, mean=MEAN, std=STD, mode="pad")
  assert wide.shape == (16, 16, 3) and wide.dtype == np.float32
  # 40x20 -> 16x8, rows 4..11; the padding is 0 (the mean colour once normalised).
  np.testing.assert_allclose(wide[4:12], np.broadcast_to(normalised(RED), (8, 16, 3)), atol=1e-5)
  assert np.all(wide[:4] == 0) and np.all(wide[12:] == 0)
  tall = images.preprocess_image(solid(10, 30, GREEN), size=15, mean=MEAN, std=STD, mode="pad")
  # 10x30 -> 5x15, columns 5..9: five columns of padding on each side.
  np.testing.assert_allclose(tall[:, 5:10], np.broadcast_to(normalised(GREEN), (15, 5, 3)),
                             atol=1e-5)
  assert np.all(tall[:, :5] == 0) and np.all(tall[:, 10:] == 0)


def test_crop_fills_the_square_with_the_centre():
  stripes = np.concatenate([solid(20, 20, RED), solid(20, 20, GREEN), solid(20, 20, BLUE)], 1)
  crop = images.preprocess_image(stripes, size=10, mean=MEAN, std=STD, mode="crop")
  # 60x20 -> 30x10, centre columns 10..19 = the green block (its edges blend with neighbours).
  assert crop.shape == (10, 10, 3)
  np.testing.assert_allclose(crop[:, 2:8], np.broadcast_to(normalised(GREEN), (10, 6, 3)),
                             atol=1e-5)
  pad = images.preprocess_image(stripes, size=10, mean=MEAN, std=STD, mode="pad")
  assert np.all(pad[:3] == 0) and np.all(pad[6:] == 0)  # 60x20 -> 10x3, rows 3..5
  np.testing.assert_allclose(pad[4, 0], normalised(RED), atol=1e-5)
  np.testing.assert_allclose(pad[4, -1], normalised(BLUE), atol=1e-5)


def test_normalisation_and_input_types(tmp_path):
  grey = solid(8, 8, (100, 150, 200))
  expected = np.broadcast_to(normalised((100, 150, 200)), (8, 8, 3))
  path = tmp_path / "grey.png"
  path.write_bytes(png_bytes(grey))
  for source in (grey, Image.fromarray(grey), path, str(path), png_bytes(grey)):
    out = images.preprocess_image(source, size=8, mean=MEAN, std=STD)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  gray = images.preprocess_image(np.full((4, 4), 128, np.uint8), size=4, mean=MEAN, std=STD)
  np.testing.assert_allclose(gray[0, 0], normalised((128, 128, 128)), atol=1e-6)
  with pytest.raises(ValueError, match="uint8 pixels in \\[0, 255\\], got dtype float32"):
    images.preprocess_image(grey.astype(np.float32), size=8, mean=MEAN, std=STD)
  with pytest.raises(ValueError, match="mode must be one of"):
    images.preprocess_image(grey, size=8, mean=MEAN, std=STD, mode="stretch")
  with pytest.raises(ValueError, match="std must have 3 values"):
    images.preprocess_image(grey, size=8, mean=MEAN, std=(0.5, 0.5))


def test_loading_transparency_and_corrupt_images(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (10, 20, 30, 255)
  loaded = np.asarray(images.load_image(png_bytes(rgba)))
  np.testing.assert_array_equal(loaded[0, 0], (10, 20, 30))
  np.testing.assert_array_equal(loaded[1, 1], (255, 255, 255))  # transparent -> white

  assert issubclass(images.ImageError, ValueError)
  with pytest.raises(images.ImageError, match="<12 bytes>"):
    images.load_image(b"not an image")
  truncated = png_bytes(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))[:200]
  with pytest.raises(images.ImageError, match="<200 bytes>"):
    images.load_image(truncated)
  broken = tmp_path / "broken.jpg"
  broken.write_bytes(b"\xff\xd8\xff\xe0 garbage")
  with pytest.raises(images.ImageError, match="broken.jpg"):
    images.preprocess_image(broken, size=8, mean=MEAN, std=STD)
  with pytest.raises(FileNotFoundError):
    images.load_image(tmp_path / "missing.png")


def test_video_frames_are_sampled_uniformly():
  np.testing.assert_array_equal(images.sample_frame_indices(10, 4), [1, 3, 6, 8])
  np.testing.assert_array_equal(images.sample_frame_indices(8, 8), np.arange(8))
  np.testing.assert_array_equal(images.sample_frame_indices(2, 4), [0, 0, 1, 1])
  video = np.stack([solid(6, 4, (10 * t, 0, 0)) for t in range(10)])  # frame t is red = 10 t
  out = images.preprocess_video(video, 4, size=6, mean=MEAN, std=STD)
  assert out.shape == (4, 6, 6, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[:, 3, 3, 0], normalised(np.outer([10, 30, 60, 80], [1, 0, 0]))[
      :, 0], atol=1e-5)
  as_list = images.preprocess_video(list(video), 4, size=6, mean=MEAN, std=STD)
  np.testing.assert_array_equal(as_list, out)
  with pytest.raises(ValueError, match="at least one frame"):
    images.preprocess_video(video[:0], 4, size=6, mean=MEAN, std=STD)
