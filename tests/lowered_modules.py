"""The StableHLO modules jax compiles while a block runs, read from jax's own IR dump (``jax_dump_ir_to``):
how tests see the precision a computation was really compiled at (on CPU, TF32 cannot be observed)."""

from __future__ import annotations

import contextlib
import pathlib
import re
import tempfile
from collections.abc import Iterator

import jax

#: A matmul or convolution operation in StableHLO text (one line each; location lines do not match).
MATMUL_OP = re.compile(r"= stablehlo\.(?:dot_general|convolution)\b.*")


@contextlib.contextmanager
def compiled_modules() -> Iterator[dict[str, str]]:
  """While open, jax dumps every module it compiles; on exit the dict holds {dump file name: StableHLO text}
  (names like ``jax_ir0003_jit_reference_compile.mlir``)."""
  modules: dict[str, str] = {}
  previous = jax.config.values["jax_dump_ir_to"]
  with tempfile.TemporaryDirectory() as folder:
    jax.config.update("jax_dump_ir_to", folder)
    try:
      yield modules
    finally:
      jax.config.update("jax_dump_ir_to", previous)
      modules.update({p.name: p.read_text() for p in sorted(pathlib.Path(folder).glob("*.mlir"))})


def matmul_ops(text: str) -> list[str]:
  """The dot_general and convolution operations of a module's text."""
  return MATMUL_OP.findall(text)


def at_highest(op: str) -> bool:
  """Whether a dot_general or convolution line asks for HIGHEST precision (float32 on every backend)."""
  return "HIGHEST" in op
