"""Shared fixtures: the real CIFAR-10 JPEGs, extracted once per session.

The tests that need them find the archive (cifar10-jpeg.tar.gz) through one setting, the environment variable
RECEDING_JAX_CIFAR10_ARCHIVE; unset, it is ../shared/data/cifar10-jpeg.tar.gz beside the repository (where CI
keeps it). Without the archive those tests are skipped, each with a reason naming the setting and the path;
with RECEDING_JAX_REQUIRE_REAL_DATA=1 they fail instead, so a run that must cover them cannot lose them.

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


#: The one setting for the real CIFAR-10 archive (README, "Set-up"), and the archive's path when it is unset.
CIFAR10_ARCHIVE_ENV = "RECEDING_JAX_CIFAR10_ARCHIVE"
DEFAULT_CIFAR10_ARCHIVE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
#: Set to 1 (as a run that must cover the real-data tests may): a missing archive fails those tests.
REQUIRE_REAL_DATA_ENV = "RECEDING_JAX_REQUIRE_REAL_DATA"


def real_cifar10_archive(environ=os.environ) -> pathlib.Path:
  """The real CIFAR-10 archive's path; skips the calling test when it is missing (fails if required)."""
  path = pathlib.Path(environ.get(CIFAR10_ARCHIVE_ENV) or DEFAULT_CIFAR10_ARCHIVE)
  if path.is_file():
    return path
  reason = f"needs the real CIFAR-10 archive: no file {path} (set {CIFAR10_ARCHIVE_ENV} to cifar10-jpeg.tar.gz)"
  if environ.get(REQUIRE_REAL_DATA_ENV, "") not in ("", "0"):
    pytest.fail(f"{reason}; {REQUIRE_REAL_DATA_ENV} requires it", pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope="session")
def cifar10_folder(tmp_path_factory) -> pathlib.Path:
  """Root of the extracted CIFAR-10 image folder (train/<class>/*.jpg, test/<class>/*.jpg)."""
  archive = real_cifar10_archive()
  root = tmp_path_factory.mktemp("cifar10")
  with tarfile.open(archive) as tar:
    tar.extractall(root, filter="data")
  return root
