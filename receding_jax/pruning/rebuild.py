"""The narrow model: the same code with narrower layers, for Linen and NNX.

Linen layers take their widths from attributes (``features``) and refuse parameters of other shapes. The
narrow Linen model is therefore the original module under a dynamic subclass that, whenever it is
initialised or applied, rewrites the width attributes of the layers pruning narrowed (by module path,
through `flax.linen.intercept_methods`): `features` of Conv/ConvTranspose/Dense/DenseGeneral/Embed, and
a depthwise conv's `feature_group_count`. It works with `apply`, `init`, `jit`, `grad` and train mode;
widths that the model's own code computes from its attributes (a reshape to a hard-coded head count)
cannot be rewritten, and `prune_params`' check then refuses the result. The rewrites are plain JSON
({module path: {attribute: value}}), which is what pruned checkpoints store. The narrow model checks the
shapes of the parameters it is given against those its layers ask for without tracing the initialisers,
which flax does at every apply, and which at a pruned model's new shapes made its first trace 3-4x slower
than the wide model's (`_checked_param`).

NNX modules hold their parameters: the narrow model is a clone whose Variables are replaced by the
sliced ones and whose layers' width attributes are set from their new shapes; the original is untouched.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from flax.core import meta
from flax.core.scope import Scope

Overrides = dict[str, dict[str, Any]]  # {'block/conv1': {'features': 12}}
LINEN_LAYERS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Dense, nn.DenseGeneral, nn.Embed)


def record_linen_layers(layers: dict[tuple[str, ...], nn.Module]):
  """An interceptor that records every Linen layer of `LINEN_LAYERS` called, by its scope path."""
  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, LINEN_LAYERS) and module.scope is not None:
      layers.setdefault(tuple(module.scope.path), module)
    return next_fun(*args, **kwargs)
  return interceptor


def _shape(tree: Mapping[str, Any], *keys: str) -> tuple[int, ...] | None:
  node: Any = tree
  for key in keys:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return tuple(np.shape(node))


def linen_overrides(layers: Mapping[tuple[str, ...], nn.Module], params: Mapping[str, Any]) -> Overrides:
  """The width attributes of every recorded layer whose parameters in `params` (narrow) differ from its
  attributes: {module path: {attribute: new value}}."""
  out: Overrides = {}
  for path, layer in layers.items():
    leaf = "embedding" if isinstance(layer, nn.Embed) else "kernel"
    shape = _shape(params, *path, leaf)
    if shape is None:
      continue
    new: dict[str, Any] = {}
    if isinstance(layer, nn.DenseGeneral):
      features = layer.features
      value = shape[-1] if isinstance(features, int) else tuple(shape[-len(features):])
      if value != features:
        new["features"] = value
    elif shape[-1] != layer.features:
      new["features"] = shape[-1]
      groups = getattr(layer, "feature_group_count", 1)
      if groups > 1:
        new["feature_group_count"] = shape[-1] // (layer.features // groups)
    if new:
      out["/".join(path)] = {k: list(v) if isinstance(v, tuple) else v for k, v in new.items()}
  return out


def _as_attribute(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def narrow_linen(model: nn.Module, overrides: Mapping[str, Mapping[str, Any]]) -> nn.Module:
  """`model` whose layers at the paths in `overrides` get those attributes whenever it runs. Equal models
  with equal overrides give equal (and equally hashed) narrow models, so `jax.jit` caches keyed on the
  model (a static argument, a trainer built once per model) find them again instead of recompiling."""
  base = getattr(type(model), "_pruned_base", type(model))
  narrow_cls = _narrow_class(base, json.dumps({p: dict(a) for p, a in overrides.items()}, sort_keys=True))
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name")}
  return narrow_cls(**fields, parent=None, name=model.name)


@functools.cache
def _narrow_class(base: type, overrides_json: str) -> type:
  """The subclass of `base` that applies the overrides (JSON, keys sorted): one class per (base, overrides)."""
  overrides = json.loads(overrides_json)
  table = {tuple(p.split("/")) if p else (): {k: _as_attribute(v) for k, v in a.items()}
           for p, a in overrides.items()}

  def interceptor(next_fun, args, kwargs, context):
    module, scope = context.module, context.module.scope
    if scope is not None:
      for attribute, value in table.get(tuple(scope.path), {}).items():
        object.__setattr__(module, attribute, value)
      if "param" not in vars(scope):
        scope.param = functools.partial(_checked_param, scope)
    return next_fun(*args, **kwargs)

  def entry(name: str):
    method = getattr(base, name)

    def run(self, *args, **kwargs):
      with nn.intercept_methods(interceptor):
        return method(self, *args, **kwargs)
    run.__name__ = name
    return nn.nowrap(run)

  namespace = {name: entry(name) for name in ("apply", "init", "init_with_output")}
  namespace.update(_pruned_base=base, pruned_overrides=overrides,
                   __module__=base.__module__, __qualname__=f"Pruned{base.__qualname__}")
  return type(f"Pruned{base.__name__}", (base,), namespace)


def _checked_param(scope: Scope, name: str, init_fn: Any, *init_args: Any, unbox: bool = True,
                   **init_kwargs: Any) -> Any:
  """`Scope.param` for a parameter the variables hold, shape-checked against the shape its initializer is
  asked for (an initializer ``init(key, shape, dtype)`` returns that shape) instead of by tracing the
  initializer, as flax does at every apply. Why: at a pruned model's new shapes that trace costs 4-5 ms per
  parameter, 0.45 s of the 0.6 s a narrow ResNet-56 took to trace. Anything else, a mismatch included
  (flax then raises or accepts it), goes to flax."""
  shape = init_args[0] if init_args else None
  if not init_kwargs and _is_shape(shape) and scope.has_variable("params", name):
    value = scope.get_variable("params", name)
    leaves = jax.tree.leaves(meta.unbox(value))
    if len(leaves) == 1 and np.shape(leaves[0]) == tuple(shape):
      scope.reserve(name, "params")
      return meta.unbox(value) if unbox else value
  return Scope.param(scope, name, init_fn, *init_args, unbox=unbox, **init_kwargs)


def _is_shape(shape: Any) -> bool:
  return isinstance(shape, (tuple, list)) and all(isinstance(d, (int, np.integer)) for d in shape)


def _nnx_array(module: nnx.Module, name: str) -> tuple[int, ...] | None:
  value = getattr(module, name, None)
  return tuple(value.get_value().shape) if isinstance(value, nnx.Variable) and value.get_value() is not None else None


def _fix_nnx_conv(module: nnx.Conv | nnx.ConvTranspose, multiplier: int) -> None:
  shape = _nnx_array(module, "kernel")
  if module.feature_group_count > 1:
    module.feature_group_count = shape[-1] // multiplier
  module.in_features = shape[-2] * module.feature_group_count
  module.out_features = shape[-1]
  module.kernel_shape = shape


def _fix_nnx_module(module: nnx.Module, multiplier: int) -> None:
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    _fix_nnx_conv(module, multiplier)
  elif isinstance(module, nnx.Linear):
    module.in_features, module.out_features = _nnx_array(module, "kernel")
  elif isinstance(module, nnx.LinearGeneral):
    shape = _nnx_array(module, "kernel")
    n_in = len(module.in_features)
    module.in_features, module.out_features = shape[:n_in], shape[n_in:]
  elif isinstance(module, nnx.Embed):
    module.features = _nnx_array(module, "embedding")[-1]
  elif isinstance(module, nnx.MultiHeadAttention):
    _, module.num_heads, module.head_dim = _nnx_array(module.query, "kernel")
    module.qkv_features = module.num_heads * module.head_dim
    module.out_features = _nnx_array(module.out, "kernel")[-1]
  if hasattr(module, "num_features"):
    for name in ("scale", "scale_logit", "bias", "mean", "var"):
      shape = _nnx_array(module, name)
      if shape:
        module.num_features = shape[-1]
        break


def narrow_nnx(model: nnx.Module, narrow_state: nnx.State) -> nnx.Module:
  """A clone of `model` holding `narrow_state` (same structure, narrower arrays), width attributes set."""
  clone = nnx.clone(model)
  multipliers = {path: m.out_features // m.feature_group_count for path, m in nnx.iter_modules(clone)
                 if isinstance(m, (nnx.Conv, nnx.ConvTranspose))}
  nnx.update(clone, narrow_state)
  for path, module in nnx.iter_modules(clone):
    _fix_nnx_module(module, multipliers.get(path, 1))
  return clone




