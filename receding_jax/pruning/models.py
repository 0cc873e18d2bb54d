"""A model as pruning sees it: a pure function of its variables and inputs, for Linen and NNX alike.

`trace(model, variables, inputs)` returns a `Traced`: the eval-mode apply function, the (wide)
variables as one pytree, the input specs, the coupling analysis and the importances of its norms. Linen
models run ``model.apply(variables, *inputs, **eval_kwargs)``, where eval_kwargs are found from the
signature of ``__call__`` (``train=False``, ``training=False``, ``deterministic=True``,
``use_running_average=True``; ``apply_kwargs`` overrides). NNX models run a clone switched to
``eval()``, called with the same keywords; their variables are ``nnx.state(model)``.

``apply_kwargs`` reach every call pruning makes (analysis, check, `prune_params_like`, `count_macs`, ...):
Linen, keywords of ``model.apply`` (``__call__``'s, and apply's ``rngs=``; with ``mutable=`` only the
predictions are analysed); NNX, keywords of the module's call (``rngs=nnx.Rngs(...)`` is copied afresh
for every call, so every program draws the same random numbers). A random draw's values change with its
shape, so the analysis keeps every channel a draw touches (dropout in train mode, a VAE's sampled
latents): the wide and the narrow model then draw the same numbers from the same keys, and the check
compares them exactly.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from flax.core import meta

from receding_jax.errors import InputError
from receding_jax.importances import neuron_importances
from receding_jax.pruning.coupling import Coupling, analyze
from receding_jax.pruning.criteria import ScoredGroup, score_groups
from receding_jax.pruning.rebuild import record_linen_layers
from receding_jax.pruning.rules import Rule
from receding_jax.selection import leaf_names, path_names

EVAL_KWARGS = {"train": False, "training": False, "deterministic": True, "use_running_average": True}
LINEN_COLLECTIONS = ("params", "batch_stats")


@dataclasses.dataclass(frozen=True)
class Traced:
  """Everything pruning needs about one model (see the module docstring)."""

  model: Any
  kind: str  # 'linen' or 'nnx'
  apply: Callable[..., Any]
  variables: Any
  inputs: tuple[jax.ShapeDtypeStruct, ...]
  coupling: Coupling
  groups: list[ScoredGroup]
  linen_layers: dict[tuple[str, ...], nn.Module]
  call_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # What `apply` calls it with.
  boxed: Any = None  # Linen variables as given, where flax boxes (nn.LogicallyPartitioned, ...) hold leaves.

  def group(self, name: str) -> ScoredGroup:
    for g in self.groups:
      if g.name == name:
        return g
    raise KeyError(name)


def input_specs(model: Any, inputs: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
  """`inputs` (an array, a ShapeDtypeStruct, or a tuple of them) as specs; default one float32 input of
  shape [1, *model.input_shape]."""
  if inputs is None:
    shape = getattr(model, "input_shape", None)
    if shape is None:
      raise InputError(f"{type(model).__name__} has no input_shape attribute: pass inputs= (an example input "
                       "or a jax.ShapeDtypeStruct, with its batch axis)")
    return (jax.ShapeDtypeStruct((1, *tuple(shape)), jnp.float32),)
  items = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
  out = []
  for item in items:
    if not hasattr(item, "shape") or not hasattr(item, "dtype"):
      raise InputError(f"inputs must be arrays or jax.ShapeDtypeStructs, got {type(item).__name__}")
    out.append(jax.ShapeDtypeStruct(tuple(item.shape), item.dtype))
  return tuple(out)


def eval_kwargs(model: Any, apply_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
  """The keyword arguments that put `model.__call__` (Linen or NNX) in inference mode, then `apply_kwargs`."""
  try:
    names = inspect.signature(type(model).__call__).parameters
  except (TypeError, ValueError):
    names = {}
  found = {k: v for k, v in EVAL_KWARGS.items() if k in names}
  return {**found, **dict(apply_kwargs or {})}


def linen_apply(model: nn.Module, kwargs: Mapping[str, Any]) -> Callable[..., Any]:
  """``model.apply(variables, *inputs, **kwargs)``'s predictions: with ``mutable=`` or
  ``capture_intermediates=`` apply also returns the updated collections, which pruning drops."""
  with_state = kwargs.get("mutable", False) is not False or bool(kwargs.get("capture_intermediates"))

  def apply(variables, *inputs):
    out = model.apply(variables, *inputs, **kwargs)
    return out[0] if with_state else out
  return apply


def abstract_linen_variables(model: nn.Module, inputs: Sequence[jax.ShapeDtypeStruct],
                             kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Shapes of the variables `model.init` creates (nothing is computed). `kwargs` are apply's: their
  ``rngs`` join init's 'params' key; ``mutable`` and ``capture_intermediates`` are apply's only."""
  kwargs = {k: v for k, v in kwargs.items() if k not in ("mutable", "capture_intermediates")}
  rngs = kwargs.pop("rngs", None)
  key = jax.random.key(0)
  rngs = {"params": key, **rngs} if isinstance(rngs, Mapping) else key if rngs is None else rngs
  variables = jax.eval_shape(lambda *x: model.init(rngs, *x, **kwargs), *inputs)
  return meta.unbox({k: v for k, v in variables.items() if k in LINEN_COLLECTIONS})


def nnx_apply(graphdef: Any, kwargs: Mapping[str, Any]) -> Callable[..., Any]:
  """An NNX model's call as a pure function of its state, with `kwargs`. Graph nodes among them
  (`nnx.Rngs`) are cloned afresh in every call: a call that draws random numbers mutates its own copy, at
  its own trace level, and every program (analysis, wide, narrow) draws the same ones."""
  nodes = {k: v for k, v in kwargs.items() if nnx.graph.is_graph_node(v)}
  plain = {k: v for k, v in kwargs.items() if k not in nodes}

  def apply(state, *inputs):
    fresh = {k: nnx.clone(v) for k, v in nodes.items()}
    return nnx.merge(graphdef, state)(*inputs, **plain, **fresh)
  return apply


def check_call(model: Any, inputs: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
  """InputError when ``model.__call__`` cannot take `inputs` and `kwargs` (Linen apply's own keywords
  aside): an argument the model needs (a PRNG key, ``rngs``) belongs in ``apply_kwargs``."""
  if "method" in kwargs:
    return
  call = {k: v for k, v in kwargs.items()
          if isinstance(model, nnx.Module) or k not in ("rngs", "mutable", "capture_intermediates")}
  try:
    signature = inspect.signature(type(model).__call__)
  except (TypeError, ValueError):
    return
  try:
    signature.bind(model, *inputs, **call)
  except TypeError as e:
    raise InputError(f"{type(model).__name__}.__call__ cannot be called with {len(inputs)} input(s) and the "
                     f"keywords {sorted(kwargs)}: {e}; pass its other arguments in apply_kwargs=") from e


def check_linen_variables(model: nn.Module, variables: Any, expected: Mapping[str, Any]) -> dict[str, Any]:
  """`variables` (params, batch_stats) checked leaf by leaf against `expected`; ValueError names the first
  missing, extra or misshapen leaf."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise InputError(f"Linen variables must be a dict with 'params', got {type(variables).__name__}")
  given = traverse_util.flatten_dict({k: v for k, v in dict(variables).items() if k in LINEN_COLLECTIONS})
  want = traverse_util.flatten_dict(dict(expected))
  name = type(model).__name__
  for key, spec in want.items():
    if key not in given:
      raise InputError(f"the variables lack {'/'.join(key)}, which {name} has")
    if tuple(np.shape(given[key])) != tuple(spec.shape):
      raise InputError(f"{'/'.join(key)} has shape {tuple(np.shape(given[key]))}, {name} expects {spec.shape}")
  extra = sorted("/".join(k) for k in given if k not in want)
  if extra:
    raise InputError(f"the variables have leaves that {name} does not: {extra[:5]}")
  return traverse_util.unflatten_dict(given)


def _is_box(x: Any) -> bool:
  return isinstance(x, meta.AxisMetadata)


def has_boxes(tree: Any) -> bool:
  """Whether flax boxes (`nn.LogicallyPartitioned`, `nn.Partitioned`: `flax.core.meta.AxisMetadata`) hold
  any leaf of `tree`, as in the variables of a model whose initialisers are `nn.with_logical_partitioning`."""
  return any(_is_box(x) for x in jax.tree.leaves(tree, is_leaf=_is_box))


def reboxed(like: Any, values: Mapping[str, Any]) -> Any:
  """`values` (Linen variables, plain arrays) with each leaf put back in the box that held it in `like`
  (the variables as given): the same box type and metadata (axis names, mesh, rules), the new value. Why:
  a caller who passes boxed variables gets boxed ones back, ready for its sharding code."""
  if like is None:
    return values
  boxes = traverse_util.flatten_dict({k: v for k, v in dict(like).items() if k in values})
  flat = traverse_util.flatten_dict(dict(values))
  return traverse_util.unflatten_dict({k: boxes[k].replace_boxed(v) if _is_box(boxes.get(k)) else v
                                       for k, v in flat.items()})


def _norm_importances(variables: Any, prefix: tuple[str, ...]) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
  """{norm path: (its scale leaf name, importance)}; empty when the model has no norm. Abstract variables
  (shapes only) score zero. The scales are read on the host: eager jax would compile per layer shape."""
  def host(path, x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return np.zeros(x.shape, x.dtype)
    return np.asarray(x) if path_names(path)[-1:] in (("scale_logit",), ("scale",)) else x
  variables = jax.tree_util.tree_map_with_path(host, variables)
  try:
    found = neuron_importances(variables)
  except ValueError:
    return {}
  names = set(leaf_names(variables))
  out = {}
  for path, values in found.items():
    module = tuple(path.split("/")) if path else ()
    for leaf_name in ("scale_logit", "scale"):
      leaf = (*prefix, *module, leaf_name)
      if leaf in names:
        out[path] = (leaf, np.asarray(values))
        break
  return out


def trace(model: Any, variables: Any = None, inputs: Any = None, apply_kwargs: Mapping[str, Any] | None = None,
          rules: Mapping[str, Rule] | None = None) -> Traced:
  """Analyses `model` (Linen with `variables`, or NNX) on `inputs`; see the module docstring. `rules`:
  coupling rules for this call only ({primitive name: rule}, added to or replacing the built-in ones)."""
  specs = input_specs(model, inputs)
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise InputError("an NNX model holds its variables: call with the model alone (variables=None)")
    clone = nnx.clone(model)
    clone.eval()
    graphdef, state = nnx.split(clone)
    kwargs = eval_kwargs(model, apply_kwargs)
    check_call(model, specs, kwargs)
    apply = nnx_apply(graphdef, kwargs)
    coupling = analyze(apply, state, *specs, rules=rules)
    groups = score_groups(coupling, _norm_importances(state, ()))
    return Traced(model, "nnx", apply, state, specs, coupling, groups, {}, kwargs)
  if not isinstance(model, nn.Module):
    raise TypeError(f"prune a flax.linen.Module or a flax.nnx.Module, got {type(model).__name__}")
  kwargs = eval_kwargs(model, apply_kwargs)
  check_call(model, specs, kwargs)
  expected = abstract_linen_variables(model, specs, kwargs)
  boxed = variables if has_boxes(variables) else None
  variables = expected if variables is None else check_linen_variables(model, meta.unbox(variables), expected)
  layers: dict[tuple[str, ...], nn.Module] = {}
  apply = linen_apply(model, kwargs)
  with nn.intercept_methods(record_linen_layers(layers)):
    coupling = analyze(apply, variables, *specs, rules=rules)
  groups = score_groups(coupling, _norm_importances(variables, ("params",)))
  return Traced(model, "linen", apply, variables, specs, coupling, groups, layers, kwargs, boxed)


def rescored(traced: Traced, importances: Mapping[str, Any]) -> Traced:
  """`traced` with its groups scored by `importances` ({norm path, as `neuron_importances` names it:
  float [channels]}) in place of the norms' own, for the norms named; +inf keeps a channel. InputError
  for a path that is no norm of the model or a wrong width."""
  prefix = ("params",) if traced.kind == "linen" else ()
  own = _norm_importances(traced.variables, prefix)
  unknown = sorted(set(importances) - set(own))
  if unknown:
    raise InputError(f"importances name norms the model does not have: {unknown[:5]}; its norms are {sorted(own)[:20]}")
  scores = dict(own)
  for path, values in importances.items():
    values = np.asarray(values, np.float64)
    if values.shape != own[path][1].shape:
      raise InputError(f"importances for {path!r} have shape {values.shape}, the norm has {own[path][1].shape}")
    scores[path] = (own[path][0], values)
  return dataclasses.replace(traced, groups=score_groups(traced.coupling, scores))

