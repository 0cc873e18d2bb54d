"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared/data, extracted once per session.

The tests compile many small programs and run each briefly, so XLA's CPU backend optimisation level is
lowered to 1 here, for this process and every process a test starts: that cuts the compile time of a short
training run about threefold. Level 1 keeps the results that the tests compare (8 devices against 1 agree to
float rounding, as at the default level; level 0 does not). XLA_FLAGS that already name an optimisation
level are left as they are: `XLA_FLAGS=--xla_backend_optimization_level=N pytest` tests at level N.
The processes of a test run share one persistent compilation cache (below)."""

import os
import pathlib
import shutil
import tarfile
import tempfile

import pytest

TEST_XLA_FLAG = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # Before any test imports jax.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAG}".strip()

# One persistent compilation cache for the whole run, shared by every process a test starts (they inherit the
# environment): a program that several tests or subprocesses compile (the quickstart's steps) is compiled once.
# A fresh cache per run, so a fresh clone still compiles every function once; removed at the end.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  SESSION_CACHE = tempfile.mkdtemp(prefix="receding_jax_test_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
else:
  SESSION_CACHE = None


def pytest_sessionfinish(session, exitstatus):
  if SESSION_CACHE is not None:
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


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
