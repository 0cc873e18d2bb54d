"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared/data, extracted once per session.

The tests compile many small programs and run each briefly, so XLA's fast-compile settings (those of
launch/gpu_demo.py --tiny) are set here for this process and every process a test starts: they cut the
compile time of a CPU training run about threefold. A programme compiled so computes the same thing, less
optimised. XLA_FLAGS that already name an optimisation level are left as they are (set
`XLA_FLAGS=--xla_backend_optimization_level=2` to test with XLA's default)."""

import os
import pathlib
import tarfile

import pytest

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # Before any test imports jax.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()

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
