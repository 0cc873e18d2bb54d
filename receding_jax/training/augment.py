"""Per-example preprocessing in numpy and Pillow, shared by every input path (Grain, tf.data, device upload).

An example goes in as ``{'image': uint8 [H, W, C] array or encoded PNG/JPEG bytes, 'label': int}`` and
comes out as ``{'image': float32 [size, size, C] normalised, 'label': int32}`` (`Preprocessing`; the
pipeline stacks a batch's uint8 `Preprocessing.pixels` and normalises it in one go). Training augmentation
draws from a numpy Generator seeded by (seed, epoch, position of the example in its split) alone, so an
augmented image depends neither on the batch size nor on which thread or step produced it.

Augmentations (``config.dataset.augment``):

- ``cifar``: training: zero-pad by 4 (black, before normalising), random size x size crop, random
  horizontal flip; evaluation: resized to size x size if it is not already.
- ``imagenet``: training: Inception crop (area 8-100% of the image, aspect 3/4-4/3, resized to size x size)
  and a random flip; evaluation: shorter side resized to size * 256 / 224, central size x size crop.
- ``none``: resized to size x size if it is not already.

Resizing is Pillow's bilinear filter, which widens with the scale when shrinking (antialiased).
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from receding_jax.errors import InputError

#: Pillow modes by channel count.
MODES = {1: "L", 3: "RGB", 4: "RGBA"}
CIFAR_PAD = 4
CROP_AREA = (0.08, 1.0)  # Inception crop: fraction of the image's area.
CROP_ASPECT = (3 / 4, 4 / 3)  # Inception crop: width / height.
CROP_ATTEMPTS = 10  # Inception crop: samples tried before falling back to the whole image.
EVAL_RESIZE = 256 / 224  # ImageNet evaluation: shorter side = size * EVAL_RESIZE before the central crop.
#: JPEG segments that may precede the frame header: tables (DHT, DQT, DRI), APP0-15, comments.
SKIPPED_MARKERS = frozenset((0xC4, 0xDB, 0xDD, *range(0xE0, 0xF0), 0xFE))


def example_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
  """The Generator that augments one example: a function of (seed, epoch, position in the split) only."""
  return np.random.default_rng((seed, epoch, position))


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
  """(height, width, components) of a Huffman-coded (baseline, extended or progressive) JPEG, read from its
  frame header; None for anything else, or any marker layout this short reader does not expect."""
  if data[:2] != b"\xff\xd8":
    return None
  i = 2
  while i + 9 < len(data) and data[i] == 0xFF:
    marker = data[i + 1]
    if marker in (0xC0, 0xC1, 0xC2):
      return struct.unpack_from(">HHB", data, i + 5)
    if marker not in SKIPPED_MARKERS:
      return None
    i += 2 + struct.unpack_from(">H", data, i + 2)[0]
  return None


def _decode_jpeg(data: bytes, channels: int) -> np.ndarray | None:
  """A JPEG with `channels` components straight through libjpeg, skipping Pillow's header parsing in
  Python (which takes longer than decoding a 32 x 32 image); None where that does not apply."""
  header = jpeg_header(data)
  if header is None or header[2] != channels or channels not in (1, 3):
    return None
  height, width, _ = header
  try:
    im = Image.frombytes(MODES[channels], (width, height), data, "jpeg", MODES[channels], "")
    return np.frombuffer(im.tobytes(), np.uint8).reshape(height, width, channels)
  except (ValueError, OSError):
    return None  # Let Image.open say what is wrong.


def decode(image: Any, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] from encoded PNG/JPEG bytes (decoded by Pillow) or from an image array."""
  if isinstance(image, bytes | np.bytes_):
    array = _decode_jpeg(image, channels)
    if array is None:
      with Image.open(io.BytesIO(image)) as im:
        array = np.asarray(im if im.mode == MODES[channels] else im.convert(MODES[channels]))
  else:
    array = np.asarray(image)
  if array.ndim == 2:
    array = array[..., None]
  if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != channels:
    raise InputError(f"expected a uint8 image with {channels} channels, got {array.dtype} {array.shape}")
  return array


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _from_pil(im: Image.Image, channels: int) -> np.ndarray:
  array = np.asarray(im)
  return array[..., None] if channels == 1 else array


def resize(image: np.ndarray, height: int, width: int, box: tuple[float, ...] | None = None) -> np.ndarray:
  """uint8 [height, width, C]: `image` (or its `box` = (left, top, right, bottom) part) resized, bilinear."""
  if box is None and image.shape[:2] == (height, width):
    return image
  im = _to_pil(image).resize((width, height), Image.Resampling.BILINEAR, box=box)
  return _from_pil(im, image.shape[-1])


def crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
  """An Inception crop of a height x width image as (left, top, right, bottom), in pixels."""
  log_aspect = (math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1]))
  for _ in range(CROP_ATTEMPTS):
    area = rng.uniform(*CROP_AREA) * height * width
    aspect = math.exp(rng.uniform(*log_aspect))
    w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  return 0, 0, width, height


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Shorter side resized to size * 256 / 224, then the central size x size."""
  height, width = image.shape[:2]
  scale = size * EVAL_RESIZE / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  image = resize(image, new_h, new_w)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return image[top : top + size, left : left + size]


def pad_crop(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """CIFAR crop: a random size x size window of the image zero-padded by 4, flipped left-right half the time.

  One copy of the window's pixels (no padded image is built): this runs once per example per epoch."""
  height, width, channels = image.shape
  u = rng.random(3)
  top = int(u[0] * (height + 2 * CIFAR_PAD - size + 1)) - CIFAR_PAD  # Window origin in image pixels.
  left = int(u[1] * (width + 2 * CIFAR_PAD - size + 1)) - CIFAR_PAD
  y0, y1, x0, x1 = max(top, 0), min(top + size, height), max(left, 0), min(left + size, width)
  out = np.zeros((size, size, channels), np.uint8)
  if u[2] < 0.5:  # Column j of the window is column (left + size - 1 - j) of the image.
    out[y0 - top : y1 - top, left + size - x1 : left + size - x0] = image[y0:y1, x0:x1][:, ::-1]
  else:
    out[y0 - top : y1 - top, x0 - left : x1 - left] = image[y0:y1, x0:x1]
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class Preprocessing:
  """What `config.dataset` says about turning one stored example into a model input."""

  size: int  # Side of the square output, in pixels.
  channels: int
  augment: str  # 'cifar', 'imagenet' or 'none'.
  scale: np.ndarray  # float32 [size, size, C]: 1 / (255 std), tiled so that numpy loops over whole images.
  offset: np.ndarray  # float32 [size, size, C]: -mean / std.

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Preprocessing:
    d = config.dataset
    mean, std = np.asarray(d.mean, np.float64), np.asarray(d.std, np.float64)
    shape = (d.image_size, d.image_size, len(d.mean))
    scale = np.broadcast_to(1 / (255 * std), shape).astype(np.float32)
    return cls(d.image_size, len(d.mean), d.augment, scale, np.broadcast_to(-mean / std, shape).astype(np.float32))

  def normalize(self, image: np.ndarray) -> np.ndarray:
    """float32 [..., size, size, C]: (pixels / 255 - mean) / std of uint8 [..., size, size, C]."""
    out = image.astype(np.float32)
    out *= self.scale
    out += self.offset
    return out

  def pixels(self, image: Any, rng: np.random.Generator | None) -> np.ndarray:
    """uint8 [size, size, C]: decoded and, when `rng` is given (training), augmented."""
    image, size = decode(image, self.channels), self.size
    if rng is None or self.augment == "none":
      return center_crop(image, size) if self.augment == "imagenet" else resize(image, size, size)
    if self.augment == "cifar":
      return pad_crop(image, size, rng)
    image = resize(image, size, size, box=crop_box(*image.shape[:2], rng))  # 'imagenet'.
    return image[:, ::-1] if rng.random() < 0.5 else image

  def __call__(self, example: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    """{'image': float32 [size, size, C], 'label': int32 []}; `rng` given = training augmentation."""
    return {"image": self.normalize(self.pixels(example["image"], rng)), "label": np.int32(example["label"])}
