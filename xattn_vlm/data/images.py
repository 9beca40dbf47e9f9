"""Images and video frames -> the vision tower's float inputs.

Two geometries: ``"pad"`` keeps the whole image (resize the longer side, centre it on a square; the
Flamingo paper's aspect-preserving padding) and ``"crop"`` fills the square (resize the shorter
side, centre crop; CLIP's preprocessing). Pixels are normalised with the tower's mean and std, and
padding is 0 after normalisation, i.e. the mean colour, so it carries no signal of its own.

A file or buffer that cannot be decoded raises ``ImageError`` (a ``ValueError``) naming its source,
so pipelines over web data can count such examples and skip them; a missing file raises
``FileNotFoundError`` as usual.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

MODES = ("pad", "crop")


class ImageError(ValueError):
  """An image that cannot be read or decoded; the message names its source."""


def _source_name(source) -> str:
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f"<{len(source)} bytes>"
  return repr(os.fspath(source))


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB; transparent pixels are composited onto white rather than keeping arbitrary colours, and
  16-bit grayscale is scaled to 8 bits (Pillow's own conversion clips it at 255, which turns
  every pixel above 1/256 of full scale white)."""
  if image.mode.startswith("I"):  # "I;16", "I;16B", or "I" holding a 16-bit PNG's values
    values = np.asarray(image, np.float64) / 257
    image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return image.convert("RGB")


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
  """Decode an image file or encoded bytes into an RGB PIL image (EXIF orientation applied).

  Raises ``ImageError`` when the content is truncated, not an image, or so large that Pillow
  takes it for a decompression bomb; its message names ``name`` (default: the path, or the
  number of bytes). A file that cannot be opened raises the usual ``OSError``
  (``FileNotFoundError``...): a missing file is a different problem from a corrupt one, and
  pipelines count the two separately.
  """
  if isinstance(source, (bytes, bytearray, memoryview)):
    stream = io.BytesIO(bytes(source))
  elif isinstance(source, (str, os.PathLike)):
    stream = open(source, "rb")
  else:
    raise TypeError(f"source must be a path or encoded bytes, got {type(source).__name__}")
  with stream:
    try:
      with Image.open(stream) as image:
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
      raise ImageError(f"cannot decode image from {name or _source_name(source)}: "
                       f"{error}") from error


def check_image_file(path: str | os.PathLike) -> None:
  """Raises ``ImageError`` unless ``path``'s header is an image Pillow decodes, of a size it
  accepts: a cheap check (no pixels are read) for sources that list many files up front. A file
  damaged after its header passes, and fails when it is decoded."""
  try:
    Image.open(path).close()  # opening parses the header and runs the size check
  except FileNotFoundError:
    raise
  except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
    raise ImageError(f"cannot decode image from {_source_name(path)}: {error}") from error


def _as_pil(image) -> Image.Image:
  """A PIL image, a uint8 array ([H, W], [H, W, 1|3|4]) or a path / encoded bytes, as RGB PIL."""
  if isinstance(image, Image.Image):
    return _to_rgb(image)
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise ValueError(f"image arrays must be uint8 pixels in [0, 255], got dtype {image.dtype}")
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
      raise ValueError(f"image arrays must be [H, W] or [H, W, 1|3|4], got shape {image.shape}")
    return _to_rgb(Image.fromarray(image))
  return load_image(image)


def _channel_stats(values, name: str) -> np.ndarray:
  stats = np.asarray(values, np.float32).reshape(-1)
  if stats.shape != (3,):
    raise ValueError(f"{name} must have 3 values (R, G, B), got {values!r}")
  return stats


def preprocess_image(image, *, size: int, mean: Sequence[float], std: Sequence[float],
                     mode: str = "pad") -> np.ndarray:
  """One image -> normalised float32 [size, size, 3] (geometry and padding: module docstring).

  ``image`` is a PIL image, a uint8 array or a path / encoded bytes; ``mean`` and ``std`` are the
  tower's per-channel statistics in [0, 1] pixel units.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if size < 1:
    raise ValueError(f"size must be >= 1, got {size}")
  mean, std = _channel_stats(mean, "mean"), _channel_stats(std, "std")
  if np.any(std <= 0):
    raise ValueError(f"std must be positive, got {std.tolist()}")
  pil = _as_pil(image)
  width, height = pil.size
  scale = size / (max(width, height) if mode == "pad" else min(width, height))
  new_width, new_height = max(1, round(width * scale)), max(1, round(height * scale))
  if mode == "crop":
    new_width, new_height = max(new_width, size), max(new_height, size)
  pixels = np.asarray(pil.resize((new_width, new_height), Image.BICUBIC), np.float32)
  pixels = (pixels / 255.0 - mean) / std
  if mode == "crop":
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return np.ascontiguousarray(pixels[top:top + size, left:left + size])
  out = np.zeros((size, size, 3), np.float32)
  top, left = (size - new_height) // 2, (size - new_width) // 2
  out[top:top + new_height, left:left + new_width] = pixels
  return out


def sample_frame_indices(num_total: int, num_frames: int) -> np.ndarray:
  """Indices of ``num_frames`` frames spread uniformly over ``num_total``: the centre of each of
  ``num_frames`` equal segments. A clip shorter than ``num_frames`` repeats frames, so every video
  gives the same number of frames."""
  if num_total < 1:
    raise ValueError(f"a video needs at least one frame, got num_total={num_total}")
  if num_frames < 1:
    raise ValueError(f"num_frames must be >= 1, got {num_frames}")
  return ((np.arange(num_frames) + 0.5) * num_total / num_frames).astype(np.int64)


def preprocess_video(frames, num_frames: int, *, size: int, mean: Sequence[float],
                     std: Sequence[float], mode: str = "pad") -> np.ndarray:
  """A video -> float32 [num_frames, size, size, 3], frames sampled by ``sample_frame_indices``.
  ``frames`` is a uint8 array [T, H, W, C] or a sequence of anything ``preprocess_image`` takes."""
  indices = sample_frame_indices(len(frames), num_frames)
  return np.stack([preprocess_image(frames[int(i)], size=size, mean=mean, std=std, mode=mode)
                   for i in indices])
