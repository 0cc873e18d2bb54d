"""What a split is: this process's records of the train, validation or test split, without TensorFlow.

`load_split` gives a `Split`: a random-access source of this process's records (``len``, ``[i]`` ->
``{'image': uint8 [H, W, C] array or encoded PNG/JPEG bytes, 'label': int}``) and its sizes. Sources:

- ``digits``: scikit-learn's embedded 8x8 digits; the first `DIGITS_TRAIN` train, the rest test.
- ``folder``: ``folder/<split>/<class>/*.{png,jpg,jpeg}`` (``folder`` '': the extraction of ``archive``, see
  `archive`); class ids are the class folders (of all splits)
  sorted by name, as in ``tfds.ImageFolder``; files are read in sorted order and decoded by Pillow.
- any other name: a tfds dataset, prepared as ArrayRecord (through ``tfds.data_source``) or as TFRecord,
  tfds' default (`tfrecord`: the files indexed once, then read by position). Either gives the same
  records in the same order.

Splits have three roles (`ROLES`): ``train`` trains, ``validation`` is what every choice is made on, and
``test`` (``config.dataset.eval_split``) is only reported. The validation split is carved out of the
dataset's training split when ``config.dataset.validation_examples`` > 0 (``train`` is then the rest): for
a folder or the digits, a permutation seeded by ``config.dataset.validation_seed`` picks the held-out
examples; for tfds, the first examples (tfds stores a split shuffled, so they are a uniform sample).

Process p of P holds examples p, p + P, p + 2P, ... of the role's split (every process sees every class of
a folder sorted by class). An example's *position* is its index in the role's split over all processes
(`Split.position`); training augmentation is seeded by it.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pathlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import ml_collections
import numpy as np
from PIL import Image

from receding_jax.errors import InputError
from receding_jax.training import archive, augment, tfrecord
from receding_jax.training.config import ConfigError

ROLES = ("train", "validation", "test")
#: Digits (scikit-learn's embedded 8x8 images): the first DIGITS_TRAIN images train, the rest test.
DIGITS_TRAIN = 1500
IMAGE_EXTENSIONS = archive.IMAGE_EXTENSIONS  # As tfds.ImageFolder, any case.
#: Splits whose decoded uint8 pixels take at most this many bytes keep them in memory once decoded.
CACHE_DECODED_BYTES = 1 << 30
Record = dict[str, Any]


class Source(Protocol):
  """Random access to records: ``len(source)``, ``source[i]`` -> {'image', 'label'}."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Record: ...


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """Records from in-memory arrays: images uint8 [n, H, W, C], labels int [n]."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> Record:
    return {"image": self.images[index], "label": int(self.labels[index])}


@dataclasses.dataclass(frozen=True, eq=False)
class FileSource:
  """Records from image files, still encoded: the file's bytes and its class id."""

  paths: tuple[str, ...]
  labels: np.ndarray  # int [n]

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> Record:
    with open(self.paths[index], "rb") as f:
      return {"image": f.read(), "label": int(self.labels[index])}


@dataclasses.dataclass(frozen=True, eq=False)
class SubsetSource:
  """``base[indices[i]]``, keeping only 'image' and 'label' (tfds records carry more fields)."""

  base: Source
  indices: np.ndarray  # int64 [n]

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Record:
    record = self.base[int(self.indices[index])]
    return {"image": record["image"], "label": int(record["label"])}


@dataclasses.dataclass(frozen=True, eq=False)
class DecodedCache:
  """`base` whose images are decoded (uint8 [H, W, C]) on first access and then kept in memory."""

  base: Source
  channels: int
  cache: list = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    object.__setattr__(self, "cache", [None] * len(self.base))

  def __len__(self) -> int:
    return len(self.base)

  def __getitem__(self, index: int) -> Record:
    hit = self.cache[index]
    if hit is None:  # Threads may both decode it: the same pixels either way.
      record = self.base[index]
      hit = self.cache[index] = (augment.decode(record["image"], self.channels), record["label"])
    return {"image": hit[0], "label": hit[1]}


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """This process's part of one split: its examples process_index, + process_count, ... of the split."""

  source: Source
  num_examples: int  # In this process's part.
  total_examples: int  # In the whole split, over all processes.
  process_count: int
  channels: int  # Decoded images have this many channels (len(config.dataset.mean)).
  process_index: int = 0

  def position(self, index: int | np.ndarray) -> int | np.ndarray:
    """Position in the whole split (over all processes) of this process's example `index`."""
    return self.process_index + index * self.process_count


class DataNotFoundError(InputError):
  """The dataset a config names is not where the config says (a missing image folder, an unprepared tfds
  dataset)."""


def check_available(config: ml_collections.ConfigDict) -> None:
  """Raises DataNotFoundError (or archive.ArchiveError), naming the config key, the path and what to do,
  unless the splits the run reads exist; cheap (nothing is decoded, but a folder's ``dataset.archive`` is
  extracted the first time, see `archive`), so a run calls it before it writes anything."""
  d = config.dataset
  if d.name == "folder":
    root, key = (d.folder, "dataset.folder") if d.folder or not d.archive else (
        os.fspath(archive.ensure_extracted(d)), "the extraction of dataset.archive")
    splits = dict.fromkeys((d.train_split, d.eval_split))
    missing = [s for s in splits if not archive.has_images(pathlib.Path(root) / s)]
    if missing:
      raise DataNotFoundError(f"{key} = {root!r} has no images of the split(s) {missing}: it must "
                              "hold <split>/<class>/*.jpg (or .png); extract or point it at the dataset")
  elif d.name != "digits":
    import tensorflow_datasets as tfds

    try:
      builder = tfds.builder(d.name, data_dir=d.data_dir or None)
      builder.as_data_source(split=d.train_split)  # Under tfds.testing.mock_data: always there.
    except NotImplementedError:  # Prepared as TFRecord, or not at all.
      if not builder.is_prepared():
        raise DataNotFoundError(
            f"dataset.name = {d.name!r} is not prepared in {builder.data_dir} (dataset.data_dir = {d.data_dir!r}): "
            f"prepare it with `tfds build {d.name}` (ImageNet needs its archives downloaded by hand first)") from None
    except tfds.core.registered.DatasetNotFoundError as e:
      raise DataNotFoundError(f"dataset.name = {d.name!r} is not a tfds dataset: {str(e).splitlines()[0]}") from None


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits

  data = load_digits()
  images = np.clip(data.images * 16.0, 0, 255).astype(np.uint8)[..., None]  # 0..16 -> 0..256, [n, 8, 8, 1]
  labels = data.target.astype(np.int64)
  if split == "train":
    return images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN]
  if split == "test":
    return images[DIGITS_TRAIN:], labels[DIGITS_TRAIN:]
  raise ConfigError(f"the digits dataset has splits 'train' and 'test', got {split!r}")


def _folder(root: str, split: str) -> FileSource:
  """All images of `split` under `root`, sorted by class then file name; class ids over all splits."""
  root_path = pathlib.Path(root)
  splits = sorted(p.name for p in root_path.iterdir() if p.is_dir()) if root_path.is_dir() else []
  if split not in splits:
    raise DataNotFoundError(f"image folder {root} has splits {splits}, not {split!r}")
  classes = sorted({c.name for s in splits for c in (root_path / s).iterdir() if c.is_dir()})
  paths, labels = [], []
  for label, name in enumerate(classes):
    class_dir = root_path / split / name
    files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS) if class_dir.is_dir() else []
    paths += [str(f) for f in files]
    labels += [label] * len(files)
  return FileSource(tuple(paths), np.asarray(labels, np.int64))


def _check_held_out_count(total: int, num_held_out: int) -> None:
  if not 0 < num_held_out < total:
    raise ConfigError(f"dataset.validation_examples = {num_held_out} must be in (0, {total}): the training "
                     f"split has {total} examples and some must be left to train on")


def held_out(total: int, num_held_out: int, seed: int) -> np.ndarray:
  """bool [total]: which of `total` examples (by position in the split) are held out for validation;
  `num_held_out` of them, chosen by a permutation seeded by `seed` alone."""
  _check_held_out_count(total, num_held_out)
  mask = np.zeros(total, bool)
  mask[np.random.default_rng(seed).permutation(total)[:num_held_out]] = True
  return mask


def _role_split(config: ml_collections.ConfigDict, role: str) -> tuple[str, bool | None]:
  """(dataset split name, which part of it: None = all, True = held out, False = the rest)."""
  if role not in ROLES:
    raise ValueError(f"split role {role!r} is not one of {ROLES}")
  if role == "test":
    return config.dataset.eval_split, None
  carved = config.dataset.validation_examples > 0
  if role == "validation" and not carved:
    raise ConfigError("there is no validation split: set config.dataset.validation_examples > 0 to carve one "
                     "out of the training split")
  return config.dataset.train_split, (role == "validation") if carved else None


def evaluation_roles(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The splits a run is evaluated on: ('validation', 'test') when a validation split is carved, else
  ('test',). The first is the one evaluated every epoch."""
  return ("validation", "test") if config.dataset.validation_examples > 0 else ("test",)


def _role_indices(config: ml_collections.ConfigDict, total: int, part: bool | None, carve_first: bool) -> np.ndarray:
  """int64: indices into the dataset split of the role's examples, in order."""
  if part is None:
    return np.arange(total)
  n_held = config.dataset.validation_examples
  if carve_first:
    _check_held_out_count(total, n_held)
    return np.arange(n_held) if part else np.arange(n_held, total)
  return np.flatnonzero(held_out(total, n_held, config.dataset.validation_seed) == part)


def load_split(config: ml_collections.ConfigDict, role: str, process_index: int, process_count: int) -> Split:
  """This process's part of the `role` split ('train', 'validation' or 'test', see module doc) of the
  dataset that ``config.dataset`` names."""
  split, part = _role_split(config, role)
  channels, name = len(config.dataset.mean), config.dataset.name
  if name not in ("digits", "folder"):
    return _tfds_split(config, split, part, process_index, process_count)
  if name == "digits":
    images, labels = _digits(split)
    base = ArraySource(images, labels)
  else:
    base = _folder(archive.folder(config.dataset), split)
  indices = _role_indices(config, len(base), part, carve_first=False)
  mine = indices[process_index::process_count]
  source = SubsetSource(base, mine)
  if name == "folder":
    source = _cached_if_small(source, channels)
  return Split(source, len(mine), len(indices), process_count, channels, process_index)


def _tfds_split(config: ml_collections.ConfigDict, split: str, part: bool | None, process_index: int,
                process_count: int) -> Split:
  """A tfds dataset's split: ArrayRecord through tfds.data_source, TFRecord through `tfrecord`."""
  import tensorflow_datasets as tfds

  name, data_dir, channels = config.dataset.name, config.dataset.data_dir or None, len(config.dataset.mean)
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    data = builder.as_data_source(split=split)  # Under tfds.testing.mock_data: any format, and random.
  except NotImplementedError:  # Not a random-access format for tfds: TFRecord.
    data = tfrecord.load(builder, split)
  indices = _role_indices(config, len(data), part, carve_first=True)
  mine = indices[process_index::process_count]
  source = _cached_if_small(SubsetSource(data, mine), channels)
  return Split(source, len(mine), len(indices), process_count, channels, process_index)


def _image_shape(image: Any, channels: int) -> tuple[int, int, int]:
  """[H, W, C] of a record's image, reading only the header of encoded bytes."""
  if isinstance(image, bytes | np.bytes_):
    with Image.open(io.BytesIO(image)) as im:
      return im.height, im.width, channels
  return augment.decode(image, channels).shape


def _estimate(n: int, image: Any, channels: int) -> int:
  if image is None:
    return 0
  return n * int(np.prod(_image_shape(image, channels)))


def _cached_if_small(source: Any, channels: int) -> Any:
  """`source`, wrapped in a DecodedCache where its decoded pixels fit in CACHE_DECODED_BYTES."""
  if len(source) and _estimate(len(source), source[0]["image"], channels) <= CACHE_DECODED_BYTES:
    return DecodedCache(source, channels)
  return source


def nbytes_estimate(split: Split) -> int:
  """Bytes of this process's decoded uint8 images, guessed as n x (size of the first image)."""
  if not split.num_examples:
    return 0
  return _estimate(split.num_examples, split.source[0]["image"], split.channels)


def decoded_arrays(split: Split, threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [n, H, W, C], labels int32 [n]) of this process's examples, in order, decoded once by
  `threads` threads; a ValueError naming the shapes where the images differ in size."""
  source = split.source.base if isinstance(split.source, DecodedCache) else split.source  # Not cached twice.

  def decoded(index: int) -> tuple[np.ndarray, int]:
    record = source[index]
    return augment.decode(record["image"], split.channels), record["label"]

  with ThreadPoolExecutor(threads) as pool:
    pairs = list(pool.map(decoded, range(split.num_examples)))
  shapes = sorted({image.shape for image, _ in pairs})
  if len(shapes) > 1:
    raise InputError(f"images differ in size ({len(shapes)} shapes, e.g. {shapes[:3]}): they cannot be stacked "
                     "into one array; stream them instead, resized to dataset.image_size")
  images = np.stack([image for image, _ in pairs]) if pairs else np.zeros((0, 0, 0, split.channels), np.uint8)
  return images, np.asarray([label for _, label in pairs], np.int32)

