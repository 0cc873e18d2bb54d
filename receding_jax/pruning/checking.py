"""The check that makes a narrow model never silently wrong.

On a random input, the narrow model's outputs must equal the wide model's with every removed channel's
parameter entries zeroed (its producer's output, its norm's scale, bias and statistics, its consumers'
input): if the coupling analysis or the rebuild missed anything, the two differ, and `verify` raises
naming the modules of the pruned groups.

Both models run as traced (the narrow one from its own code; the wide one from the trace the coupling
analysis made, found again in jax's cache), evaluated on the host in numpy, equation by equation, in
each equation's dtype (`evaluate`): compiling the two programs with XLA cost 0.6 s (VGG-16) and 1.4 s
(ResNet-56, CIFAR, full width, 2 CPU cores), where numpy evaluates both in 0.02-0.1 s. Programs with a primitive,
parameter or dtype that `evaluate` does not cover (bfloat16, gathers, scans, ...) are compiled instead,
with XLA's backend optimisations off, and with float32 matmuls and convolutions at full precision: GPUs
otherwise compute them in TF32, where the wide and the narrow model round differently (1.7e-3 on a
VGG-16 on an H100, against a 1e-4 tolerance).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend.core as jex
import numpy as np
from flax import nnx

from receding_jax.pruning import slicing
from receding_jax.pruning.check_inputs import random_inputs
from receding_jax.pruning.models import Traced, linen_apply, nnx_apply

#: The check compiles each model once, with XLA's backend optimisations off: ResNet-50 compiles in 0.7 s
#: instead of 2.8 s (and op-by-op dispatch would compile every op of both models: 45 s).
CHECK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
#: On CPU also without XLA's MLIR fusion emitters: a pruned CIFAR VGG-16 (odd channel counts) compiled in
#: 0.15 s instead of 0.39 s, a ResNet-56 in 0.47 s instead of 0.88 s.
CPU_CHECK_COMPILER_OPTIONS = {**CHECK_COMPILER_OPTIONS, "xla_cpu_use_fusion_emitters": False}
#: Precision of the float32 matmuls and convolutions the check compiles (`run_once`): GPUs otherwise compute
#: them in TF32, where the wide and the narrow model round differently (1.7e-3 on a VGG-16 on an H100).
CHECK_PRECISION = "highest"


def run_once(fn: Any, *args: Any) -> Any:
  """`fn(*args)` compiled quickly for a single run (see CHECK_COMPILER_OPTIONS), its float32 matmuls and
  convolutions at CHECK_PRECISION."""
  with jax.default_matmul_precision(CHECK_PRECISION):
    lowered = jax.jit(fn).lower(*args)
  options = CPU_CHECK_COMPILER_OPTIONS if jax.default_backend() == "cpu" else CHECK_COMPILER_OPTIONS
  try:
    compiled = lowered.compile(compiler_options=options)
  except Exception:  # A backend without these options compiles with its defaults.
    compiled = lowered.compile()
  return compiled(*args)


def _narrow_program(traced: Traced, narrow_model: Any, narrow_variables: Any) -> tuple[Callable[..., Any], Any]:
  """(eval-mode apply function, its variables) of the narrow model, called like `traced.apply`."""
  kwargs = dict(traced.call_kwargs)  # The very keywords (PRNG keys too) the wide model was traced with.
  if traced.kind == "nnx":
    clone = nnx.clone(narrow_model)
    clone.eval()
    graphdef, state = nnx.split(clone)
    return nnx_apply(graphdef, kwargs), state
  return linen_apply(narrow_model, kwargs), narrow_variables


def host_arrays(tree: Any) -> Any:
  """Every leaf as numpy (PRNG keys, which numpy cannot hold, as they are): slicing, zeroing and checking
  on the host compile nothing (jax would, per leaf shape)."""
  is_key = lambda x: jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)
  return jax.tree.map(lambda x: x if is_key(x) else np.asarray(x), tree)


def _run(traced: Traced, zeroed: Any, narrow: tuple[Callable[..., Any], Any],
         inputs) -> tuple[list, list, float]:
  """(reference, narrow outputs) as flat lists, evaluated on the host (or compiled where it cannot be), and
  the tolerance of the two programs (`tolerance`)."""
  fn, variables = narrow
  specs = traced.inputs
  try:
    narrow_jaxpr = jax.make_jaxpr(fn)(variables, *specs)
  except Exception as e:
    raise ValueError(f"the narrow model does not run: {str(e).splitlines()[0]}") from e
  wide_jaxpr = jax.make_jaxpr(traced.apply)(traced.variables, *specs)  # The analysis' trace, cached by jax.
  bound = tolerance(wide_jaxpr, narrow_jaxpr)
  try:
    with _one_blas_thread():
      reference = evaluate(wide_jaxpr, *jax.tree.leaves(zeroed), *inputs)
      outputs = evaluate(narrow_jaxpr, *jax.tree.leaves(host_arrays(variables)), *inputs)
    return reference, outputs, bound
  except Unsupported:
    pass
  reference = run_once(traced.apply, zeroed, *inputs)
  outputs = run_once(fn, variables, *inputs)
  return jax.tree.leaves(jax.device_get(reference)), jax.tree.leaves(jax.device_get(outputs)), bound


def _as32(x: Any) -> np.ndarray:
  return np.asarray(x, np.float32)


def _difference(output: Any, reference: Any) -> float:
  """Largest |output - reference|: 0 where they are equal (infinities too) or where the reference is NaN
  (a zeroed channel's 0 * inf, which the narrow model does not compute); inf where only the output is NaN."""
  a, b = _as32(output), _as32(reference)
  with np.errstate(invalid="ignore"):  # inf - inf: equal infinities are caught by a == b.
    diff = np.where(a == b, np.float32(0), np.abs(a - b))
  diff = np.where(np.isnan(b), np.float32(0), np.where(np.isnan(diff), np.float32(np.inf), diff))
  return float(np.max(diff, initial=0.0))


def _one_blas_thread() -> contextlib.AbstractContextManager:
  """numpy's BLAS on one thread (with threadpoolctl, where installed): the check's matmuls are small, and on
  a busy 2-core machine OpenBLAS's two threads stalled each of them for ~0.1 s instead of ~1 ms."""
  try:
    import threadpoolctl
  except ImportError:
    return contextlib.nullcontext()
  return threadpoolctl.threadpool_limits(1, user_api="blas")


def _float_dtypes(jaxpr: jex.Jaxpr) -> set[np.dtype]:
  """The floating dtypes of every value of `jaxpr`: inputs, constants, intermediates (sub-jaxprs too)."""
  found = set()
  for eqn in jaxpr.eqns:
    for var in (*eqn.invars, *eqn.outvars):
      found.add(getattr(var.aval, "dtype", None))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        if isinstance(sub, (jex.ClosedJaxpr, jex.Jaxpr)):
          found |= _float_dtypes(getattr(sub, "jaxpr", sub))
  found |= {getattr(v.aval, "dtype", None) for v in (*jaxpr.constvars, *jaxpr.invars, *jaxpr.outvars)}
  return {np.dtype(d) for d in found if d is not None and jax.dtypes.issubdtype(d, np.floating)}


def tolerance(*programs: jex.ClosedJaxpr) -> float:
  """The check's relative tolerance: 3e-2 where any of the `programs` computes a value in a float narrower
  than 32 bits (bfloat16 convolutions of a model with float32 parameters and logits), else 1e-4."""
  low = any(d.itemsize < 4 for p in programs for d in _float_dtypes(p.jaxpr))
  return 3e-2 if low else 1e-4


def verify(traced: Traced, keep: Mapping[int, np.ndarray], narrow_model: Any, narrow_variables: Any,
           host_variables: Any = None) -> float:
  """Worst difference between the narrow model and the wide one with the removed channels zeroed, on
  random inputs (`check_inputs`: normal floats, valid non-padding tokens), both called with the keywords
  `traced` was (PRNG keys included); ValueError (naming the first failing group's modules) when it
  exceeds the tolerance.
  `host_variables`: the wide variables as numpy, when the caller has them already."""
  inputs = random_inputs(traced)
  wide = host_arrays(traced.variables) if host_variables is None else host_variables
  zeroed = slicing.zero_tree(wide, traced.coupling, keep)
  reference, outputs, bound = _run(traced, zeroed, _narrow_program(traced, narrow_model, narrow_variables), inputs)
  compared = [_as32(r) for r in reference]
  if sum(r.size for r in compared) and not any(np.any(~np.isnan(r)) for r in compared):
    raise ValueError("the check compared nothing: the wide model's outputs are NaN on all of its random "
                     "inputs; check the narrow model on your own data and prune with check=False")
  scale = max([1.0] + [float(np.max(np.abs(r[np.isfinite(r)]), initial=0.0)) for r in compared])
  worst = max([0.0] + [_difference(a, b) for a, b in zip(outputs, reference, strict=True)])
  if not worst <= bound * scale:
    members = sorted({"/".join(leaf[:-1]) for i in keep for leaf, _ in traced.coupling.groups[i].members})
    raise ValueError(f"the narrow model's outputs differ from the wide model's with the removed channels "
                     f"zeroed by {worst:.3g}: the pruning of modules {members[:8]} is not exact")
  return worst


# The host evaluation of a jaxpr: numpy rules for the primitives of convolutional networks and attention.


class Unsupported(Exception):
  """A primitive, parameter or dtype that `evaluate` does not cover: XLA runs the check instead."""


def evaluate(closed: jex.ClosedJaxpr, *args: Any) -> list[np.ndarray]:
  """The outputs of `closed` on `args` (flat arrays), computed with numpy in the jaxpr's dtypes (float32,
  float64, integers, bool; anything else raises Unsupported), matmuls and convolutions in BLAS."""
  try:
    with np.errstate(all="ignore"):  # Overflow to inf and NaN are values here, as in XLA.
      return _eval(closed.jaxpr, closed.consts, args)
  except (ValueError, TypeError, IndexError, KeyError, AttributeError) as e:  # Parameters no rule expects.
    raise Unsupported(f"{type(e).__name__}: {e}") from e


def _typed(aval: Any, value: Any) -> np.ndarray:
  dtype = np.dtype(getattr(aval, "dtype", None) or np.void)  # Keys and tokens have no numpy dtype.
  if not (dtype.kind in "biu" or dtype in (np.float32, np.float64)):
    raise Unsupported(f"dtype {dtype}")
  value = np.asarray(value, dtype)
  if value.shape != tuple(aval.shape):
    raise Unsupported(f"shape {value.shape}, expected {aval.shape}")
  return value


def _eval(jaxpr: jex.Jaxpr, consts: Any, args: Any) -> list[np.ndarray]:
  env: dict[Any, np.ndarray] = {}
  read = lambda v: _typed(v.aval, v.val) if isinstance(v, jex.Literal) else env[v]
  for var, value in zip((*jaxpr.constvars, *jaxpr.invars), (*consts, *args), strict=True):
    env[var] = _typed(var.aval, value)
  for eqn in jaxpr.eqns:
    rule = _RULES.get(eqn.primitive.name)
    if rule is None:
      raise Unsupported(f"primitive {eqn.primitive.name!r}")
    outs = rule(eqn, *map(read, eqn.invars))
    outs = outs if eqn.primitive.multiple_results else [outs]
    for var, value in zip(eqn.outvars, outs, strict=True):
      env[var] = _typed(var.aval, value)
  return [read(v) for v in jaxpr.outvars]


def _call(eqn, *args):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    body = eqn.params.get(key)
    if isinstance(body, jex.ClosedJaxpr):
      return _eval(body.jaxpr, body.consts, args)
    if isinstance(body, jex.Jaxpr):
      return _eval(body, (), args)
  raise Unsupported(f"call {eqn.primitive.name!r} without a jaxpr")


def _pad(x: np.ndarray, value: Any, config) -> np.ndarray:
  """lax.pad: `interior` values between elements, then `lo`/`hi` at the ends (negative: cropped)."""
  for axis, (_, _, interior) in enumerate(config):
    if interior and x.shape[axis] > 1:
      shape = list(x.shape)
      shape[axis] += (shape[axis] - 1) * interior
      out = np.full(shape, value, x.dtype)
      out[(slice(None),) * axis + (slice(None, None, interior + 1),)] = x
      x = out
  x = np.pad(x, [(max(lo, 0), max(hi, 0)) for lo, hi, _ in config], constant_values=value)
  return x[tuple(slice(max(-lo, 0), n - max(-hi, 0)) for (lo, hi, _), n in zip(config, x.shape, strict=True))]


def _operands(eqn, *args) -> list[np.ndarray]:
  """Operands in the dtype the product accumulates in (int8 x int8 -> int32, say)."""
  dtype = eqn.params.get("preferred_element_type")
  return [x if dtype is None else x.astype(dtype) for x in args]


def _dot_general(eqn, lhs, rhs):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = _operands(eqn, lhs, rhs)
  lf = [d for d in range(lhs.ndim) if d not in (*lc, *lb)]
  rf = [d for d in range(rhs.ndim) if d not in (*rc, *rb)]
  size = lambda x, dims: math.prod(x.shape[d] for d in dims)
  a = np.ascontiguousarray(lhs.transpose(*lb, *lf, *lc)).reshape(size(lhs, lb), size(lhs, lf), size(lhs, lc))
  b = np.ascontiguousarray(rhs.transpose(*rb, *rc, *rf)).reshape(size(rhs, rb), size(rhs, rc), size(rhs, rf))
  return np.matmul(a, b).reshape(*(lhs.shape[d] for d in (*lb, *lf)), *(rhs.shape[d] for d in rf))


def _conv(eqn, lhs, rhs):
  """lax.conv_general_dilated as one (grouped) matmul of the input's windows and the kernel."""
  p, spec, sp = eqn.params, eqn.params["dimension_numbers"], lhs.ndim - 2
  if p["batch_group_count"] != 1:
    raise Unsupported("batch_group_count")
  lhs, rhs = _operands(eqn, lhs.transpose(spec.lhs_spec), rhs.transpose(spec.rhs_spec))  # [N, C, *S], [O, C/G, *K]
  dilated = zip(p["padding"], p["lhs_dilation"], strict=True)
  lhs = _pad(lhs, 0, [(0, 0, 0)] * 2 + [(lo, hi, d - 1) for (lo, hi), d in dilated])
  rhs = _pad(rhs, 0, [(0, 0, 0)] * 2 + [(0, 0, d - 1) for d in p["rhs_dilation"]])
  (n, c), (o, g), k = lhs.shape[:2], (rhs.shape[0], p["feature_group_count"]), rhs.shape[2:]
  windows = np.lib.stride_tricks.sliding_window_view(lhs, k, axis=tuple(range(2, 2 + sp)))
  windows = windows[(slice(None),) * 2 + tuple(slice(None, None, s) for s in p["window_strides"])]
  out_sp = windows.shape[2:2 + sp]  # [N, C, *S', *K] -> [G, C/G * K, N * S']: both operands C-ordered
  windows = windows.reshape(n, g, c // g, *out_sp, *k)  # (numpy's batched matmul skips BLAS otherwise).
  windows = windows.transpose(1, 2, *range(3 + sp, 3 + 2 * sp), 0, *range(3, 3 + sp))
  windows = np.ascontiguousarray(windows).reshape(g, -1, n * math.prod(out_sp))
  out = np.matmul(np.ascontiguousarray(rhs).reshape(g, o // g, -1), windows)  # [G, O/G, N * S']
  out = np.moveaxis(out.reshape(o, n, *out_sp), 0, 1)
  return out.transpose(np.argsort(spec.out_spec))  # [N, O, *S'] in the output's layout.


def _reduce_window(reduce: Callable[..., np.ndarray], identity: Callable[[np.dtype], Any]):
  def rule(eqn, x):
    p = eqn.params
    if any(d != 1 for d in (*p["base_dilation"], *p["window_dilation"])):
      raise Unsupported("dilated reduce_window")
    x = _pad(x, identity(x.dtype), [(lo, hi, 0) for lo, hi in p["padding"]])
    windows = np.lib.stride_tricks.sliding_window_view(x, p["window_dimensions"])
    windows = windows[tuple(slice(None, None, s) for s in p["window_strides"])]
    return reduce(windows, axis=tuple(range(x.ndim, 2 * x.ndim)))
  return rule


def _lowest(dtype: np.dtype) -> Any:
  return -np.inf if dtype.kind == "f" else np.iinfo(dtype).min if dtype.kind in "iu" else False


def _highest(dtype: np.dtype) -> Any:
  return np.inf if dtype.kind == "f" else np.iinfo(dtype).max if dtype.kind in "iu" else True


def _div(eqn, x, y):
  if x.dtype.kind == "f":
    return x / y
  return np.sign(x) * np.sign(y) * (np.abs(x) // np.abs(y))  # Integer division truncates towards zero.


def _broadcast_in_dim(eqn, x, *dynamic):
  if dynamic:
    raise Unsupported("dynamic shapes")
  shape = [1] * len(eqn.params["shape"])
  for axis, size in zip(eqn.params["broadcast_dimensions"], x.shape, strict=True):
    shape[axis] = size
  return np.broadcast_to(x.reshape(shape), eqn.params["shape"])


def _reshape(eqn, x, *dynamic):
  if dynamic or eqn.params.get("dimensions") is not None:
    raise Unsupported("reshape with dimensions")
  return x.reshape(eqn.params["new_sizes"])


def _iota(eqn):
  p = eqn.params
  axis = [-1 if i == p["dimension"] else 1 for i in range(len(p["shape"]))]
  return np.broadcast_to(np.arange(p["shape"][p["dimension"]], dtype=p["dtype"]).reshape(axis), p["shape"])


def _dynamic_start(x, sizes, starts):
  return tuple(int(np.clip(s, 0, n - k)) for s, n, k in zip(starts, x.shape, sizes, strict=True))


def _dynamic_slice(eqn, x, *starts):
  sizes = eqn.params["slice_sizes"]
  return x[tuple(slice(s, s + k) for s, k in zip(_dynamic_start(x, sizes, starts), sizes, strict=True))]


def _dynamic_update_slice(eqn, x, update, *starts):
  out = x.copy()
  index = _dynamic_start(x, update.shape, starts)
  out[tuple(slice(s, s + k) for s, k in zip(index, update.shape, strict=True))] = update
  return out


def _elementwise(fn: Callable[..., Any]):
  return lambda eqn, *args: fn(*args)


_UFUNCS = {
    "neg": np.negative, "exp": np.exp, "exp2": np.exp2, "log": np.log, "log1p": np.log1p, "expm1": np.expm1,
    "sqrt": np.sqrt, "rsqrt": lambda x: np.reciprocal(np.sqrt(x)), "tanh": np.tanh, "sin": np.sin,
    "cos": np.cos, "logistic": lambda x: np.reciprocal(1 + np.exp(-x)), "abs": np.abs, "sign": np.sign,
    "floor": np.floor, "ceil": np.ceil, "square": np.square, "is_finite": np.isfinite, "not": np.invert,
    "stop_gradient": lambda x: x, "copy": lambda x: x, "copy_p": lambda x: x, "optimization_barrier":
    lambda *xs: list(xs), "add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
    "min": np.minimum, "pow": np.power, "atan2": np.arctan2, "rem": np.fmod, "nextafter": np.nextafter,
    "eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal, "gt": np.greater,
    "ge": np.greater_equal, "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor,
    "clamp": lambda lo, x, hi: np.minimum(np.maximum(x, lo), hi),
    "select_n": lambda which, *cases: np.choose(which.astype(np.int32), cases),
}
_RULES: dict[str, Callable[..., Any]] = {
    **{name: _elementwise(fn) for name, fn in _UFUNCS.items()},
    **{name: _call for name in ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                                "custom_vjp_call_jaxpr", "remat", "remat2", "checkpoint", "named_call")},
    "div": _div, "dot_general": _dot_general, "conv_general_dilated": _conv, "iota": _iota,
    "broadcast_in_dim": _broadcast_in_dim, "reshape": _reshape, "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "integer_pow": lambda eqn, x: np.power(x, x.dtype.type(eqn.params["y"])),
    "convert_element_type": lambda eqn, x: x.astype(eqn.params["new_dtype"]),
    "transpose": lambda eqn, x: x.transpose(eqn.params["permutation"]),
    "squeeze": lambda eqn, x: x.reshape([n for i, n in enumerate(x.shape) if i not in eqn.params["dimensions"]]),
    "rev": lambda eqn, x: np.flip(x, eqn.params["dimensions"]),
    "concatenate": lambda eqn, *xs: np.concatenate(xs, eqn.params["dimension"]),
    "split": lambda eqn, x: np.split(x, np.cumsum(eqn.params["sizes"])[:-1], eqn.params["axis"]),
    "pad": lambda eqn, x, value: _pad(x, value, eqn.params["padding_config"]),
    "slice": lambda eqn, x: x[tuple(slice(a, b, s) for a, b, s in zip(
        eqn.params["start_indices"], eqn.params["limit_indices"], eqn.params["strides"] or [1] * x.ndim,
        strict=True))],
    "reduce_sum": lambda eqn, x: np.sum(x, tuple(eqn.params["axes"])),
    "reduce_max": lambda eqn, x: np.max(x, tuple(eqn.params["axes"]), initial=_lowest(x.dtype)),
    "reduce_min": lambda eqn, x: np.min(x, tuple(eqn.params["axes"]), initial=_highest(x.dtype)),
    "reduce_prod": lambda eqn, x: np.prod(x, tuple(eqn.params["axes"])),
    "argmax": lambda eqn, x: np.argmax(x, eqn.params["axes"][0]),
    "argmin": lambda eqn, x: np.argmin(x, eqn.params["axes"][0]),
    "reduce_window_sum": _reduce_window(np.sum, lambda dtype: 0),
    "reduce_window_max": _reduce_window(np.max, _lowest),
    "reduce_window_min": _reduce_window(np.min, _highest),
}
