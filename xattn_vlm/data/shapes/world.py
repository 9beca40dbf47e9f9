"""The shapes world: a built-in synthetic vision-language world, deterministic from a seed.

Scenes of 1-4 coloured, textured shapes on noisy gradient backgrounds are sampled as ground-truth
dataclasses and drawn with numpy, so every caption, question, answer and document is generated from
the truth and can be checked. The world lets the library train and evaluate end to end with no
download: captions, VQA, interleaved multi-image documents, few-shot binding episodes (Frozen's fast
concept binding), a text-only stream to pretrain a tiny LM, and image-text pairs to pretrain a tiny
vision tower.

Every generator is a pure function ``(split, seed, index) -> item`` (random access, so grain can
index it). Each (split, generator) pair draws from its own seed stream, so splits never share an
item. The colour+shape pairs in ``HELD_OUT_COMBINATIONS`` never appear in train or validation and do
appear in test, to measure compositional generalisation. They form a permutation (one per colour,
one per shape), so every colour, shape, size, texture and position is equally likely in every split.
Images are uint8 ``[H, W, 3]``; ``images.preprocess_image`` turns them into tower inputs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import operator
from typing import Callable

import numpy as np

SPLITS = ("train", "validation", "test")
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon", "heart")
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
SIZES = ("small", "large")
TEXTURES = ("solid", "striped", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "centre")
MAX_OBJECTS = 4

# (colour, shape) pairs absent from train and validation, present in test.
HELD_OUT_COMBINATIONS = frozenset({
    ("red", "star"), ("orange", "hexagon"), ("yellow", "circle"), ("green", "triangle"),
    ("cyan", "heart"), ("blue", "square"), ("purple", "cross"), ("white", "diamond"),
})

QUESTION_TYPES = ("colour", "shape", "count", "position", "yes/no")
COUNT_ANSWERS = tuple(str(n) for n in range(MAX_OBJECTS + 1))
ANSWERS = {"colour": COLOURS, "shape": SHAPES, "count": COUNT_ANSWERS, "position": POSITIONS,
           "yes/no": ("yes", "no")}
ANSWER_VOCABULARY = tuple(sorted({a for answers in ANSWERS.values() for a in answers}))

# Prompt formats of OpenFlamingo's evaluation, used by the text stream so the LM learns them.
QA_FORMAT = "Question:{question} Short answer:{answer}"
SUPPORT_FORMAT = "This is a {name}."
QUERY_PROMPT = "What is this? It is a"

TEXT_KINDS = ("caption", "description", "qa", "document", "binding")
# The multi-hot target of ``pair_example``: one entry per shape, then one per colour.
ATTRIBUTE_NAMES = tuple(f"shape:{s}" for s in SHAPES) + tuple(f"colour:{c}" for c in COLOURS)

RGB = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 225, 40),
    "green": (50, 190, 60), "cyan": (40, 210, 220), "blue": (45, 85, 235),
    "purple": (150, 60, 210), "white": (240, 240, 240),
}

_ALL_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES)
_SEEN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT_COMBINATIONS)
_SPLIT_STREAMS = {split: i for i, split in enumerate(SPLITS)}
_GENERATOR_STREAMS = {"caption": 0, "vqa": 1, "interleaved": 2, "binding": 3, "text": 4, "pair": 5,
                      "fewshot": 6}

# Geometry in fractions of the image side: five slots that large objects cannot overlap much.
_CENTRES = {"left": (0.19, 0.5), "right": (0.81, 0.5), "top": (0.5, 0.19),
            "bottom": (0.5, 0.81), "centre": (0.5, 0.5)}
_RADII = {"small": 0.085, "large": 0.14}
_JITTER = 0.015
_SHADE = 0.45  # stripes and dots are the object's colour darkened by this factor

_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom", "centre": "in the centre"}
_PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
_ATTRIBUTE_ORDER = ("size", "colour", "texture", "shape")


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object. Its attributes are the ground truth all text is generated from; ``offset`` is the
  jitter of its centre in fractions of the image side, so a scene renders at any resolution."""
  shape: str
  colour: str
  size: str
  texture: str
  position: str
  offset: tuple[float, float] = (0.0, 0.0)

  @property
  def pair(self) -> tuple[str, str]:
    """(colour, shape): the combination ``HELD_OUT_COMBINATIONS`` is about."""
    return self.colour, self.shape


@dataclasses.dataclass(frozen=True)
class Background:
  """A linear gradient between two dark colours along ``angle`` (radians), plus Gaussian pixel
  noise of ``noise_std`` drawn from ``noise_seed`` over the whole image."""
  start: tuple[int, int, int]
  end: tuple[int, int, int]
  angle: float
  noise_std: float
  noise_seed: int


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects in distinct positions on a background."""
  objects: tuple[ShapeObject, ...]
  background: Background


# ---------------------------------------------------------------------------------------------
# Sampling


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _rng(split: str, generator: str, seed: int, index: int) -> np.random.Generator:
  """The item's own random stream: one per (split, generator, seed, index)."""
  _check_split(split)
  for name, value in (("seed", seed), ("index", index)):
    if operator.index(value) < 0:
      raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
  return np.random.default_rng(
      [_SPLIT_STREAMS[split], _GENERATOR_STREAMS[generator], int(seed), int(index)])


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def allowed_pairs(split: str) -> tuple[tuple[str, str], ...]:
  """The (colour, shape) pairs a split draws from: all of them in test, the seen ones otherwise."""
  _check_split(split)
  return _ALL_PAIRS if split == "test" else _SEEN_PAIRS


def has_held_out(scene: Scene) -> bool:
  """Whether a scene shows a held-out colour+shape pair (only test scenes can)."""
  return any(o.pair in HELD_OUT_COMBINATIONS for o in scene.objects)


def sample_object(rng: np.random.Generator, split: str, position: str,
                  shape: str | None = None) -> ShapeObject:
  """An object at ``position`` with a (colour, shape) pair drawn uniformly from the split's pairs
  (restricted to ``shape`` when given) and uniform size and texture."""
  pairs = allowed_pairs(split)
  if shape is not None:
    pairs = tuple(p for p in pairs if p[1] == shape)
    if not pairs:
      raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
  colour, shape = _pick(rng, pairs)
  offset = tuple(float(v) for v in rng.uniform(-_JITTER, _JITTER, size=2))
  return ShapeObject(shape=shape, colour=colour, size=_pick(rng, SIZES),
                     texture=_pick(rng, TEXTURES), position=position, offset=offset)


def sample_background(rng: np.random.Generator) -> Background:
  """A dark gradient (every channel in [15, 120]) with noise of std 3-10 grey levels."""
  start, end = (tuple(int(v) for v in rng.integers(15, 121, size=3)) for _ in range(2))
  return Background(start=start, end=end, angle=float(rng.uniform(0.0, 2 * math.pi)),
                    noise_std=float(rng.uniform(3.0, 10.0)),
                    noise_seed=int(rng.integers(2**31)))


def sample_scene(rng: np.random.Generator, split: str, *, num_objects: int | None = None,
                 shape: str | None = None) -> Scene:
  """A scene of ``num_objects`` objects (uniform in 1..MAX_OBJECTS when None) in distinct
  positions. ``shape`` forces every object's shape (binding episodes use single-object scenes)."""
  if num_objects is None:
    num_objects = int(rng.integers(1, MAX_OBJECTS + 1))
  if not 1 <= num_objects <= MAX_OBJECTS:
    raise ValueError(f"num_objects must be in [1, {MAX_OBJECTS}], got {num_objects}")
  positions = rng.permutation(len(POSITIONS))[:num_objects]
  objects = tuple(sample_object(rng, split, POSITIONS[p], shape) for p in positions)
  return Scene(objects=objects, background=sample_background(rng))


# ---------------------------------------------------------------------------------------------
# Rendering


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  """Polygon vertices of a shape centred at (cx, cy) with circumradius about r (pixels)."""
  def ring(radii, start_deg):
    n = len(radii)
    return [(cx + rad * math.cos(math.radians(start_deg + 360 * k / n)),
             cy + rad * math.sin(math.radians(start_deg + 360 * k / n))) for k, rad in
            enumerate(radii)]
  if shape == "square":
    h = 0.8 * r
    return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
  if shape == "triangle":
    return [(x, y + 0.25 * r) for x, y in ring([r] * 3, -90)]
  if shape == "star":
    return ring([r, 0.45 * r] * 5, -90)
  if shape == "diamond":
    return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
  if shape == "cross":
    w = 0.33 * r
    return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w)]
  if shape == "hexagon":
    return ring([r] * 6, 0)
  if shape == "heart":
    t = np.linspace(0.0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 2.5
    scale = 0.95 * r / 16
    return [(cx + float(a) * scale, cy + float(b) * scale) for a, b in zip(x, y)]
  raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


@functools.lru_cache(maxsize=16)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
  """x and y of every pixel's centre, float32 [size, size] each (read-only: cached)."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + np.float32(0.5)
  yy.flags.writeable = xx.flags.writeable = False
  return xx, yy


def _inside_polygon(xx: np.ndarray, yy: np.ndarray,
                    vertices: list[tuple[float, float]]) -> np.ndarray:
  """Even-odd rule for every pixel centre at once: a horizontal ray from the point crosses the
  outline an odd number of times when the point is inside."""
  corners = np.asarray(vertices, np.float32)
  x0, y0 = corners[:, 0], corners[:, 1]
  x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
  px, py = xx[..., None], yy[..., None]
  straddles = (y0 > py) != (y1 > py)
  with np.errstate(divide="ignore", invalid="ignore"):
    crossing_x = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
  return np.logical_xor.reduce(straddles & (px < crossing_x), axis=-1)


def _mask(obj: ShapeObject, size: int) -> np.ndarray:
  """Boolean [size, size] footprint of an object: the pixels whose centre it covers (drawn in
  numpy for all pixels at once; Pillow per object was most of a scene's rendering time)."""
  fx, fy = _CENTRES[obj.position]
  cx, cy = (fx + obj.offset[0]) * size, (fy + obj.offset[1]) * size
  r = _RADII[obj.size] * size
  xx, yy = _pixel_centres(size)
  if obj.shape == "circle":
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
  # Only the object's bounding box is tested: every outline lies within 1.05 r of its centre.
  top, bottom = max(0, int(cy - 1.05 * r)), min(size, int(cy + 1.05 * r) + 2)
  left, right = max(0, int(cx - 1.05 * r)), min(size, int(cx + 1.05 * r) + 2)
  mask = np.zeros((size, size), dtype=bool)
  mask[top:bottom, left:right] = _inside_polygon(xx[top:bottom, left:right],
                                                 yy[top:bottom, left:right],
                                                 _outline(obj.shape, cx, cy, r))
  return mask


@functools.lru_cache(maxsize=64)
def _texture(texture: str, size: int) -> np.ndarray:
  """Boolean [size, size] pattern of the shaded pixels: none, diagonal stripes or a dot grid
  (read-only: cached)."""
  yy, xx = np.mgrid[0:size, 0:size]
  period = max(2, round(size / 16))
  if texture == "solid":
    pattern = np.zeros((size, size), dtype=bool)
  elif texture == "striped":
    pattern = ((xx + yy) // max(1, period // 2)) % 2 == 1
  elif texture == "dotted":
    pattern = (xx % period < period // 2) & (yy % period < period // 2)
  else:
    raise ValueError(f"texture must be one of {TEXTURES}, got {texture!r}")
  pattern.flags.writeable = False
  return pattern


def render(scene: Scene, image_size: int = 64) -> np.ndarray:
  """Draw a scene as a uint8 [image_size, image_size, 3] image (same scene -> same bytes)."""
  if image_size < 8:
    raise ValueError(f"image_size must be at least 8 pixels, got {image_size}")
  bg = scene.background
  xx, yy = _pixel_centres(image_size)
  along = math.cos(bg.angle) * xx + math.sin(bg.angle) * yy
  t = ((along - along.min()) / max(float(along.max() - along.min()), 1e-6))[..., None]
  image = (1 - t) * np.float32(bg.start) + t * np.float32(bg.end)
  for obj in scene.objects:
    colour = np.float32(RGB[obj.colour])
    mask = _mask(obj, image_size)
    shaded = _texture(obj.texture, image_size)[mask]
    image[mask] = np.where(shaded[:, None], colour * np.float32(_SHADE), colour)
  noise = np.random.default_rng(bg.noise_seed).standard_normal(image.shape, dtype=np.float32)
  return np.clip(np.rint(image + np.float32(bg.noise_std) * noise), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Language


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _capitalise(text: str) -> str:
  return text[0].upper() + text[1:]


def _join(phrases: list[str]) -> str:
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def noun_phrase(obj: ShapeObject, attributes=("size", "colour", "texture")) -> str:
  """The object's shape with the named attributes before it, e.g. ``large red striped star``."""
  return " ".join(getattr(obj, a) for a in _ATTRIBUTE_ORDER if a in attributes or a == "shape")


def _with_article(phrase: str) -> str:
  return f"{_article(phrase)} {phrase}"


def object_description(obj: ShapeObject) -> str:
  """One object in words, every attribute but its position: "A large red striped star." (what
  the binding episodes' text-only version shows instead of the image)."""
  return _capitalise(_with_article(noun_phrase(obj))) + "."


_CAPTION_DETAIL = (("size", "colour", "texture"), ("colour",), ("size", "colour"),
                   ("colour", "texture"))
_CAPTION_TEMPLATES = (
    "{objects}.",
    "A picture of {objects}.",
    "An image with {objects}.",
    "There {verb} {count} {noun}: {objects}.",
    "This scene shows {objects}.",
    "{count} {noun} on a dark background: {objects}.",
)


def caption(scene: Scene, rng: np.random.Generator) -> str:
  """One caption from a random template, attribute detail and object order; always true."""
  detail = _pick(rng, _CAPTION_DETAIL)
  with_positions = rng.random() < 0.7
  phrases = []
  for k in rng.permutation(len(scene.objects)):
    obj = scene.objects[k]
    phrase = _with_article(noun_phrase(obj, detail))
    phrases.append(f"{phrase} {_POSITION_PHRASES[obj.position]}" if with_positions else phrase)
  n = len(scene.objects)
  text = _pick(rng, _CAPTION_TEMPLATES).format(
      objects=_join(phrases), verb="is" if n == 1 else "are", count=_NUMBER_WORDS[n],
      noun=_pick(rng, ("object", "shape")) + ("" if n == 1 else "s"))
  return _capitalise(text)


def canonical_caption(scene: Scene) -> str:
  """The fixed-form caption of a scene: every attribute, objects in ``POSITIONS`` order."""
  objects = sorted(scene.objects, key=lambda o: POSITIONS.index(o.position))
  return _capitalise(_join([f"{_with_article(noun_phrase(o))} {_POSITION_PHRASES[o.position]}"
                            for o in objects]) + ".")


def description(scene: Scene) -> str:
  """A detailed description: the object count, then one sentence per object."""
  n = len(scene.objects)
  sentences = [f"There {'is' if n == 1 else 'are'} {_NUMBER_WORDS[n]} "
               f"object{'' if n == 1 else 's'}."]
  sentences += [f"The {noun_phrase(o)} is {_POSITION_PHRASES[o.position]}." for o in scene.objects]
  return " ".join(sentences)


# Ways to refer to one object: attribute tuples; a reference is usable when it is unique.
_REFERENCES = (("shape",), ("colour",), ("colour", "shape"), ("size", "shape"),
               ("texture", "shape"), ("position",), ("size", "colour", "texture", "shape"))


def _reference(scene: Scene, target: ShapeObject, rng: np.random.Generator,
               exclude: str) -> str | None:
  """A phrase that picks out ``target`` alone without naming attribute ``exclude``, or None."""
  kinds = [k for k in _REFERENCES if exclude not in k and sum(
      all(getattr(o, a) == getattr(target, a) for a in k) for o in scene.objects) == 1]
  if not kinds:
    return None
  kind = kinds[int(rng.integers(len(kinds)))]
  if kind == ("position",):
    return f"the {_pick(rng, ('object', 'shape'))} {_POSITION_PHRASES[target.position]}"
  words = " ".join(getattr(target, a) for a in _ATTRIBUTE_ORDER if a in kind)
  return f"the {words}" if "shape" in kind else f"the {words} object"


def _count_question(scene: Scene, rng: np.random.Generator, split: str) -> tuple[str, str]:
  variant = int(rng.integers(3))
  colour, shape = _pick(rng, allowed_pairs(split))
  if rng.random() < 0.5:
    obj = _pick(rng, scene.objects)
    colour, shape = obj.colour, obj.shape
  if variant == 0:
    question, count = "How many objects are there?", len(scene.objects)
  elif variant == 1:
    question = f"How many {colour} objects are there?"
    count = sum(o.colour == colour for o in scene.objects)
  else:
    question = f"How many {_PLURALS[shape]} are there?"
    count = sum(o.shape == shape for o in scene.objects)
  return question, str(count)


def _yes_no_question(scene: Scene, rng: np.random.Generator, split: str) -> tuple[str, str] | None:
  yes = bool(rng.random() < 0.5)
  if rng.random() < 0.5:
    present = {o.pair for o in scene.objects}
    pool = sorted(present) if yes else [p for p in allowed_pairs(split) if p not in present]
    colour, shape = _pick(rng, pool)
    return f"Is there {_with_article(colour)} {shape}?", "yes" if yes else "no"
  target = _pick(rng, scene.objects)
  attribute = _pick(rng, ("size", "colour", "texture", "shape"))
  ref = _reference(scene, target, rng, exclude=attribute)
  if ref is None:
    return None
  value = getattr(target, attribute)
  if not yes:
    # A wrong value that still forms a pair of the split, so train never names a held-out pair.
    pairs = allowed_pairs(split)
    values = {"size": SIZES, "colour": COLOURS, "texture": TEXTURES, "shape": SHAPES}[attribute]
    value = _pick(rng, [v for v in values if v != value and (
        attribute not in ("colour", "shape")
        or dataclasses.replace(target, **{attribute: v}).pair in pairs)])
  if attribute == "shape":
    return f"Is {ref} {_with_article(value)}?", "yes" if yes else "no"
  return f"Is {ref} {value}?", "yes" if yes else "no"


def ask(scene: Scene, rng: np.random.Generator, split: str,
        question_type: str) -> tuple[str, str] | None:
  """A (question, answer) pair of ``question_type`` about the scene, or None when the scene does
  not allow one (e.g. no object can be referred to uniquely without naming its position)."""
  if question_type == "count":
    return _count_question(scene, rng, split)
  if question_type == "yes/no":
    return _yes_no_question(scene, rng, split)
  if question_type not in ("colour", "shape", "position"):
    raise ValueError(f"question_type must be one of {QUESTION_TYPES}, got {question_type!r}")
  for k in rng.permutation(len(scene.objects)):
    target = scene.objects[k]
    ref = _reference(scene, target, rng, exclude=question_type)
    if ref is not None:
      question = {"colour": f"What colour is {ref}?", "shape": f"What shape is {ref}?",
                  "position": f"Where is {ref}?"}[question_type]
      return question, getattr(target, question_type)
  return None


def _sample_vqa(rng: np.random.Generator, split: str) -> tuple[Scene, str, str, str]:
  """(scene, question type, question, answer), the type uniform over ``QUESTION_TYPES``."""
  question_type = _pick(rng, QUESTION_TYPES)
  while True:
    scene = sample_scene(rng, split)
    qa = ask(scene, rng, split, question_type)
    if qa is not None:
      return scene, question_type, qa[0], qa[1]


_INTROS = ("Some pictures of shapes.", "A gallery of shapes.", "Here are a few pictures.",
           "Look at these pictures of shapes.")


def _compare(scene: Scene, previous: Scene, rng: np.random.Generator) -> str:
  """A true sentence relating a scene to the one before it in a document."""
  shared = sorted({o.shape for o in scene.objects} & {o.shape for o in previous.objects})
  if shared and rng.random() < 0.5:
    return f"Like the previous picture, it has {_with_article(_pick(rng, shared))}."
  n, m = len(scene.objects), len(previous.objects)
  if n == m:
    return "It has as many objects as the previous picture."
  return f"It has {'more' if n > m else 'fewer'} objects than the previous picture."


def _document(rng: np.random.Generator, split: str,
              num_images: int) -> tuple[str | None, list[Scene], list[str]]:
  """An optional intro, the scenes, and the text that follows each scene's image."""
  intro = _pick(rng, _INTROS) if rng.random() < 0.5 else None
  scenes, texts = [], []
  for i in range(num_images):
    scene = sample_scene(rng, split)
    text = caption(scene, rng)
    if i and rng.random() < 0.5:
      text += " " + _compare(scene, scenes[-1], rng)
    scenes.append(scene)
    texts.append(text)
  return intro, scenes, texts


_SYLLABLE_ONSETS = ("b", "bl", "br", "d", "dr", "f", "fl", "g", "gl", "gr", "k", "kl", "l", "m",
                    "n", "p", "pl", "pr", "r", "s", "sk", "sl", "sn", "t", "tr", "v", "w", "z")
_SYLLABLE_VOWELS = ("a", "e", "i", "o", "u")
_SYLLABLE_CODAS = ("", "k", "x", "p", "t", "g", "n", "m", "sh", "ck")


@functools.cache
def _world_words() -> frozenset[str]:
  words = set(SHAPES + COLOURS + SIZES + TEXTURES + POSITIONS + _NUMBER_WORDS)
  words |= set(_PLURALS.values())
  for text in (QA_FORMAT, SUPPORT_FORMAT, QUERY_PROMPT, *_INTROS, *_CAPTION_TEMPLATES,
               *_POSITION_PHRASES.values()):
    words |= {w.strip(".,:?{}").lower() for w in text.split()}
  return frozenset(words)


def nonsense_name(rng: np.random.Generator) -> str:
  """A pronounceable made-up word of one or two syllables ("dax", "blicket"-like), never one of
  the world's own words, so a model can only learn it from the context it appears in."""
  while True:
    syllables = 1 + int(rng.integers(2))
    name = "".join(_pick(rng, _SYLLABLE_ONSETS) + _pick(rng, _SYLLABLE_VOWELS)
                   for _ in range(syllables)) + _pick(rng, _SYLLABLE_CODAS)
    if name not in _world_words():
      return name


def _binding_names(rng: np.random.Generator, num_ways: int) -> list[str]:
  names: list[str] = []
  while len(names) < num_ways:
    name = nonsense_name(rng)
    if name not in names:
      names.append(name)
  return names


# ---------------------------------------------------------------------------------------------
# Generators: (split, seed, index) -> item


def caption_example(split: str, seed: int, index: int, *, image_size: int = 64,
                    num_references: int = 5) -> dict:
  """An image with one caption and ``num_references`` independently drawn reference captions
  (for CIDEr). Keys: image, caption, references, scene, held_out."""
  rng = _rng(split, "caption", seed, index)
  scene = sample_scene(rng, split)
  captions = [caption(scene, rng) for _ in range(num_references + 1)]
  return {"image": render(scene, image_size), "caption": captions[0],
          "references": captions[1:], "scene": scene, "held_out": has_held_out(scene)}


def vqa_example(split: str, seed: int, index: int, *, image_size: int = 64) -> dict:
  """An image with a question and its one-word answer (from ``ANSWERS[question_type]``).
  Keys: image, question, answer, question_type, scene, held_out."""
  rng = _rng(split, "vqa", seed, index)
  scene, question_type, question, answer = _sample_vqa(rng, split)
  return {"image": render(scene, image_size), "question": question, "answer": answer,
          "question_type": question_type, "scene": scene, "held_out": has_held_out(scene)}


def interleaved_example(split: str, seed: int, index: int, *, image_size: int = 64,
                        min_images: int = 2, max_images: int = 5) -> dict:
  """A multi-image document: an optional intro sentence, then each image followed by its caption
  and sometimes a sentence comparing it with the previous image. ``chunks`` is the document in
  order (``str`` and uint8 images), ready for ``sequence.build_example`` once the images are
  preprocessed. Keys: chunks, scenes, held_out."""
  if not 1 <= min_images <= max_images:
    raise ValueError(f"need 1 <= min_images <= max_images, got {min_images} and {max_images}")
  rng = _rng(split, "interleaved", seed, index)
  intro, scenes, texts = _document(rng, split, int(rng.integers(min_images, max_images + 1)))
  chunks: list = [] if intro is None else [intro]
  for scene, text in zip(scenes, texts):
    chunks += [render(scene, image_size), text]
  return {"chunks": chunks, "scenes": scenes, "held_out": any(map(has_held_out, scenes))}


def binding_episode(split: str, seed: int, index: int, *, num_shots: int = 4, num_ways: int = 2,
                    image_size: int = 64) -> dict:
  """A fast-binding episode (Frozen, Tsimpoukelli et al. 2021): ``num_ways`` shapes get fresh
  nonsense names, ``num_shots`` support images each say "This is a {name}." (ways take turns, in
  random order), and a query image of one shape seen in the support asks "What is this? It is a".
  Names and the name-to-shape binding are drawn per episode, so only the context can answer; with
  0 shots the answer is unknowable (chance). Keys: chunks (with the answer), prompt_chunks (ending
  at the question), answer, names, shapes (names[i] is bound to shapes[i]), scenes (supports,
  then the query), held_out."""
  if num_shots < 0:
    raise ValueError(f"num_shots must be >= 0, got {num_shots}")
  if not 1 <= num_ways <= len(SHAPES):
    raise ValueError(f"num_ways must be in [1, {len(SHAPES)}], got {num_ways}")
  rng = _rng(split, "binding", seed, index)
  shapes = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:num_ways]]
  names = _binding_names(rng, num_ways)
  ways = [int(w) for w in rng.permutation([i % num_ways for i in range(num_shots)])]
  scenes = [sample_scene(rng, split, num_objects=1, shape=shapes[w]) for w in ways]
  query_way = _pick(rng, sorted(set(ways))) if ways else int(rng.integers(num_ways))
  scenes.append(sample_scene(rng, split, num_objects=1, shape=shapes[query_way]))
  prompt_chunks: list = []
  for scene, w in zip(scenes, ways):
    prompt_chunks += [render(scene, image_size), SUPPORT_FORMAT.format(name=names[w])]
  prompt_chunks.append(render(scenes[-1], image_size))
  answer = names[query_way]
  return {"chunks": prompt_chunks + [f"{QUERY_PROMPT} {answer}."],
          "prompt_chunks": prompt_chunks + [QUERY_PROMPT], "answer": answer,
          "names": tuple(names), "shapes": tuple(shapes), "scenes": scenes,
          "held_out": any(map(has_held_out, scenes))}


def _text_binding(rng: np.random.Generator, split: str) -> str:
  """Binding in words: named objects are described, then one is shown again and named."""
  num_ways = int(rng.integers(2, 4))
  shapes = [SHAPES[k] for k in rng.permutation(len(SHAPES))[:num_ways]]
  names = _binding_names(rng, num_ways)
  sentences = []
  for w in rng.permutation(num_ways):
    obj = sample_object(rng, split, "centre", shapes[w])
    sentences.append(f"{SUPPORT_FORMAT.format(name=names[w])[:-1]}: "
                     f"{_with_article(noun_phrase(obj))}.")
  query = int(rng.integers(num_ways))
  obj = sample_object(rng, split, "centre", shapes[query])
  sentences.append(f"Here is {_with_article(noun_phrase(obj))}. {QUERY_PROMPT} {names[query]}.")
  return " ".join(sentences)


def fewshot_draw(split: str, seed: int, index: int, *, max_shots: int, pool_size: int,
                 zero_shot_demonstrations: int) -> tuple[int, list[int]]:
  """Few-shot training episode ``index``: its shot count, uniform in ``0..max_shots``, and the
  indices of its demonstrations among the first ``pool_size`` train items, distinct and drawn
  uniformly (``zero_shot_demonstrations`` of them at 0 shots, where they are shown without their
  images), as the evaluation draws them from its pool."""
  if max_shots < 0:
    raise ValueError(f"max_shots must be >= 0, got {max_shots}")
  needed = max(max_shots, zero_shot_demonstrations)
  if pool_size < needed:
    raise ValueError(f"pool_size must be at least {needed} (the most demonstrations an episode "
                     f"shows), got {pool_size}")
  rng = _rng(split, "fewshot", seed, index)
  shots = int(rng.integers(max_shots + 1))
  count = shots if shots else zero_shot_demonstrations
  return shots, [int(i) for i in rng.choice(pool_size, size=count, replace=False)]


def text_example(split: str, seed: int, index: int) -> dict:
  """Text-only LM pretraining data from the same world (no rendering): a caption, a detailed
  description, description-grounded QA in ``QA_FORMAT``, a document's text, or binding in words.
  Keys: text, kind (one of ``TEXT_KINDS``)."""
  rng = _rng(split, "text", seed, index)
  kind = _pick(rng, TEXT_KINDS)
  if kind == "caption":
    text = caption(sample_scene(rng, split), rng)
  elif kind == "description":
    text = description(sample_scene(rng, split))
  elif kind == "qa":
    scene, _, question, answer = _sample_vqa(rng, split)
    text = f"{description(scene)} {QA_FORMAT.format(question=question, answer=answer)}"
  elif kind == "document":
    intro, _, texts = _document(rng, split, int(rng.integers(2, 5)))
    text = " ".join(([intro] if intro else []) + texts)
  else:
    text = _text_binding(rng, split)
  return {"text": text, "kind": kind}


def pair_example(split: str, seed: int, index: int, *, image_size: int = 64) -> dict:
  """An image-text pair for vision pretraining: the canonical caption and a multi-hot float32
  target over ``ATTRIBUTE_NAMES`` (which shapes and colours are present). Keys: image, text,
  attributes, scene, held_out."""
  rng = _rng(split, "pair", seed, index)
  scene = sample_scene(rng, split)
  attributes = np.zeros(len(ATTRIBUTE_NAMES), np.float32)
  for o in scene.objects:
    attributes[SHAPES.index(o.shape)] = 1.0
    attributes[len(SHAPES) + COLOURS.index(o.colour)] = 1.0
  return {"image": render(scene, image_size), "text": canonical_caption(scene),
          "attributes": attributes, "scene": scene, "held_out": has_held_out(scene)}


GENERATORS: dict[str, Callable[..., dict]] = {
    "caption": caption_example, "vqa": vqa_example, "interleaved": interleaved_example,
    "binding": binding_episode, "text": text_example, "pair": pair_example,
}


@functools.cache
def majority_answers(seed: int = 0, num_questions: int = 5000) -> dict[str, str]:
  """The most common train answer per question type (ties: alphabetical), over the first
  ``num_questions`` train VQA items of ``seed``: the blind baseline VQA results are compared to."""
  counts = {t: collections.Counter() for t in QUESTION_TYPES}
  for index in range(num_questions):
    _, question_type, _, answer = _sample_vqa(_rng("train", "vqa", seed, index), "train")
    counts[question_type][answer] += 1
  return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items() if c}


def text_corpus(num_texts: int, *, seed: int = 0) -> list[str]:
  """The first ``num_texts`` train texts of ``seed``: the default tokenizer's training corpus."""
  return [text_example("train", seed, i)["text"] for i in range(num_texts)]
