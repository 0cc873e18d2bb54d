"""The narrow model: the same code with narrower layers, for Linen and NNX.

Linen layers take their widths from attributes (``features``) and refuse parameters of other shapes. The
narrow Linen model is therefore the original module under a dynamic subclass that, whenever it is
initialised or applied, rewrites the width attributes of the layers pruning narrowed (by module path,
through `flax.linen.intercept_methods`): `features` of Conv/ConvTranspose/Dense/DenseGeneral/Embed, an
Einsum's kernel `shape`, and a depthwise conv's `feature_group_count`. It works with `apply`, `init`,
`jit`, `grad` and train mode; widths that the model's own code computes from its attributes (a reshape
to a hard-coded head count) cannot be rewritten, and `prune_params`' check then refuses the result. The
rewrites are plain JSON ({module path: {attribute: value}}), which is what pruned checkpoints store. The
narrow model checks the shapes of the parameters it is given against those its layers ask for without
tracing the initialisers, which flax does at every apply, and which at a pruned model's new shapes made
its first trace 3-4x slower than the wide model's (`_checked_param`).

NNX modules hold their parameters: the narrow model is a clone whose Variables are replaced by the
sliced ones and whose layers' width attributes are set from their new shapes; the original is untouched.
Only layers whose arrays changed are touched, each by its class's rule in `NNX_WIDTHS` (Conv,
ConvTranspose, Linear, LinearGeneral, Einsum, Embed, LoRA, MultiHeadAttention, recurrent cells; any
other module with a `num_features`: the norms, `NnxBoundedScaleNorm`), and only attributes it has are set.
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
LINEN_LAYERS = (nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Dense, nn.DenseGeneral, nn.Embed, nn.Einsum)


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
    if isinstance(layer, nn.Einsum):  # Its kernel's shape is an attribute.
      if shape != tuple(layer.shape):
        new["shape"] = shape
    elif isinstance(layer, nn.DenseGeneral):
      features = layer.features
      value = shape[-1] if isinstance(features, int) else tuple(shape[-len(features):])
      if value != features:
        new["features"] = value
    elif (features := shape[-2] if getattr(layer, "transpose_kernel", False) else shape[-1]) != layer.features:
      new["features"] = features  # A ConvTranspose with transpose_kernel holds [*window, features, in].
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


def _array_shape(module: nnx.Module, name: str) -> tuple[int, ...] | None:
  """The shape of the array `module` holds as `name` (an `nnx.Variable` or a plain array); None if none."""
  value = getattr(module, name, None)
  value = value.get_value() if isinstance(value, nnx.Variable) else value
  return tuple(np.shape(value)) if hasattr(value, "shape") else None


def _conv_widths(m: nnx.Module) -> dict[str, Any]:
  """nnx.Conv: kernel [*window, in / groups, out]; a depthwise conv keeps its channel multiplier."""
  shape = _array_shape(m, "kernel")
  groups = m.feature_group_count
  if groups > 1:
    groups = shape[-1] // (m.out_features // groups)
  return {"feature_group_count": groups, "in_features": shape[-2] * groups, "out_features": shape[-1],
          "kernel_shape": shape}


def _conv_transpose_widths(m: nnx.Module) -> dict[str, Any]:
  """nnx.ConvTranspose: kernel [*window, in, out], or [*window, out, in] with `transpose_kernel`."""
  shape = _array_shape(m, "kernel")
  n_in, n_out = (shape[-1], shape[-2]) if getattr(m, "transpose_kernel", False) else (shape[-2], shape[-1])
  return {"in_features": n_in, "out_features": n_out, "kernel_shape": shape}


def _linear_general_widths(m: nnx.Module) -> dict[str, Any]:
  """nnx.LinearGeneral: kernel [*batch, *in, *out]."""
  shape, n_in, n_out = _array_shape(m, "kernel"), len(m.in_features), len(m.out_features)
  return {"in_features": shape[len(shape) - n_out - n_in:len(shape) - n_out], "out_features": shape[-n_out:]}


def _attention_widths(m: nnx.Module) -> dict[str, Any]:
  """nnx.MultiHeadAttention: query kernel [in, heads, head_dim], key [in_kv, kv_heads, head_dim], out [.., out]."""
  (n_in, heads, head_dim), key = _array_shape(m.query, "kernel"), _array_shape(m.key, "kernel")
  return {"in_features": n_in, "num_heads": heads, "head_dim": head_dim, "qkv_features": heads * head_dim,
          "in_kv_features": key[0], "num_kv_heads": key[1], "out_features": _array_shape(m.out, "kernel")[-1]}


def _cell_widths(m: nnx.Module) -> dict[str, Any]:
  """Recurrent cells: input and hidden widths from their input and hidden projections' kernels."""
  found = {}
  for attribute, layers in (("in_features", ("ii", "dense_i")), ("hidden_features", ("hi", "dense_h"))):
    for layer in layers:
      shape = _array_shape(getattr(m, layer, None), "kernel")
      if shape:
        found[attribute] = shape[0]
        break
  return found


def _norm_widths(m: nnx.Module) -> dict[str, Any]:
  """Any module with `num_features` and a per-channel array (nnx norms, NnxBoundedScaleNorm); GroupNorm
  keeps its group size where the new width allows (whole groups removed), else its number of groups."""
  shape = next(filter(None, (_array_shape(m, n) for n in ("scale", "scale_logit", "bias", "mean", "var"))), None)
  if not shape:
    return {}
  found: dict[str, Any] = {"num_features": shape[-1]}
  size = getattr(m, "group_size", None)
  if isinstance(size, int) and hasattr(m, "num_groups"):
    if shape[-1] % size == 0:
      found["num_groups"] = shape[-1] // size
    else:
      found["group_size"] = shape[-1] // m.num_groups
  return found


def _lora_widths(m: nnx.Module) -> dict[str, Any]:
  return {"in_features": _array_shape(m, "lora_a")[0], "out_features": _array_shape(m, "lora_b")[-1]}


#: How each NNX layer's width attributes follow from its arrays (first matching class wins). Each reads the
#: layer's attributes as they were (the old widths) and its arrays as they are (the narrow shapes).
NNX_WIDTHS: tuple[tuple[type, Any], ...] = (
    (nnx.MultiHeadAttention, _attention_widths),
    (nnx.Conv, _conv_widths),
    (nnx.ConvTranspose, _conv_transpose_widths),
    (nnx.LinearGeneral, _linear_general_widths),
    (nnx.Linear, lambda m: dict(zip(("in_features", "out_features"), _array_shape(m, "kernel"), strict=True))),
    (nnx.Einsum, lambda m: {"kernel_shape": _array_shape(m, "kernel"), "bias_shape": _array_shape(m, "bias")}),
    (nnx.Embed, lambda m: dict(zip(("num_embeddings", "features"), _array_shape(m, "embedding"), strict=True))),
    (nnx.LoRA, _lora_widths),
    (nnx.RNNCellBase, _cell_widths),
)


def _nnx_widths(module: nnx.Module) -> dict[str, Any]:
  """The width attributes of `module` that its (narrow) arrays imply, for those it has."""
  rule = next((fn for cls, fn in NNX_WIDTHS if isinstance(module, cls)), None)
  if rule is None:
    rule = _norm_widths if hasattr(module, "num_features") else (lambda m: {})
  return {k: v for k, v in rule(module).items() if hasattr(module, k) and v is not None}


def _array_shapes(module: nnx.Module) -> list[tuple[int, ...]]:
  return [tuple(np.shape(x)) for x in jax.tree.leaves(nnx.state(module))]


def narrow_nnx(model: nnx.Module, narrow_state: nnx.State) -> nnx.Module:
  """A clone of `model` holding `narrow_state` (same structure, narrower arrays), whose layers that lost
  channels get width attributes that match their arrays (`NNX_WIDTHS`); the others are left as they are."""
  clone = nnx.clone(model)
  before = {path: _array_shapes(m) for path, m in nnx.iter_modules(clone)}
  nnx.update(clone, narrow_state)
  for path, module in nnx.iter_modules(clone):
    if _array_shapes(module) != before[path]:
      for name, value in _nnx_widths(module).items():
        setattr(module, name, value)
  return clone




