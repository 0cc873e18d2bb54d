"""Norms folded into the layer before them, for inference: y = norm(conv(x)) becomes conv'(x) + shift.

In inference mode a norm is a per-channel affine map, y = a * z + c (a = scale / sqrt(var + eps), c = bias
- mean * a). When its input z is the output of a convolution or dense layer, the multiplication moves
into that layer's kernel (its output axis, the last) and the addition into its bias, so the deployed
network runs one layer where training ran two. Which norm follows which layer is found by tracing the
model once and matching the array each norm receives to the array a layer returned (the same object: no
operation between them); `a` and `c` come from the norm's own code, evaluated on zeros, ones and twos
(one compilation for all norms), so any
norm whose inference mode is per-channel affine along the last axis folds (`BoundedScaleNorm`,
`flax.linen.BatchNorm`, or those passed as `norm_types`).

The folded network is the same Linen model applied to folded variables under an interceptor that turns
each folded norm into "add its shift" (nothing, when the layer has a bias to absorb it) and runs every
convolution through `jax.lax.conv_general_dilated` (not a model's CPU-specific formulation), so what is
exported does not depend on the machine that exported it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from receding_jax.norm import BoundedScaleNorm

#: Norm classes folded by default: their inference mode is per-channel affine.
NORM_TYPES: tuple[type, ...] = (BoundedScaleNorm, nn.BatchNorm)
#: Layers a norm folds into: their kernel's last axis is the output channel.
WEIGHT_LAYERS: tuple[type, ...] = (nn.Conv, nn.ConvTranspose, nn.Dense)


@dataclasses.dataclass(frozen=True)
class Fold:
  """One norm folded into the layer before it: norm(z) = scale * z + shift, per channel ([C] float32)."""

  norm: tuple[str, ...]
  layer: tuple[str, ...]
  scale: np.ndarray
  shift: np.ndarray
  layer_has_bias: bool


@dataclasses.dataclass(frozen=True)
class Folding:
  """The folds of one model, and the norms left as they are (path -> why)."""

  folds: tuple[Fold, ...]
  unfolded: Mapping[tuple[str, ...], str]

  def summary(self) -> dict[str, Any]:
    """JSON: the folded norms (path -> layer) and the unfolded ones (path -> reason)."""
    return {"folded": {"/".join(f.norm): "/".join(f.layer) for f in self.folds},
            "unfolded": {"/".join(p): why for p, why in self.unfolded.items()}}


def _path(module: nn.Module) -> tuple[str, ...] | None:
  return tuple(module.scope.path) if module.scope is not None else None


def _channel_axis_is_last(module: nn.Module, ndim: int) -> bool:
  axis = getattr(module, "axis", -1)
  return isinstance(axis, int) and axis % ndim == ndim - 1


def _probe(shape: Sequence[int], dtype: Any) -> np.ndarray:
  """Three constant examples, zeros, ones and twos, of one example's `shape` ([3, *shape[1:]])."""
  return np.broadcast_to(np.arange(3).reshape(3, *[1] * (len(shape) - 1)), (3, *shape[1:])).astype(dtype)


def affine_coefficients(probed: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
  """(a, c) with norm(z) = a * z + c per channel (last axis), from the norm's outputs on `_probe`'s three
  examples; None if the norm is not such a map."""
  out = np.asarray(probed, np.float64).reshape(3, -1, probed.shape[-1])
  c, a = out[0, 0], out[1, 0] - out[0, 0]
  size = max(1.0, float(np.abs(out).max()))
  per_channel = np.allclose(out, out[:, :1], rtol=0, atol=1e-6 * size)
  affine = np.allclose(out[2, 0], c + 2 * a, rtol=0, atol=1e-5 * size)
  return (a.astype(np.float32), c.astype(np.float32)) if per_channel and affine else None


@dataclasses.dataclass(frozen=True)
class _Candidate:
  """A norm called on a layer's output: the norm alone (detached, its variables) and how it was called."""

  norm: tuple[str, ...]
  layer: tuple[str, ...]
  layer_has_bias: bool
  module: nn.Module
  variables: Any
  probe: np.ndarray
  args: tuple
  kwargs: dict

  def __call__(self) -> jax.Array:
    return self.module.apply(self.variables, jnp.asarray(self.probe), *self.args, **self.kwargs)


def find_folds(model: nn.Module, variables: Mapping[str, Any], inputs: Sequence[jax.ShapeDtypeStruct],
               apply_kwargs: Mapping[str, Any], norm_types: tuple[type, ...] = NORM_TYPES) -> Folding:
  """Which norms of `model` fold where: traces it once on `inputs` (arrays or specs; inference mode by
  `apply_kwargs`), then evaluates every norm that follows a layer on constant inputs (one compilation)."""
  outputs: dict[int, tuple[tuple[str, ...], Any, bool]] = {}  # id(array) -> (layer path, array, has bias)
  candidates: list[_Candidate] = []
  unfolded: dict[tuple[str, ...], str] = {}

  def interceptor(next_fun, args, kwargs, context):
    module, path = context.module, _path(context.module)
    if context.method_name != "__call__" or path is None:
      return next_fun(*args, **kwargs)
    if isinstance(module, norm_types) and args:
      found = _candidate(path, module, args, kwargs, outputs)
      if isinstance(found, str):
        unfolded[path] = found
      else:
        candidates.append(found)
    result = next_fun(*args, **kwargs)
    if isinstance(module, WEIGHT_LAYERS):
      outputs[id(result)] = (path, result, bool(getattr(module, "use_bias", False)))
    return result

  def run(*x):
    with nn.intercept_methods(interceptor):
      return model.apply(dict(variables), *x, **dict(apply_kwargs))
  jax.eval_shape(run, *inputs)
  probed = jax.device_get(jax.jit(lambda: [c() for c in candidates])()) if candidates else []
  folds = []
  for candidate, out in zip(candidates, probed, strict=True):
    coefficients = affine_coefficients(out)
    if coefficients is None:
      unfolded[candidate.norm] = "its inference mode is not a per-channel affine map"
    else:
      folds.append(Fold(candidate.norm, candidate.layer, *coefficients, candidate.layer_has_bias))
  return Folding(tuple(folds), unfolded)


def _candidate(path, module, args, kwargs, outputs) -> _Candidate | str:
  """The norm call to evaluate, or why it cannot fold. Its variables are read out of the trace as values."""
  z = args[0]
  source = outputs.get(id(z))
  if source is None or source[1] is not z:
    return "its input is not the output of a Conv or Dense layer"
  if not _channel_axis_is_last(module, z.ndim):
    return f"its channel axis {getattr(module, 'axis', None)} is not the layer's output axis (the last)"
  if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((args[1:], kwargs))):
    return "it is called with traced arguments besides its input"
  own = jax.tree.map(lambda v: v if isinstance(v, jax.core.Tracer) else np.asarray(v), module.variables)
  if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(own)):
    return "its variables are computed inside the model"
  return _Candidate(path, source[0], source[2], module.clone(parent=None), own, _probe(z.shape, z.dtype),
                    tuple(args[1:]), dict(kwargs))


def fold_variables(variables: Mapping[str, Any], folding: Folding) -> dict[str, Any]:
  """`variables` with each fold's scale in its layer's kernel (last axis) and, with a bias, its shift too."""
  flat = traverse_util.flatten_dict(jax.device_get(dict(variables)))
  flat = {k: np.asarray(v) for k, v in flat.items()}
  for fold in folding.folds:
    kernel = ("params", *fold.layer, "kernel")
    flat[kernel] = (flat[kernel] * fold.scale).astype(flat[kernel].dtype)
    if fold.layer_has_bias:
      bias = ("params", *fold.layer, "bias")
      flat[bias] = (flat[bias] * fold.scale + fold.shift).astype(flat[bias].dtype)
  return traverse_util.unflatten_dict(flat)


def folded_interceptor(folding: Folding):
  """Turns folded norms into their shift (or nothing) and runs convolutions on `lax.conv_general_dilated`."""
  shifts = {f.norm: None if f.layer_has_bias else f.shift for f in folding.folds}

  def interceptor(next_fun, args, kwargs, context):
    module, path = context.module, _path(context.module)
    if context.method_name == "__call__" and path in shifts:
      shift = shifts[path]
      return args[0] if shift is None else args[0] + jnp.asarray(shift, args[0].dtype)
    if isinstance(module, nn.Conv) and getattr(module, "conv_general_dilated", None) is not None:
      object.__setattr__(module, "conv_general_dilated", None)  # The portable convolution.
    return next_fun(*args, **kwargs)
  return interceptor


def folded_function(model: nn.Module, variables: Mapping[str, Any], folding: Folding,
                    apply_kwargs: Mapping[str, Any]) -> Callable[..., jax.Array]:
  """inputs -> outputs of the folded network, its variables closed over (constants when traced)."""
  folded = fold_variables(variables, folding)
  interceptor = folded_interceptor(folding)
  kwargs = dict(apply_kwargs)

  def infer(*inputs):
    with nn.intercept_methods(interceptor):
      return model.apply(folded, *inputs, **kwargs)
  return infer
