"""tf.data input pipelines: tfds datasets, local image folders and an embedded default, per process.

Every process reads only its own shard of a split (tfds sub-splits, or `Dataset.shard` on still-encoded
images for a folder) and produces *local* batches of ``global_batch // process_count`` examples; the
training loop assembles them into global arrays. Guarantees:

- Training: one epoch = ``(examples // process_count) // local_batch`` steps on every process (the
  remainder is dropped); the order and the augmentation of epoch ``e`` depend only on (seed, e), so a
  run restarted at any epoch sees exactly the batches an uninterrupted run would have seen.
- Evaluation: every example of the split counts exactly once: batches are padded with examples whose
  ``mask`` is 0, and every process runs the same number of batches.

Splits have three roles (`ROLES`): ``train`` trains, ``validation`` is what every choice is made on, and
``test`` is only reported. The validation split is carved out of the dataset's training split when
``config.dataset.validation_examples`` > 0 (and ``train`` is then the rest): for a folder or the digits,
a permutation seeded by ``config.dataset.validation_seed`` picks the held-out examples; for a tfds
dataset it is the first examples of the split (tfds stores a split in a shuffled order, so these are a
uniform sample, and tfds reads only the files it needs). ``test`` is ``config.dataset.eval_split``.

Batches are dicts of numpy arrays: ``image`` float32 [batch, H, W, C] (normalised), ``label`` int32
[batch], and in evaluation ``mask`` float32 [batch] (1 = real example).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

Batch = dict[str, np.ndarray]

ROLES = ("train", "validation", "test")
#: Digits (scikit-learn's embedded 8x8 images): the first DIGITS_TRAIN images train, the rest test.
DIGITS_TRAIN = 1500
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Shard:
  """This process's part of one split: examples {'image': uint8 [H, W, C] or encoded bytes, 'label'}."""

  dataset: tf.data.Dataset
  num_examples: int  # In this process's shard.
  total_examples: int  # In the whole split, over all processes.
  process_count: int


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
  from sklearn.datasets import load_digits

  data = load_digits()
  images = np.clip(data.images * 16.0, 0, 255).astype(np.uint8)[..., None]  # 0..16 -> 0..256, [n, 8, 8, 1]
  labels = data.target.astype(np.int64)
  if split == "train":
    return images[:DIGITS_TRAIN], labels[:DIGITS_TRAIN]
  if split == "test":
    return images[DIGITS_TRAIN:], labels[DIGITS_TRAIN:]
  raise ValueError(f"the digits dataset has splits 'train' and 'test', got {split!r}")


def _check_held_out_count(total: int, num_held_out: int) -> None:
  if not 0 < num_held_out < total:
    raise ValueError(f"dataset.validation_examples = {num_held_out} must be in (0, {total}): the training "
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
    raise ValueError("there is no validation split: set config.dataset.validation_examples > 0 to carve one "
                     "out of the training split")
  return config.dataset.train_split, (role == "validation") if carved else None


def evaluation_roles(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The splits a run is evaluated on: ('validation', 'test') when a validation split is carved, else
  ('test',). The first is the one evaluated every epoch."""
  return ("validation", "test") if config.dataset.validation_examples > 0 else ("test",)


def load_shard(config: ml_collections.ConfigDict, role: str, process_index: int, process_count: int) -> Shard:
  """This process's shard of the `role` split ('train', 'validation' or 'test', see module doc) of the
  dataset that ``config.dataset`` names."""
  split, part = _role_split(config, role)
  n_held, seed = config.dataset.validation_examples, config.dataset.validation_seed
  name = config.dataset.name
  if name == "digits":
    images, labels = _digits(split)
    if part is not None:
      keep = held_out(len(labels), n_held, seed) == part
      images, labels = images[keep], labels[keep]
    total = len(labels)
    images, labels = images[process_index::process_count], labels[process_index::process_count]
    ds = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels})
    return Shard(ds, len(labels), total, process_count)
  decoders = {"image": tfds.decode.SkipDecoding()}  # Decode after sharding, in our own map.
  if name == "folder":
    builder = tfds.ImageFolder(config.dataset.folder)
    if split not in builder.info.splits:
      raise ValueError(f"image folder {config.dataset.folder} has splits {list(builder.info.splits)}, not {split!r}")
    ds = builder.as_dataset(split=split, decoders=decoders)  # A fixed order (tfds shuffles by split name).
    total = builder.info.splits[split].num_examples
    if part is not None:
      keep = tf.constant(held_out(total, n_held, seed) == part)

      def kept(index, example):
        del example
        return tf.gather(keep, index)

      def drop_index(index, example):
        del index
        return example

      ds = ds.enumerate().filter(kept).map(drop_index)
      total = n_held if part else total - n_held
    ds = ds.shard(process_count, process_index)
    local = len(range(process_index, total, process_count))
  else:
    builder = tfds.builder(name, data_dir=config.dataset.data_dir or None)
    if part is not None:
      _check_held_out_count(_split_size(builder, split, decoders), n_held)
      split = f"{split}[:{n_held}]" if part else f"{split}[{n_held}:]"
    sub = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
    ds = builder.as_dataset(split=sub, decoders=decoders)
    total = _split_size(builder, split, decoders)
    local = _split_size(builder, sub, decoders)
  ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"]})
  return Shard(ds, local, total, process_count)


def _split_size(builder: tfds.core.DatasetBuilder, split: str, decoders: dict) -> int:
  """Examples in `split` from the dataset's metadata, or counted where there is none (mocked data)."""
  try:
    return builder.info.splits[split].num_examples
  except KeyError:
    ds = builder.as_dataset(split=split, decoders=decoders)
    n = int(ds.cardinality())
    return n if n >= 0 else int(ds.reduce(0, lambda count, _: count + 1))


def _decode(image: tf.Tensor, channels: int) -> tf.Tensor:
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=channels, expand_animations=False)
  return tf.ensure_shape(image, [None, None, channels])


def _normalize(image: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(config.dataset.mean)) / tf.constant(config.dataset.std)


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
  return tf.image.resize(image, [size, size], method="bilinear", antialias=True)


def _random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor) -> tf.Tensor:
  """Inception-style crop: area 8%-100% of the image, aspect 3/4-4/3, resized to size x size."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True,
  )
  return _resize(tf.slice(image, begin, crop_size), size)


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resize the shorter side to size * 256 / 224, then take the central size x size."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (size * 256.0 / 224.0) / tf.reduce_min(shape)
  new = tf.cast(tf.round(shape * scale), tf.int32)
  image = tf.image.resize(image, new, method="bilinear", antialias=True)
  top, left = (new[0] - size) // 2, (new[1] - size) // 2
  return image[top : top + size, left : left + size]


def preprocess(example: dict, config: ml_collections.ConfigDict, train: bool, seed: tf.Tensor | None) -> dict:
  """Decoded, augmented (train) and normalised example; `seed` ([2] int) drives train augmentation."""
  size, augment = config.dataset.image_size, config.dataset.augment
  image = _decode(example["image"], len(config.dataset.mean))
  if augment == "imagenet":
    image = _random_resized_crop(image, size, seed) if train else _center_crop(image, size)
  elif augment == "cifar" and train:  # Zero-pad by 4 (black, before normalising), random crop.
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
    image = tf.image.stateless_random_crop(image, [size, size, tf.shape(image)[-1]], seed=seed)
  elif image.shape[0] != size or image.shape[1] != size:
    image = _resize(image, size)
  if train and augment != "none":
    image = tf.image.stateless_random_flip_left_right(image, seed=seed[::-1])
  image = tf.ensure_shape(_normalize(image, config), [size, size, len(config.dataset.mean)])
  return {"image": image, "label": tf.cast(example["label"], tf.int32)}


def steps_per_epoch(shard: Shard, global_batch: int) -> int:
  """Training steps per epoch: the same on every process (the smallest shard decides)."""
  local_batch = global_batch // shard.process_count
  steps = (shard.total_examples // shard.process_count) // local_batch
  if steps < 1:
    raise ValueError(f"batch size {global_batch} is larger than the training split ({shard.total_examples})")
  return steps


def _cache_if_small(shard: Shard, config: ml_collections.ConfigDict) -> tf.data.Dataset:
  return shard.dataset if config.dataset.name == "imagenet2012" else shard.dataset.cache()


def train_batches(
    shard: Shard, config: ml_collections.ConfigDict, epoch: int, skip_steps: int = 0
) -> Iterator[Batch]:
  """The local training batches of `epoch` (from step `skip_steps` on): shuffled and augmented as a
  function of (config.seed, epoch) only."""
  global_batch = config.optim.batch_size
  local_batch = global_batch // shard.process_count
  steps = steps_per_epoch(shard, global_batch)
  epoch_seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
  ds = _cache_if_small(shard, config)
  ds = ds.shuffle(min(config.dataset.shuffle_buffer, shard.num_examples), seed=epoch_seed,
                  reshuffle_each_iteration=False)
  ds = ds.enumerate().map(
      lambda i, ex: preprocess(ex, config, True, tf.stack([tf.constant(epoch_seed, tf.int64), i])),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
  )
  ds = ds.batch(local_batch, drop_remainder=True).take(steps).skip(skip_steps).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def eval_batches(shard: Shard, config: ml_collections.ConfigDict) -> Iterator[Batch]:
  """Local evaluation batches covering the shard once, padded (mask 0) so that every process runs
  ceil(ceil(total / processes) / local_batch) batches."""
  local_batch = max(1, config.optim.batch_size // shard.process_count)
  largest_shard = max(shard.num_examples, math.ceil(shard.total_examples / shard.process_count))
  num_batches = math.ceil(largest_shard / local_batch)
  ds = _cache_if_small(shard, config).map(
      lambda ex: {**preprocess(ex, config, False, None), "mask": tf.constant(1.0)},
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True,
  )
  padding = _zeros_like_spec(ds.element_spec)
  ds = ds.concatenate(padding.repeat(num_batches * local_batch - shard.num_examples))
  return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _zeros_like_spec(spec: dict) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensors({k: tf.zeros(s.shape, s.dtype) for k, s in spec.items()})
