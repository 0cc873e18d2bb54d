"""The one setting that finds the real CIFAR-10 archive (conftest.py): found, skipped with a reason, or required."""

import pytest
from conftest import CIFAR10_ARCHIVE_ENV, DEFAULT_CIFAR10_ARCHIVE, REQUIRE_REAL_DATA_ENV, real_cifar10_archive


def test_the_setting_names_the_archive(tmp_path):
  archive = tmp_path / "cifar10-jpeg.tar.gz"
  archive.write_bytes(b"")
  assert real_cifar10_archive({CIFAR10_ARCHIVE_ENV: str(archive)}) == archive


def test_unset_it_is_the_shared_data_beside_the_repository():
  assert DEFAULT_CIFAR10_ARCHIVE.parts[-3:] == ("shared", "data", "cifar10-jpeg.tar.gz")
  if DEFAULT_CIFAR10_ARCHIVE.is_file():
    assert real_cifar10_archive({}) == real_cifar10_archive({CIFAR10_ARCHIVE_ENV: ""}) == DEFAULT_CIFAR10_ARCHIVE
  else:
    with pytest.raises(pytest.skip.Exception, match=str(DEFAULT_CIFAR10_ARCHIVE)):
      real_cifar10_archive({})


def test_a_missing_archive_skips_naming_the_setting_and_the_path(tmp_path):
  missing = tmp_path / "none.tar.gz"
  with pytest.raises(pytest.skip.Exception) as skipped:
    real_cifar10_archive({CIFAR10_ARCHIVE_ENV: str(missing), REQUIRE_REAL_DATA_ENV: "0"})
  assert CIFAR10_ARCHIVE_ENV in skipped.value.msg and str(missing) in skipped.value.msg


def test_a_missing_archive_fails_when_real_data_is_required(tmp_path):
  missing = tmp_path / "none.tar.gz"
  with pytest.raises(pytest.fail.Exception) as failed:
    real_cifar10_archive({CIFAR10_ARCHIVE_ENV: str(missing), REQUIRE_REAL_DATA_ENV: "1"})
  assert REQUIRE_REAL_DATA_ENV in failed.value.msg and str(missing) in failed.value.msg
