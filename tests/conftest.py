"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared/data, extracted once per session."""

import pathlib
import tarfile

import pytest

SHARED_CIFAR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory) -> pathlib.Path:
  """Root of the extracted CIFAR-10 image folder (train/<class>/*.jpg, test/<class>/*.jpg)."""
  if not SHARED_CIFAR.exists():
    pytest.fail(f"the shared CIFAR-10 archive is missing: {SHARED_CIFAR}")
  root = tmp_path_factory.mktemp("cifar10")
  with tarfile.open(SHARED_CIFAR) as tar:
    tar.extractall(root, filter="data")
  return root
