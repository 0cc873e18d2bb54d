"""The StableHLO format: the folded inference function serialized by `jax.export`, batch axis symbolic.

The file is `jax.export`'s serialization (StableHLO bytecode in a versioned envelope, weights as
constants), lowered for CPU, CUDA and TPU at once, so one file runs wherever JAX runs:
``jax.export.deserialize(open(path, "rb").read()).call(x)`` with any batch size. Only jax is needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Platforms the module is lowered for (one file for all).
PLATFORMS = ("cpu", "cuda", "tpu")


def export_stablehlo(infer: Callable[[jax.Array], jax.Array], example_shape: Sequence[int],
                     platforms: Sequence[str] = PLATFORMS, dtype: Any = jnp.float32) -> bytes:
  """`infer` (one `dtype` input of shape [batch, *example_shape]) serialized with a symbolic batch axis."""
  batch = jax.export.symbolic_shape("batch")[0]
  spec = jax.ShapeDtypeStruct((batch, *example_shape), dtype)
  exported = jax.export.export(jax.jit(infer), platforms=tuple(platforms))(spec)
  return bytes(exported.serialize())


def run_stablehlo(serialized: bytes, inputs: np.ndarray, device: jax.Device | None = None) -> np.ndarray:
  """Outputs of a serialized module on `inputs` (any batch size), run by JAX on `device` (None: the default
  device)."""
  exported = jax.export.deserialize(bytearray(serialized))
  return np.asarray(exported.call(jax.device_put(jnp.asarray(inputs), device)))
