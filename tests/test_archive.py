"""A folder dataset given as a .tar.gz (`dataset.archive`): extracted once into the cache, checked by sha256."""

import hashlib
import io
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from receding_jax.training import experiment, splits
from receding_jax.training.config import default_config, validate_config

CLASSES = ("cat", "dog", "emu")  # Sorted: label ids 0, 1, 2.


def _png(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _archive(path: pathlib.Path) -> str:
  """Writes a tar.gz of tiny/<split>/<class>/<i>.png (one top-level folder, as many archives have): 2 train
  and 1 test image per class. Returns its sha256."""
  with tarfile.open(path, "w:gz") as tar:
    for split, n in (("train", 2), ("test", 1)):
      for label, name in enumerate(CLASSES):
        for i in range(n):
          data = _png(40 * label + i)
          info = tarfile.TarInfo(f"tiny/{split}/{name}/{i}.png")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(archive: pathlib.Path, sha256: str):
  c = default_config()
  c.dataset.name, c.dataset.archive, c.dataset.archive_sha256 = "folder", str(archive), sha256
  c.dataset.num_classes, c.dataset.image_size = len(CLASSES), 4
  validate_config(c)
  return c


@pytest.fixture
def cache(tmp_path, monkeypatch) -> pathlib.Path:
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  return tmp_path / "cache" / "receding_jax" / "datasets"


def test_archive_is_extracted_once_into_the_cache_and_read_as_an_image_folder(tmp_path, cache, capsys):
  archive = tmp_path / "tiny.tar.gz"
  config = _config(archive, _archive(archive))
  splits.check_available(config)
  folders = list(cache.iterdir())
  extracted = [p for p in folders if not p.name.startswith(".")]
  assert len(extracted) == 1 and sorted(p.name for p in extracted[0].iterdir()) == ["test", "train"]
  assert f"extracting {archive} into {extracted[0]} (once" in capsys.readouterr().out
  before = extracted[0].stat()
  splits.check_available(config)  # A second run reuses the extraction.
  out = capsys.readouterr().out
  assert "extracting" not in out and str(extracted[0]) in out
  after = extracted[0].stat()
  assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  assert sorted(p.name for p in cache.iterdir() if ".partial-" in p.name) == []
  train, test = splits.load_split(config, "train", 0, 1), splits.load_split(config, "test", 0, 1)
  assert [test.source[i]["label"] for i in range(test.num_examples)] == [0, 1, 2]
  assert sorted(train.source[i]["label"] for i in range(train.num_examples)) == [0, 0, 1, 1, 2, 2]
  assert test.source[2]["image"][0, 0, 0] == 80  # emu's first image: the pixels the archive holds.


def test_a_wrong_sha256_or_a_missing_archive_is_one_line_naming_the_key_before_anything_is_written(
    tmp_path, cache):
  archive = tmp_path / "tiny.tar.gz"
  actual = _archive(archive)
  for config, words in [
      (_config(archive, "0" * 64), [f"has sha256 {actual}", f"dataset.archive_sha256 = {'0' * 64}"]),
      (_config(tmp_path / "nowhere.tar.gz", ""), ["dataset.archive = ", "is not a file",
                                                  "--config.dataset.archive=PATH"]),
  ]:
    with pytest.raises(ValueError) as error:
      experiment.run(config, str(tmp_path / "run"))
    assert type(error.value).__name__ == "ArchiveError" and "\n" not in str(error.value)
    assert all(w in str(error.value) for w in words), str(error.value)
    assert not (tmp_path / "run").exists() and not (cache.exists() and any(cache.iterdir()))
