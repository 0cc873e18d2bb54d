"""Input pipelines: mocked tfds CIFAR, the shared CIFAR-10 folder, the embedded digits; sharding and padding."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from receding_jax.training import input_pipeline as ip
from receding_jax.training.config import default_config


def cifar_config(batch_size=8, **dataset):
  c = default_config()
  c.optim.batch_size = batch_size
  c.dataset.shuffle_buffer = 1000
  for k, v in dataset.items():
    setattr(c.dataset, k, v)
  return c


def all_batches(iterator):
  return list(iterator)


def test_mocked_cifar_batches_have_the_right_shapes_and_are_normalised():
  c = cifar_config()
  with tfds.testing.mock_data(num_examples=40):
    shard = ip.load_shard(c, "train", 0, 1)
    batches = all_batches(ip.train_batches(shard, c, epoch=0))
  assert len(batches) == 40 // 8
  b = batches[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and set(b["label"]) <= set(range(10))
  # Pixels in [0, 255] normalised with CIFAR's mean/std land in [-mean/std, (1-mean)/std].
  lo = -np.array(c.dataset.mean) / np.array(c.dataset.std)
  hi = (1 - np.array(c.dataset.mean)) / np.array(c.dataset.std)
  assert np.all(b["image"] >= lo - 1e-5) and np.all(b["image"] <= hi + 1e-5)


def test_training_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch(cifar10_folder):
  c = cifar_config(batch_size=64, name="folder", folder=str(cifar10_folder))
  shard = ip.load_shard(c, "test", 0, 1)
  first = [b["label"] for b in ip.train_batches(shard, c, epoch=3)]
  again = [b["label"] for b in ip.train_batches(shard, c, epoch=3)]
  other = [b["label"] for b in ip.train_batches(shard, c, epoch=4)]
  tail = list(ip.train_batches(shard, c, epoch=3, skip_steps=100))
  assert len(first) == 10000 // 64
  np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
  assert not np.array_equal(np.concatenate(first), np.concatenate(other))
  assert len(tail) == len(first) - 100
  np.testing.assert_array_equal(tail[0]["label"], first[100])
  # Augmentation is part of the determinism: the same images come out bit for bit.
  full = list(ip.train_batches(shard, c, epoch=3))
  np.testing.assert_array_equal(tail[5]["image"], full[105]["image"])


def test_shared_cifar10_folder_labels_and_pixels(cifar10_folder):
  c = cifar_config(batch_size=500, name="folder", folder=str(cifar10_folder), augment="cifar")
  shard = ip.load_shard(c, "test", 0, 1)
  assert shard.total_examples == 10000
  batches = all_batches(ip.eval_batches(shard, c))
  labels = np.concatenate([b["label"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)  # Classes sorted = CIFAR-10 ids.
  # The reference's mean centres the real test images; its std values are below CIFAR-10's pixel std
  # (0.247, 0.243, 0.261), so normalised pixels keep a std of about 0.247 / 0.2023 = 1.22.
  np.testing.assert_allclose(images.mean((0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(images.std((0, 1, 2)), np.array([0.247, 0.243, 0.261]) / c.dataset.std, atol=0.03)


@pytest.mark.parametrize("processes", [1, 3])
def test_every_eval_example_counts_once_over_processes(cifar10_folder, processes):
  c = cifar_config(batch_size=96, name="folder", folder=str(cifar10_folder))
  counts, lengths = [], []
  for p in range(processes):
    shard = ip.load_shard(c, "test", p, processes)
    batches = all_batches(ip.eval_batches(shard, c))
    lengths.append(len(batches))
    assert all(b["image"].shape[0] == 96 // processes for b in batches)
    masks = np.concatenate([b["mask"] for b in batches])
    counts.append(np.bincount(np.concatenate([b["label"] for b in batches])[masks == 1], minlength=10))
  assert len(set(lengths)) == 1  # Every process runs the same number of eval steps.
  np.testing.assert_array_equal(np.sum(counts, axis=0), [1000] * 10)


def test_training_shards_are_disjoint_and_steps_agree_over_processes():
  c = default_config()
  c.dataset.name, c.dataset.augment, c.dataset.image_size = "digits", "none", 8
  c.dataset.mean, c.dataset.std = (0.3,), (0.4,)
  c.optim.batch_size = 64
  shards = [ip.load_shard(c, "train", p, 2) for p in range(2)]
  assert [s.num_examples for s in shards] == [750, 750]
  assert {ip.steps_per_epoch(s, 64) for s in shards} == {750 // 32}
  seen = [np.concatenate([b["image"].reshape(32, -1) for b in ip.train_batches(s, c, 0)]) for s in shards]
  rows = {r.tobytes() for r in seen[0]} & {r.tobytes() for r in seen[1]}
  assert len(rows) < 5  # Only digits that happen to be pixel-identical in both halves.
  assert seen[0].shape == (23 * 32, 64)


def test_imagenet_style_preprocessing_gives_square_crops():
  c = cifar_config(batch_size=4, name="imagenet2012", augment="imagenet", image_size=64, eval_split="validation")
  c.dataset.mean, c.dataset.std = ip.IMAGENET_MEAN, ip.IMAGENET_STD
  with tfds.testing.mock_data(num_examples=8):
    shard = ip.load_shard(c, "train", 0, 1)
    train = next(iter(ip.train_batches(shard, c, 0)))
    evaluation = next(iter(ip.eval_batches(ip.load_shard(c, "test", 0, 1), c)))
  assert train["image"].shape == (4, 64, 64, 3) and evaluation["image"].shape == (4, 64, 64, 3)
  assert np.all(np.isfinite(train["image"])) and train["image"].std() > 0.1


def test_batch_larger_than_the_split_is_refused():
  c = default_config()
  c.dataset.name, c.optim.batch_size = "digits", 4096
  with pytest.raises(ValueError, match="4096"):
    ip.steps_per_epoch(ip.load_shard(c, "train", 0, 1), 4096)


def encoded_images(shard):
  return [ex["image"] for ex in shard.dataset.as_numpy_iterator()]


def test_validation_is_carved_from_the_folder_training_split(cifar10_folder):
  # The 10,000 test images stand in for a training split, so the test stays quick.
  c = cifar_config(name="folder", folder=str(cifar10_folder), train_split="test", validation_examples=1000)
  train, validation = ip.load_shard(c, "train", 0, 1), ip.load_shard(c, "validation", 0, 1)
  assert (train.total_examples, validation.total_examples) == (9000, 1000)
  train_images, val_images = encoded_images(train), encoded_images(validation)
  assert (len(train_images), len(val_images)) == (9000, 1000)
  assert len(set(train_images) | set(val_images)) == 10000  # Disjoint, and together the whole split.
  labels = np.array([ex["label"] for ex in validation.dataset.as_numpy_iterator()])
  assert np.bincount(labels, minlength=10).min() > 60  # A random sample, not the first classes.
  # The held-out examples depend on validation_seed only, not on the training seed.
  c.seed = 7
  assert set(encoded_images(ip.load_shard(c, "validation", 0, 1))) == set(val_images)
  c.dataset.validation_seed = 1
  assert set(encoded_images(ip.load_shard(c, "validation", 0, 1))) != set(val_images)
  # Over processes the validation shards are disjoint and cover it.
  c.dataset.validation_seed = 0
  parts = [encoded_images(ip.load_shard(c, "validation", p, 3)) for p in range(3)]
  assert sorted(map(len, parts)) == [333, 333, 334] and set().union(*parts) == set(val_images)


def test_validation_is_carved_from_the_digits_and_from_tfds():
  c = default_config()
  c.dataset.name, c.dataset.validation_examples = "digits", 300
  train, validation = ip.load_shard(c, "train", 0, 1), ip.load_shard(c, "validation", 0, 1)
  assert (train.num_examples, validation.num_examples) == (1200, 300)
  rows = lambda shard: {ex["image"].tobytes() + bytes([ex["label"]]) for ex in shard.dataset.as_numpy_iterator()}
  assert len(rows(train) & rows(validation)) < 5  # Only digits that happen to be pixel-identical.


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) tfds dataset on disk: 40 random 32x32 images, labels 0..9, split 'train'."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(32, 32, 3)), "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(40)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(0)
    for i in range(n):
      yield i, {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": i % 10}


def test_validation_is_carved_from_a_tfds_split_and_sharded_over_processes(tmp_path):
  TinyImages(data_dir=str(tmp_path)).download_and_prepare()
  c = cifar_config(name="tiny_images", data_dir=str(tmp_path), validation_examples=10)
  train, validation = ip.load_shard(c, "train", 0, 1), ip.load_shard(c, "validation", 0, 1)
  assert (train.total_examples, validation.total_examples) == (30, 10)
  assert len(all_batches(ip.train_batches(train, c, epoch=0))) == 30 // 8
  assert not set(encoded_images(train)) & set(encoded_images(validation))
  parts = [ip.load_shard(c, "train", p, 4) for p in range(4)]
  assert sum(p.num_examples for p in parts) == 30 and {p.total_examples for p in parts} == {30}
  assert set().union(*map(set, map(encoded_images, parts))) == set(encoded_images(train))


def test_impossible_validation_splits_are_refused():
  c = default_config()
  c.dataset.name = "digits"
  with pytest.raises(ValueError, match="no validation split"):
    ip.load_shard(c, "validation", 0, 1)
  c.dataset.validation_examples = 1500
  with pytest.raises(ValueError, match="validation_examples = 1500"):
    ip.load_shard(c, "train", 0, 1)
  with pytest.raises(ValueError, match="'dev'"):
    ip.load_shard(c, "dev", 0, 1)
