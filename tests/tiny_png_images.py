"""The ``tiny_png_images`` tfds dataset that the input-pipeline tests prepare (ArrayRecord, no TensorFlow needed)
and read as committed TFRecord files (`TFRECORD_DIR`); run as a script, it rewrites those files.

tfds writes TFRecord only through TensorFlow (``tf.io.TFRecordWriter``), so the TFRecord copy is made once, by
real tfds and TensorFlow, and committed (a few KB): the tests then read files that neither our code nor our
test code wrote. To regenerate it (after changing the builder), in an environment with TensorFlow (e.g. the
``[export]`` extra):

    python tests/tiny_png_images.py
"""

import io
import pathlib
import shutil

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

#: The committed TFRecord copy: data_dir of tiny_png_images 1.0.0, in TFRECORD_SHARDS files.
TFRECORD_DIR = pathlib.Path(__file__).resolve().parent / "data" / "tfrecord"
TFRECORD_SHARDS = 3  # More than one, so that slices of the split cross files.


def png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


class TinyPngImages(tfds.core.GeneratorBasedBuilder):
  """40 random 32x32 PNGs (8x8-pixel blocks of random colour, so they compress to ~200 bytes), labels 0..9,
  split 'train'. The images are given encoded, so that preparing it as ArrayRecord needs no TensorFlow."""

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
      blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
      yield i, {"image": png(np.kron(blocks, np.ones((8, 8, 1), np.uint8))), "label": i % 10}


def write_tfrecord_copy() -> None:
  """Prepares the dataset as TFRecord (tfds' default format) into TFRECORD_DIR, replacing what is there."""
  shutil.rmtree(TFRECORD_DIR, ignore_errors=True)
  builder = TinyPngImages(data_dir=str(TFRECORD_DIR), file_format="tfrecord")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=TFRECORD_SHARDS))
  print(sorted(str(p.relative_to(TFRECORD_DIR)) for p in TFRECORD_DIR.rglob("*") if p.is_file()))


if __name__ == "__main__":
  write_tfrecord_copy()
