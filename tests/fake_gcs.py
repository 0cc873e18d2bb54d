"""A ``gs://`` that lives in memory, for tests without network: fsspec's memory filesystem registered as
fsspec's ``gs``/``gcs`` implementation, which `etils.epath` uses for ``gs://`` paths once TensorFlow is not
importable (with TensorFlow, epath would go through tf.io.gfile instead).

`run_on_fake_gcs(code)` runs `code` in a fresh interpreter where TensorFlow is blocked and the fake is
installed, so no other test sees either.
"""

import os
import pathlib
import subprocess
import sys

from fsspec.implementations.memory import MemoryFileSystem

TESTS = pathlib.Path(__file__).resolve().parent


class FakeGCS(MemoryFileSystem):
  """``gs://bucket/a/b`` is the in-memory path ``/bucket/a/b``; its own store, apart from ``memory://``."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return "/" + path.strip("/")


def install() -> None:
  import fsspec

  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)


PRELUDE = """
import sys
sys.modules["tensorflow"] = None  # epath picks fsspec for gs:// only without TensorFlow.
import fake_gcs
fake_gcs.install()
"""


def run_on_fake_gcs(code: str, *args: str, cwd: os.PathLike | None = None) -> subprocess.CompletedProcess:
  """Runs `code` (after PRELUDE) in a subprocess on CPU, in `cwd`; fails the test with its stderr if it fails."""
  path = os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
  result = subprocess.run([sys.executable, "-c", PRELUDE + code, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result
