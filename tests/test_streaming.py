"""The TensorFlow-free input pipeline (splits, augment, streaming, tfrecord) on mocked tfds, CIFAR-10, the digits
and tfds datasets on disk: determinism, resume, sharding, padding, TFRecord, and TensorFlow unimportable."""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tiny_png_images import TFRECORD_DIR, TinyPngImages

from receding_jax.training import augment, splits, streaming, tfrecord
from receding_jax.training.config import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def cifar_config(batch_size=8, **dataset):
  c = default_config()
  c.optim.batch_size = batch_size
  for k, v in dataset.items():
    setattr(c.dataset, k, v)
  return c


def digits_config(batch_size=64, **dataset):
  return cifar_config(batch_size, name="digits", augment="none", image_size=8, mean=(0.3,), std=(0.4,), **dataset)


def folder_validation_config(cifar10_folder, batch_size=32, **dataset):
  """1000 CIFAR-10 test images held out as 'validation': a real folder split that is quick to decode."""
  return cifar_config(batch_size, name="folder", folder=str(cifar10_folder), train_split="test",
                      validation_examples=1000, **dataset)


def concat(batches, key):
  return np.concatenate([b[key] for b in batches])


def real_rows(batches):
  """(label, image bytes) of the examples with mask 1."""
  real = concat(batches, "mask") == 1
  return list(zip(concat(batches, "label")[real].tolist(), map(np.ndarray.tobytes, concat(batches, "image")[real]),
                  strict=True))


def records(split):
  """This process's records as hashable (image bytes, label) rows."""
  rows = [split.source[i] for i in range(split.num_examples)]
  return [(r["image"] if isinstance(r["image"], bytes) else np.asarray(r["image"]).tobytes(), r["label"]) for r in rows]


@pytest.fixture(scope="module")
def array_record_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("array_record")
  TinyPngImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
  return data_dir


@pytest.fixture
def tfrecord_dir(tmp_path):
  """A copy of the committed TFRecord files of the same dataset, written by tfds and TensorFlow (3 shards)."""
  shutil.copytree(TFRECORD_DIR, tmp_path, dirs_exist_ok=True)
  return tmp_path


def tfrecord_shards(data_dir):
  return sorted((data_dir / "tiny_png_images" / "1.0.0").glob("*.tfrecord-*"))


def test_mocked_cifar_batches_have_the_right_shapes_and_are_normalised():
  c = cifar_config()
  with tfds.testing.mock_data(num_examples=40):  # Reports TFRecord, yet serves tfds.data_source.
    split = splits.load_split(c, "train", 0, 1)
    batches = list(streaming.train_batches(split, c, epoch=0))
  assert len(batches) == 40 // 8
  b = batches[0]
  assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].dtype == np.int32 and set(b["label"]) <= set(range(10))
  # Pixels in [0, 255] normalised with CIFAR's mean/std land in [-mean/std, (1-mean)/std].
  lo = -np.array(c.dataset.mean) / np.array(c.dataset.std)
  hi = (1 - np.array(c.dataset.mean)) / np.array(c.dataset.std)
  assert np.all(b["image"] >= lo - 1e-5) and np.all(b["image"] <= hi + 1e-5)


def test_training_order_depends_only_on_seed_and_epoch_and_resumes_mid_epoch(cifar10_folder, monkeypatch):
  c = folder_validation_config(cifar10_folder)
  split = splits.load_split(c, "validation", 0, 1)
  first = list(streaming.train_batches(split, c, epoch=3))
  other = list(streaming.train_batches(split, c, epoch=4))
  assert len(first) == 1000 // 32
  assert not np.array_equal(concat(first, "label"), concat(other, "label"))
  # A restarted process (a fresh split: nothing decoded yet) with other threads resumes bit for bit.
  monkeypatch.setattr(streaming, "THREADS", 1)
  fresh = splits.load_split(c, "validation", 0, 1)
  tail = list(streaming.train_batches(fresh, c, epoch=3, skip_steps=20))
  assert len(tail) == len(first) - 20
  for got, want in zip(tail, first[20:], strict=True):
    np.testing.assert_array_equal(got["label"], want["label"])
    np.testing.assert_array_equal(got["image"], want["image"])
  np.testing.assert_array_equal(concat(streaming.train_batches(fresh, c, epoch=3), "image"), concat(first, "image"))


def test_order_and_augmentation_do_not_depend_on_the_batch_size(cifar10_folder):
  c = folder_validation_config(cifar10_folder, batch_size=32)
  split = splits.load_split(c, "validation", 0, 1)
  small = list(streaming.train_batches(split, c, epoch=1))
  c.optim.batch_size = 100
  large = list(streaming.train_batches(split, c, epoch=1))
  n = 992  # Both epochs cover these first examples of the epoch's order.
  np.testing.assert_array_equal(concat(small, "label")[:n], concat(large, "label")[:n])
  np.testing.assert_array_equal(concat(small, "image")[:n], concat(large, "image")[:n])


def test_shared_cifar10_folder_labels_and_pixels(cifar10_folder):
  c = cifar_config(batch_size=500, name="folder", folder=str(cifar10_folder), augment="cifar")
  split = splits.load_split(c, "test", 0, 1)
  assert split.total_examples == 10000
  batches = list(streaming.eval_batches(split, c))
  labels, images = concat(batches, "label"), concat(batches, "image")
  np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)  # Classes sorted = CIFAR-10 ids.
  # The reference's mean centres the real test images; its std values are below CIFAR-10's pixel std
  # (0.247, 0.243, 0.261), so normalised pixels keep a std of about 0.247 / 0.2023 = 1.22.
  np.testing.assert_allclose(images.mean((0, 1, 2)), 0.0, atol=0.05)
  np.testing.assert_allclose(images.std((0, 1, 2)), np.array([0.247, 0.243, 0.261]) / c.dataset.std, atol=0.03)


def test_decoded_arrays_hold_the_pixels_that_evaluation_normalises(cifar10_folder):
  c = folder_validation_config(cifar10_folder, batch_size=250)
  split = splits.load_split(c, "validation", 0, 1)
  estimate = splits.nbytes_estimate(split)  # Known before anything is decoded.
  pixels, labels = splits.decoded_arrays(split)
  assert pixels.shape == (1000, 32, 32, 3) and pixels.dtype == np.uint8 and estimate == pixels.nbytes
  batches = list(streaming.eval_batches(split, c))
  np.testing.assert_array_equal(labels, concat(batches, "label"))
  normalised = augment.Preprocessing.from_config(c).normalize(pixels)
  np.testing.assert_allclose(normalised, concat(batches, "image"), rtol=0, atol=1e-6)
  reference = (pixels / 255.0 - np.array(c.dataset.mean)) / np.array(c.dataset.std)
  np.testing.assert_allclose(normalised, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("processes", [1, 3])
def test_every_eval_example_counts_once_over_processes(cifar10_folder, processes):
  c = folder_validation_config(cifar10_folder, batch_size=96)
  whole = list(streaming.eval_batches(splits.load_split(c, "validation", 0, 1), c))
  expected = sorted(real_rows(whole))
  rows, lengths = [], []
  for p in range(processes):
    split = splits.load_split(c, "validation", p, processes)
    batches = list(streaming.eval_batches(split, c))
    lengths.append(len(batches))
    assert all(b["image"].shape[0] == 96 // processes for b in batches)
    mask = concat(batches, "mask")
    assert mask.sum() == split.num_examples and np.all(concat(batches, "image")[mask == 0] == 0)
    rows += real_rows(batches)
  assert len(set(lengths)) == 1  # Every process runs the same number of eval steps.
  assert sorted(rows) == expected


def test_training_shards_are_disjoint_and_steps_agree_over_processes():
  c = digits_config()
  parts = [splits.load_split(c, "train", p, 2) for p in range(2)]
  assert [s.num_examples for s in parts] == [750, 750]
  assert {streaming.steps_per_epoch(s, 64) for s in parts} == {750 // 32}
  seen = [concat(streaming.train_batches(s, c, 0), "image").reshape(-1, 64) for s in parts]
  rows = {r.tobytes() for r in seen[0]} & {r.tobytes() for r in seen[1]}
  assert len(rows) < 5  # Only digits that happen to be pixel-identical in both halves.
  assert seen[0].shape == (23 * 32, 64)


def test_imagenet_style_preprocessing_gives_square_crops():
  c = cifar_config(batch_size=4, name="imagenet2012", augment="imagenet", image_size=64, eval_split="validation")
  c.dataset.mean, c.dataset.std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  with tfds.testing.mock_data(num_examples=8):  # Mocked images have random sizes.
    train = next(streaming.train_batches(splits.load_split(c, "train", 0, 1), c, 0))
    evaluation = next(streaming.eval_batches(splits.load_split(c, "test", 0, 1), c))
  assert train["image"].shape == (4, 64, 64, 3) and evaluation["image"].shape == (4, 64, 64, 3)
  assert np.all(np.isfinite(train["image"])) and train["image"].std() > 0.1


def test_batch_larger_than_the_split_is_refused():
  c = digits_config(batch_size=4096)
  with pytest.raises(ValueError, match="4096"):
    streaming.steps_per_epoch(splits.load_split(c, "train", 0, 1), 4096)


def test_validation_is_carved_from_the_folder_training_split(cifar10_folder, monkeypatch):
  monkeypatch.setattr(splits, "CACHE_DECODED_BYTES", 0)  # Records stay the files' bytes: nothing decoded.
  c = folder_validation_config(cifar10_folder)
  train, validation = splits.load_split(c, "train", 0, 1), splits.load_split(c, "validation", 0, 1)
  assert (train.total_examples, validation.total_examples) == (9000, 1000)
  train_rows, val_rows = records(train), records(validation)
  assert len(set(train_rows) | set(val_rows)) == 10000  # Disjoint, and together the whole split.
  assert np.bincount([label for _, label in val_rows], minlength=10).min() > 60  # A random sample.
  # The held-out examples depend on validation_seed only, not on the training seed.
  c.seed = 7
  assert set(records(splits.load_split(c, "validation", 0, 1))) == set(val_rows)
  c.dataset.validation_seed = 1
  assert set(records(splits.load_split(c, "validation", 0, 1))) != set(val_rows)
  # Over processes the validation shards are disjoint and cover it.
  c.dataset.validation_seed = 0
  parts = [records(splits.load_split(c, "validation", p, 3)) for p in range(3)]
  assert sorted(map(len, parts)) == [333, 333, 334] and set().union(*parts) == set(val_rows)


def test_validation_is_carved_from_the_digits():
  c = digits_config(validation_examples=300)
  train, validation = splits.load_split(c, "train", 0, 1), splits.load_split(c, "validation", 0, 1)
  assert (train.num_examples, validation.num_examples) == (1200, 300)
  assert len(set(records(train)) & set(records(validation))) < 5  # Only digits that happen to be identical.
  images, labels = splits.decoded_arrays(validation)
  assert images.shape == (300, 8, 8, 1) and images.dtype == np.uint8 and labels.dtype == np.int32


def test_validation_is_carved_from_an_array_record_tfds_split_and_sharded(array_record_dir):
  c = cifar_config(name="tiny_png_images", data_dir=str(array_record_dir), validation_examples=10)
  train, validation = splits.load_split(c, "train", 0, 1), splits.load_split(c, "validation", 0, 1)
  assert (train.total_examples, validation.total_examples) == (30, 10)
  assert len(list(streaming.train_batches(train, c, epoch=0))) == 30 // 8
  assert not set(records(train)) & set(records(validation))
  parts = [splits.load_split(c, "train", p, 4) for p in range(4)]
  assert sum(p.num_examples for p in parts) == 30 and {p.total_examples for p in parts} == {30}
  assert set().union(*map(set, map(records, parts))) == set(records(train))


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_a_tfrecord_dataset_reads_like_its_array_record_twin_without_tensorflow(array_record_dir, tfrecord_dir,
                                                                                 monkeypatch, processes):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` now raises ImportError.
  c, twin = (cifar_config(name="tiny_png_images", data_dir=str(d), validation_examples=10, eval_split="train[5:33]")
             for d in (tfrecord_dir, array_record_dir))
  for role, total in [("train", 30), ("validation", 10), ("test", 28)]:  # test: a slice across the 3 files.
    for p in range(processes):
      got, want = splits.load_split(c, role, p, processes), splits.load_split(twin, role, p, processes)
      assert (got.num_examples, got.total_examples) == (want.num_examples, want.total_examples)
      assert got.total_examples == total
      # The same examples in the same order: pixels and labels, and so the same batches.
      for a, b in zip(splits.decoded_arrays(got), splits.decoded_arrays(want), strict=True):
        np.testing.assert_array_equal(a, b)
      for key in ("image", "label", "mask"):
        np.testing.assert_array_equal(concat(streaming.eval_batches(got, c), key),
                                      concat(streaming.eval_batches(want, twin), key))
      if role == "train":
        for key in ("image", "label"):
          np.testing.assert_array_equal(concat(streaming.train_batches(got, c, epoch=2), key),
                                        concat(streaming.train_batches(want, twin, epoch=2), key))
  assert sys.modules["tensorflow"] is None  # Never imported (it would have replaced the None).


def test_tfrecord_records_are_the_encoded_images_and_their_crcs_check(tfrecord_dir):
  builder = tfds.builder("tiny_png_images", data_dir=str(tfrecord_dir))
  source = tfrecord.load(builder, "train[12:30]")  # Starts in the first file, ends in the third.
  assert len(source) == 18 and set(source.file_ids.tolist()) == {0, 1, 2}
  record = source[0]
  assert record["image"].startswith(b"\x89PNG") and augment.decode(record["image"], 3).shape == (32, 32, 3)
  assert tfrecord.crc32c(b"123456789") == 0xE3069283  # The standard check value of CRC-32C.
  for path in tfrecord_shards(tfrecord_dir):  # Every CRC that TensorFlow wrote, recomputed.
    data, position = path.read_bytes(), 0
    while position < len(data):
      length = int(np.frombuffer(data[position : position + 8], "<u8")[0])
      body = data[position + 12 : position + 12 + length]
      stored = np.frombuffer(data[position + 8 : position + 12] + data[position + 12 + length :][:4], "<u4")
      assert [tfrecord.masked_crc(tfrecord.crc32c(x)) for x in (data[position : position + 8], body)] == list(stored)
      position += 16 + length


def damage(path, how):
  """Damages a TFRecord file as `how` says; returns the byte its error names (None: any)."""
  data = bytearray(path.read_bytes())
  second = 16 + int(np.frombuffer(data[:8], "<u8")[0])  # Where the second record starts.
  if how == "truncated":
    path.write_bytes(data[:-10])
    return None
  where = {"length flipped": second, "bytes appended": len(data), "data flipped": 12}[how]
  if how == "bytes appended":
    data += bytes(5)
  else:  # A bit of the second record's length, or of the first record's data (its PNG).
    data[second + 2 if how == "length flipped" else 12 + 40] ^= 0x01
  path.write_bytes(data)
  return where


@pytest.mark.parametrize("how", ["truncated", "length flipped", "bytes appended", "data flipped"])
def test_a_corrupt_tfrecord_file_stops_loading_with_its_name(tfrecord_dir, how):
  # The data's CRC is checked by google_crc32c, which the [train] extra installs.
  path = tfrecord_shards(tfrecord_dir)[0]  # Holds the split's first examples, read as the split loads.
  offset = damage(path, how)
  c = cifar_config(name="tiny_png_images", data_dir=str(tfrecord_dir))
  with pytest.raises(ValueError, match="corrupt") as error:
    splits.load_split(c, "train", 0, 1)
  message = str(error.value)
  assert str(path) in message and "\n" not in message
  assert offset is None or f"at byte {offset}:" in message


def test_a_tfds_format_read_neither_by_tfds_nor_tfrecord_names_the_way_out(tfrecord_dir):
  info = tfrecord_dir / "tiny_png_images" / "1.0.0" / "dataset_info.json"
  info.write_text(json.dumps({**json.loads(info.read_text()), "fileFormat": "riegeli"}))
  with pytest.raises(ValueError, match="stored as riegeli") as error:
    splits.load_split(cifar_config(name="tiny_png_images", data_dir=str(tfrecord_dir)), "train", 0, 1)
  assert "tfds build tiny_png_images --file_format=array_record" in str(error.value)


def test_impossible_validation_splits_are_refused():
  c = digits_config()
  with pytest.raises(ValueError, match="no validation split"):
    splits.load_split(c, "validation", 0, 1)
  c.dataset.validation_examples = 1500
  with pytest.raises(ValueError, match="validation_examples = 1500"):
    splits.load_split(c, "train", 0, 1)
  with pytest.raises(ValueError, match="'dev'"):
    splits.load_split(c, "dev", 0, 1)


def test_folder_classes_files_and_sizes(tmp_path):
  rng = np.random.default_rng(0)
  for split, name, shape in [("train", "b", (6, 5, 3)), ("train", "a", (4, 4, 3)), ("test", "c", (4, 4, 3))]:
    (tmp_path / split / name).mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / split / name / "0.PNG")
  (tmp_path / "train" / "a" / "notes.txt").write_text("not an image")
  c = cifar_config(name="folder", folder=str(tmp_path))
  train, test = splits.load_split(c, "train", 0, 1), splits.load_split(c, "test", 0, 1)
  assert [train.source[i]["label"] for i in range(2)] == [0, 1] and test.source[0]["label"] == 2
  with pytest.raises(ValueError, match=r"\(4, 4, 3\).*\(6, 5, 3\)"):
    splits.decoded_arrays(train)
  with pytest.raises(ValueError, match="'validation'"):
    splits.load_split(cifar_config(name="folder", folder=str(tmp_path), eval_split="validation"), "test", 0, 1)


def test_cifar_crop_is_a_window_of_the_zero_padded_image_flipped_half_the_time():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = {(y, x, f): (padded[y : y + 32, x : x + 32][:, ::-1] if f else padded[y : y + 32, x : x + 32]).tobytes()
             for y in range(9) for x in range(9) for f in (False, True)}
  found = {}
  for position in range(400):
    out = augment.pad_crop(image, 32, augment.example_rng(0, 0, position))
    matches = [k for k, w in windows.items() if w == out.tobytes()]
    assert len(matches) == 1
    found[matches[0]] = found.get(matches[0], 0) + 1
  assert 100 < sum(n for (_, _, f), n in found.items() if f) < 300  # Flips: about half.
  assert len({(y, x) for y, x, _ in found}) > 60  # Of the 81 windows.


def test_decoding_matches_pillow_for_every_kind_of_image(cifar10_folder):
  files = sorted((cifar10_folder / "test" / "cat").iterdir())[:50]
  for f in files:
    data = f.read_bytes()
    assert augment.jpeg_header(data) == (32, 32, 3)  # CIFAR's JPEGs take the fast path.
    np.testing.assert_array_equal(augment.decode(data, 3), np.asarray(Image.open(f).convert("RGB")))
    np.testing.assert_array_equal(augment.decode(data, 1)[..., 0], np.asarray(Image.open(f).convert("L")))
  rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
  for image, options in [(rgb, {"progressive": True}), (rgb, {"subsampling": 0}), (rgb[..., 0], {})]:
    for fmt in ("JPEG", "PNG"):
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format=fmt, **(options if fmt == "JPEG" else {}))
      for channels, mode in ((1, "L"), (3, "RGB")):
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert(mode)).reshape(20, 30, channels)
        np.testing.assert_array_equal(augment.decode(buf.getvalue(), channels), want)


def test_inception_crops_stay_inside_the_image_and_evaluation_crops_the_centre():
  for position in range(200):
    left, top, right, bottom = augment.crop_box(300, 200, augment.example_rng(0, 0, position))
    assert 0 <= left < right <= 200 and 0 <= top < bottom <= 300
    area, aspect = (right - left) * (bottom - top) / 60000, (right - left) / (bottom - top)
    assert (0.07 < area <= 1.0 and 0.7 < aspect < 1.4) or (left, top, right, bottom) == (0, 0, 200, 300)
  image = np.zeros((100, 200, 3), np.uint8)
  image[:, 90:110] = 255  # A white band in the middle survives the central crop; the black sides do not all.
  crop = augment.center_crop(image, 64)
  assert crop.shape == (64, 64, 3) and crop[:, 32].min() > 200 and crop[:, 0].max() < 50


NO_TENSORFLOW = r"""
import sys
sys.modules["tensorflow"] = None  # Any `import tensorflow` now raises ImportError.
from receding_jax.training import augment, splits, streaming
from receding_jax.training.config import default_config

c = default_config()
c.dataset.update(dict(name="digits", augment="none", image_size=8, mean=(0.3,), std=(0.4,)))
batch = next(streaming.train_batches(splits.load_split(c, "train", 0, 1), c, 0))
assert batch["image"].shape == (64, 8, 8, 1)
c = default_config()
c.dataset.update(dict(name="folder", folder=sys.argv[1], train_split="test", validation_examples=50))
batch = next(streaming.eval_batches(splits.load_split(c, "validation", 0, 1), c))
assert batch["image"].shape == (64, 32, 32, 3) and batch["mask"].sum() == 50
assert sys.modules["tensorflow"] is None
# tfds reads a None entry as "TensorFlow is loaded" (etils checks the key), so for tfds hide the package
# from the import system instead, as where it is not installed.
del sys.modules["tensorflow"]

class Hide:
  def __init__(self, finder):
    self.finder = finder
  def find_spec(self, name, path=None, target=None):
    return None if name.partition(".")[0] == "tensorflow" else self.finder.find_spec(name, path, target)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
c = default_config()
c.dataset.name, c.dataset.data_dir, c.optim.batch_size = "tiny_png_images", sys.argv[2], 8
batch = next(streaming.train_batches(splits.load_split(c, "train", 0, 1), c, 0))
assert batch["image"].shape == (8, 32, 32, 3)
# The same dataset as TFRecord gives the same batch, from a local disk and from gs:// (in memory here).
import pathlib
import numpy as np
sys.path.insert(0, "tests")
import fake_gcs
fake_gcs.install()
from etils import epath
for f in filter(pathlib.Path.is_file, pathlib.Path(sys.argv[3]).rglob("*")):
  (epath.Path("gs://bucket/tfds") / f.relative_to(sys.argv[3])).write_bytes(f.read_bytes())
for c.dataset.data_dir in (sys.argv[3], "gs://bucket/tfds"):
  tfrecord_batch = next(streaming.train_batches(splits.load_split(c, "train", 0, 1), c, 0))
  np.testing.assert_array_equal(tfrecord_batch["image"], batch["image"])
assert "tensorflow" not in sys.modules
print("no tensorflow")
"""


def test_batches_are_made_with_tensorflow_unimportable(cifar10_folder, array_record_dir, tfrecord_dir):
  result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW, str(cifar10_folder), str(array_record_dir),
                           str(tfrecord_dir)],
                          cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "no tensorflow" in result.stdout
