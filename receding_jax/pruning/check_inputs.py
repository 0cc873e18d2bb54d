"""The inputs the check runs both models on: random floats, and integers drawn as valid, non-padding tokens.

Floats are standard normal. Integer inputs index something (tokens into an embedding table, class ids):
all zeros, the padding id of most vocabularies, would let a model that masks its padding out compare
zeros with zeros and pass any pruning. They are drawn uniformly from 1 .. V - 1, where V is the smallest
axis that the input indexes through a gather (an `nn.Embed` / `nnx.Embed` table, ``table[tokens]``),
found in the model's jaxpr; an input that indexes no table (a one-hot, an arithmetic use) is drawn from
1 .. TOKENS_WITHOUT_TABLE - 1. Booleans (masks) are drawn half True. Everything is drawn with numpy: an
N-D `jax.random` draw compiles slowly on XLA:CPU (jax's partitionable threefry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np

from receding_jax.pruning.models import Traced

#: Exclusive upper bound of an integer input that indexes no table: small, so that a one-hot of any
#: realistic depth still sees every drawn token.
TOKENS_WITHOUT_TABLE = 16


def random_inputs(traced: Traced, seed: int = 0) -> tuple[np.ndarray, ...]:
  """One array per input of `traced` (see the module docstring)."""
  specs = traced.inputs
  bounds: Sequence[int | None] = [None] * len(specs)
  if any(np.issubdtype(s.dtype, np.integer) for s in specs):
    closed = jax.make_jaxpr(traced.apply)(traced.variables, *specs)  # The analysis' trace, cached by jax.
    bounds = index_bounds(closed.jaxpr, len(closed.jaxpr.invars) - len(specs))
  rng = np.random.default_rng(seed)
  return tuple(_draw(rng, s, bound) for s, bound in zip(specs, bounds, strict=True))


def _draw(rng: np.random.Generator, spec: Any, bound: int | None) -> np.ndarray:
  dtype = np.dtype(spec.dtype)
  if np.issubdtype(dtype, np.floating):
    return rng.standard_normal(spec.shape, np.float32).astype(dtype)
  if dtype == np.bool_:
    return rng.random(spec.shape) < 0.5
  if np.issubdtype(dtype, np.integer):
    high = min(TOKENS_WITHOUT_TABLE if bound is None else bound, int(np.iinfo(dtype).max) + 1)
    return rng.integers(1, high, spec.shape).astype(dtype) if high > 1 else np.zeros(spec.shape, dtype)
  return np.zeros(spec.shape, dtype)


def index_bounds(jaxpr: jex.Jaxpr, first: int) -> list[int | None]:
  """For each input ``jaxpr.invars[first:]``: the smallest axis size of the gathers whose indices are
  computed from it (through integer values only; None where it indexes nothing)."""
  out = []
  for var in jaxpr.invars[first:]:
    sizes = _gathered(jaxpr, {var})
    out.append(min(sizes) if sizes else None)
  return out


def _sub_jaxprs(eqn: Any) -> list[jex.Jaxpr]:
  subs = []
  for param in eqn.params.values():
    for sub in param if isinstance(param, (list, tuple)) else (param,):
      if isinstance(sub, (jex.ClosedJaxpr, jex.Jaxpr)):
        subs.append(getattr(sub, "jaxpr", sub))
  return subs


def _gathered(jaxpr: jex.Jaxpr, tainted: set[Any]) -> list[int]:
  """Axis sizes indexed by gathers whose indices derive from `tainted` (sub-jaxprs entered, their inputs
  aligned with the equation's last ones: calls, cond branches, loop bodies)."""
  sizes: list[int] = []
  for eqn in jaxpr.eqns:
    hit = [isinstance(v, jex.Var) and v in tainted for v in eqn.invars]
    if not any(hit):
      continue
    if eqn.primitive.name == "gather" and hit[1]:
      shape = eqn.invars[0].aval.shape
      sizes.extend(shape[d] for d in eqn.params["dimension_numbers"].start_index_map)
    for sub in _sub_jaxprs(eqn):
      inner = [v for v, h in zip(sub.invars, hit[max(len(hit) - len(sub.invars), 0):], strict=False) if h]
      sizes.extend(_gathered(sub, set(inner)))
    tainted.update(v for v in eqn.outvars if jax.dtypes.issubdtype(getattr(v.aval, "dtype", None), np.integer))
  return sizes
