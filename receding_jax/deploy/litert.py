"""The LiteRT (TFLite) format: the folded inference function through jax2tf and the TFLite converter.

Needs the ``[export]`` extra (TensorFlow for the converter, ai-edge-litert to run the result); both are
imported here only, when called, so nothing else in the package depends on TensorFlow. The model takes a
fixed batch (default 1): with a symbolic batch the converter keeps every bias add and ReLU as a separate
broadcast op that XNNPACK cannot fuse into the convolution (VGG-16 batch 1 on 1 thread: 47 ms instead of
39 ms). Only TFLite built-in ops are allowed; a model that needs others fails to convert.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from receding_jax.errors import InputError

#: Post-training variants: weights stored in float16, or int8 with dynamic-range activations.
QUANTIZATIONS = ("float16", "int8")
INSTALL_HINT = ("pip install -e '.[export]' (TensorFlow and ai-edge-litert), or export --format=stablehlo "
                "(formats=('stablehlo',)), which needs neither")


class MissingExportTools(ImportError):
  """The `[export]` extra is not installed."""


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
  """Swallows what is written to the process's stderr (file descriptor 2: TensorFlow's and the converter's
  C++ log lines, which no logging setting reaches before absl is initialised) while the block runs; if the
  block raises, what it wrote is written back first, so a real failure keeps its messages."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as sink:
    os.dup2(sink.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      sink.seek(0)
      sys.stderr.write(sink.read().decode(errors="replace"))
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def _require(module: str) -> Any:
  try:
    with quiet_stderr():  # TensorFlow's import logs oneDNN notices.
      return importlib.import_module(module)
  except ImportError as e:
    raise MissingExportTools(f"the TFLite export needs {module.split('.')[0]}: {INSTALL_HINT}; {e}") from None


def require_export_tools() -> None:
  """Raises MissingExportTools (one line, what to install) unless TensorFlow and ai-edge-litert import."""
  _require("tensorflow")
  _require("ai_edge_litert.interpreter")


def to_tflite(infer: Callable[[Any], Any], input_shape: Sequence[int], quantization: str | None = None,
              dtype: Any = np.float32) -> bytes:
  """The TFLite flatbuffer of `infer` for `dtype` (float32 or uint8) inputs of `input_shape` (batch
  included). The converter's log lines are swallowed (`quiet_stderr`)."""
  if quantization not in (None, *QUANTIZATIONS):
    raise InputError(f"unknown quantization {quantization!r}; choose from {QUANTIZATIONS}")
  tf = _require("tensorflow")
  jax2tf = _require("jax.experimental.jax2tf")
  converted = jax2tf.convert(infer, with_gradient=False, native_serialization_platforms=("cpu",))
  function = tf.function(converted, autograph=False,
                         input_signature=[tf.TensorSpec(tuple(input_shape), tf.as_dtype(np.dtype(dtype)))])
  converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], function)
  converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
  if quantization is not None:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantization == "float16":
    converter.target_spec.supported_types = [tf.float16]
  with quiet_stderr():
    return bytes(converter.convert())


def interpreter(model: bytes, num_threads: int = 1, delegate: bool = True) -> Any:
  """A LiteRT interpreter of `model` on `num_threads` threads, tensors allocated; with `delegate` (what
  deployments run) the XNNPACK delegate takes the nodes it supports."""
  module = _require("ai_edge_litert.interpreter")
  resolver = (module.OpResolverType.AUTO if delegate else
              module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  with quiet_stderr():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    interp = module.Interpreter(model_content=model, num_threads=num_threads,
                                experimental_op_resolver_type=resolver)
    interp.allocate_tensors()
  return interp


def operators(model: bytes) -> list[str]:
  """The operator of each node of `model` ("CONV_2D", ...; "CUSTOM" or "Flex..." are not built-in)."""
  return [op["op_name"] for op in interpreter(model, delegate=False)._get_ops_details()]


def non_builtin(names: Sequence[str]) -> list[str]:
  """The names in `names` that are not TFLite built-in operators."""
  return sorted({n for n in names if n.upper() == "CUSTOM" or n.startswith("Flex")})


def run_tflite(model: bytes, inputs: np.ndarray, num_threads: int = 1) -> np.ndarray:
  """Outputs of `model` on `inputs`, fed in chunks of the model's batch size (a multiple of it)."""
  interp = interpreter(model, num_threads)
  source, target = interp.get_input_details()[0], interp.get_output_details()[0]
  batch = int(source["shape"][0])
  if len(inputs) % batch:
    raise ValueError(f"{len(inputs)} inputs are not a multiple of the model's batch {batch}")
  chunks = []
  for start in range(0, len(inputs), batch):
    interp.set_tensor(source["index"], np.ascontiguousarray(inputs[start:start + batch], source["dtype"]))
    interp.invoke()
    chunks.append(np.array(interp.get_tensor(target["index"])))
  return np.concatenate(chunks)
