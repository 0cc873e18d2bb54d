"""Pruning any Flax model: masks from a criterion, then a narrower model and its variables, checked.

Linen: ``narrow_model, narrow_variables = prune_params(model, variables, ratio=0.5)``. NNX:
``narrow_model, narrow_state = prune_params(model, ratio=0.5)`` (a new module; the original untouched).
Models without an ``input_shape`` attribute need ``inputs=`` (an example batch or its
`jax.ShapeDtypeStruct`). Every result is checked before it is returned: the narrow model's outputs on a
random input must equal the wide model's with the removed channels' parameters zeroed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from receding_jax.compile_clock import timed
from receding_jax.errors import InputError
from receding_jax.pruning import criteria, rebuild, slicing
from receding_jax.pruning.checking import host_arrays, verify
from receding_jax.pruning.criteria import Masks
from receding_jax.pruning.models import Traced, abstract_linen_variables, eval_kwargs, input_specs, reboxed, trace
from receding_jax.pruning.optimizer_state import slice_params_like
from receding_jax.pruning.rules import Rule

PyTree = Any
Rules = Mapping[str, Rule]


def count_params(variables: PyTree) -> int:
  """Number of trainable parameters (the ``params`` collection, or a params pytree / nnx.State itself)."""
  if isinstance(variables, nnx.Module):
    variables = nnx.state(variables, nnx.Param)
  params = variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def count_macs(model: Any, inputs: Any = None, *, variables: PyTree = None, masks: Mapping[str, Any] | None = None,
               apply_kwargs: Mapping[str, Any] | None = None, rules: Rules | None = None) -> int:
  """Multiply-accumulates of the convolutions and dot products for `inputs` (default: one input of the
  model's ``input_shape``), counted from the traced computation (norms and activations are not counted).
  With `masks` (and the Linen `variables` they were chosen on): the MACs of the model pruned by them."""
  traced = trace(model, variables, inputs, apply_kwargs, rules)
  keep = check_masks(traced, masks, allow_approximate=True) if masks is not None else {}
  return criteria.mac_model(traced.coupling)(keep)


def count_flops(*args: Any, **kwargs: Any) -> int:
  """Deprecated name of `count_macs` (it counts multiply-accumulates, not FLOPs)."""
  warnings.warn("count_flops is deprecated: it counts multiply-accumulates; use count_macs", DeprecationWarning,
                stacklevel=2)
  return count_macs(*args, **kwargs)


def _renamed_reduction(mac_reduction: float | None, flop_reduction: float | None) -> float | None:
  """`mac_reduction`, or the value given by its deprecated spelling `flop_reduction` (with a warning)."""
  if flop_reduction is None:
    return mac_reduction
  warnings.warn("flop_reduction= is deprecated: it is a share of multiply-accumulates; use mac_reduction=",
                DeprecationWarning, stacklevel=3)
  if mac_reduction is not None:
    raise InputError("give mac_reduction or its deprecated spelling flop_reduction, not both")
  return flop_reduction


def _selected(model: Any, variables: PyTree, inputs: Any, prune_streams: bool, allow_approximate: bool,
              apply_kwargs: Mapping[str, Any] | None, rules: Rules | None) -> list[criteria.ScoredGroup]:
  groups = trace(model, variables, inputs, apply_kwargs, rules).groups
  return criteria.selected(groups, prune_streams, allow_approximate)


def group_importances(model: Any, variables: PyTree = None, *, inputs: Any = None, prune_streams: bool = False,
                      allow_approximate: bool = False, apply_kwargs: Mapping[str, Any] | None = None,
                      rules: Rules | None = None) -> dict[str, np.ndarray]:
  """{group name: importance [channels]} of the groups a criterion prunes (+inf: a channel that stays)."""
  return {g.name: g.importance for g in _selected(model, variables, inputs, prune_streams, allow_approximate,
                                                  apply_kwargs, rules)}


def group_widths(model: Any, variables: PyTree = None, *, inputs: Any = None, prune_streams: bool = False,
                 allow_approximate: bool = False, apply_kwargs: Mapping[str, Any] | None = None,
                 rules: Rules | None = None) -> dict[str, int]:
  """{group name: channels} of the groups a criterion prunes (a narrow model has the same names)."""
  return {g.name: g.size for g in _selected(model, variables, inputs, prune_streams, allow_approximate,
                                            apply_kwargs, rules)}


def channel_masks(
    model: Any,
    variables: PyTree = None,
    ratio: float | None = None,
    *,
    inputs: Any = None,
    scope: str = "global",
    min_channels: int = 3,
    mac_reduction: float | None = None,
    threshold: float | None = None,
    channel_multiple: int = 1,
    prune_streams: bool = False,
    allow_approximate: bool = False,
    apply_kwargs: Mapping[str, Any] | None = None,
    rules: Rules | None = None,
    flop_reduction: float | None = None,
    keep_groups: Sequence[str] = (),
) -> Masks:
  """Which channels to keep in every group a criterion prunes (docs/method.md section 6); exactly one criterion.

  Args:
    model: any Flax Linen module (with its `variables`) or NNX module (variables=None).
    ratio: share of channels to prune, in [0, 1): the floor(ratio * (n - 1)) + 1 least important of the n
      removable channels of all pruned groups ('global') or of each group ('local'), what "keep iff above
      the ratio-quantile" removes from distinct importances; channels tied at the cut are split in a fixed
      order (group, then channel index), so ties never prune more or less than asked.
    inputs: an example input (or ShapeDtypeStruct, or a tuple of them); default from ``input_shape``.
    scope: 'global' (RNI, L1, polarization) or 'local' (UCS).
    min_channels: every group keeps at least this many channels (its most important ones).
    mac_reduction: instead of `ratio`, the share of multiply-accumulates to remove, in [0, 1).
    threshold: instead of `ratio`, keep a channel iff its importance is above this value (a channel at
      the threshold goes: ``threshold=0`` prunes exactly the channels whose importance receded to 0).
    channel_multiple: round every group's kept count up to a multiple of this, capped at its width.
    prune_streams: also prune residual streams (groups on which two independent data paths are added,
      `streams`); off by default, as in the paper, which prunes a ResNet's block-inner channels only.
    allow_approximate: also prune groups a reduction runs over (LayerNorm over channels): the result
      then differs from the original even for channels of importance zero, and is not checked.
    apply_kwargs: keywords of every call of the model, after the eval-mode flags (Linen: of
      ``model.apply``, e.g. a PRNG key argument or ``rngs={'dropout': key}``; NNX: of the module's call,
      e.g. ``rngs=nnx.Rngs(0)``); give every function of a pruning the same ones (`models` explains).
    rules: coupling rules for this call only, {primitive name: rule} (`rules.register_rule` explains
      rules); they add to or replace the built-in ones, which stay as they are for every other call.
    flop_reduction: deprecated spelling of `mac_reduction`.
    keep_groups: names of groups a criterion leaves whole, as if they had no norm (the paper prunes a
      ResNet-50's block-inner channels only, not its stem, which no residual joins).

  Returns:
    {group name (its first norm's path): bool [channels], True = keep}. InputError when no group the
    criterion may prune is scored by a norm (a criterion would change nothing): pass `masks` instead.
  """
  mac_reduction = _renamed_reduction(mac_reduction, flop_reduction)
  traced = trace(model, variables, inputs, apply_kwargs, rules)
  return _choose(traced, ratio, mac_reduction, threshold, scope, min_channels, channel_multiple,
                 prune_streams, allow_approximate, keep_groups)


def _choose(traced: Traced, ratio, mac_reduction, threshold, scope, min_channels, channel_multiple,
            prune_streams, allow_approximate, keep_groups=()) -> Masks:
  groups = criteria.selected(traced.groups, prune_streams, allow_approximate, keep_groups)
  if not groups:
    raise InputError(criteria.nothing_to_score(traced.groups, prune_streams, allow_approximate))
  return criteria.choose(traced.coupling, groups, ratio=ratio, mac_reduction=mac_reduction,
                         threshold=threshold, scope=scope, min_channels=min_channels,
                         channel_multiple=channel_multiple)


def check_masks(traced: Traced, masks: Mapping[str, Any], allow_approximate: bool = False) -> dict[int, np.ndarray]:
  """Masks as {group index: bool [size]} for the groups that lose a channel; ValueError on any mask that
  names no group, has the wrong shape or dtype, keeps nothing, or removes a channel that cannot go."""
  by_name = {g.name: g for g in traced.groups}
  unknown = sorted(set(masks) - set(by_name))
  if unknown:
    names = [g.name for g in traced.groups if g.group.status != "unprunable"]
    raise InputError(f"masks name groups the model does not have: {unknown[:5]}; its groups are {names[:20]}")
  keep = {}
  for name, mask in masks.items():
    g = by_name[name]
    mask = np.asarray(mask)
    if mask.dtype != bool:
      raise InputError(f"mask for {name!r} must be boolean, got dtype {mask.dtype}")
    if mask.shape != (g.size,):
      raise InputError(f"mask for {name!r} has shape {mask.shape}, the group has {g.size} channels")
    if not mask.any():
      raise InputError(f"mask for {name!r} keeps zero channels")
    if mask.all():
      continue
    removed_fixed = np.flatnonzero(~mask & g.group.fixed)
    if removed_fixed.size:
      raise InputError(f"mask for {name!r} removes channel {int(removed_fixed[0])}, which cannot be removed: "
                       f"{'; '.join(g.group.reasons)}")
    if g.group.status == "approximate" and not allow_approximate:
      raise InputError(f"group {name!r} is approximate ({'; '.join(g.group.reasons)}): removing its channels "
                       "changes the outputs even where they are zero; pass allow_approximate=True to do it anyway")
    keep[g.group.index] = mask
  return keep


def prune_params(
    model: Any,
    variables: PyTree = None,
    ratio: float | None = None,
    *,
    masks: Mapping[str, Any] | None = None,
    inputs: Any = None,
    scope: str = "global",
    min_channels: int = 3,
    mac_reduction: float | None = None,
    threshold: float | None = None,
    channel_multiple: int = 1,
    prune_streams: bool = False,
    allow_approximate: bool = False,
    check: bool = True,
    apply_kwargs: Mapping[str, Any] | None = None,
    seconds: dict[str, float] | None = None,
    rules: Rules | None = None,
    flop_reduction: float | None = None,
    keep_groups: Sequence[str] = (),
) -> tuple[Any, Any]:
  """Physically removes channels: returns the narrower model and its variables.

  Give `masks` ({group name: bool [channels]}, from `channel_masks` or your own; groups left out keep
  every channel) or one criterion of `channel_masks`. Linen: returns (narrow module, narrow variables),
  numpy in numpy out, flax partitioning boxes (`nn.with_logical_partitioning`) in, the same boxes out; NNX:
  (a new narrow module, its `nnx.state`). Everything is checked before slicing,
  and with `check` the result is verified (see `verify`); nothing is mutated. A removed BatchNorm
  channel's bias (beta) goes with it, as in Network Slimming; bounded norms have no bias by default, so
  their pruning is exact when the removed importances are 0. `seconds`, if given, receives the wall time
  of each stage: 'analysis' (trace, coupling, criterion), 'slicing' (narrow model and variables), 'check'.
  `rules`: coupling rules for this call only (see `channel_masks`); `flop_reduction`: deprecated spelling
  of `mac_reduction`; `keep_groups`: see `channel_masks`.
  """
  seconds = {} if seconds is None else seconds
  mac_reduction = _renamed_reduction(mac_reduction, flop_reduction)
  with timed(seconds, "analysis"):
    traced = trace(model, variables, inputs, apply_kwargs, rules)
    if masks is None:
      masks = _choose(traced, ratio, mac_reduction, threshold, scope, min_channels, channel_multiple,
                      prune_streams, allow_approximate, keep_groups)
    elif any(c is not None for c in (ratio, mac_reduction, threshold)):
      raise InputError("give either masks or a pruning criterion (ratio, mac_reduction, threshold), not both")
    keep = check_masks(traced, masks, allow_approximate)
  with timed(seconds, "slicing"):
    host = host_arrays(traced.variables)
    narrow_model, narrow_variables = _narrow(traced, keep, host)
  with timed(seconds, "check"):
    approximate = any(traced.coupling.groups[i].status == "approximate" for i in keep)
    if approximate:
      warnings.warn("pruned approximate groups: the narrow model differs from the original", stacklevel=2)
    elif check and keep:
      verify(traced, keep, narrow_model, narrow_variables, host)
  return narrow_model, narrow_variables


def _like(original: PyTree, sliced: PyTree) -> PyTree:
  """`sliced` (numpy) with jax arrays where `original` had them; leaves that kept their shape are the
  original ones (nothing was removed from them)."""
  def leaf(old, new):
    if np.shape(old) == np.shape(new):
      return old
    return jax.device_put(new) if isinstance(old, jax.Array) else new
  return jax.tree.map(leaf, original, sliced)


def _narrow(traced: Traced, keep: Mapping[int, np.ndarray], host: PyTree) -> tuple[Any, Any]:
  if traced.kind == "nnx":
    state = nnx.state(traced.model)
    narrow_state = _like(state, slicing.slice_tree(host_arrays(state), traced.coupling, keep))
    narrow_model = rebuild.narrow_nnx(traced.model, narrow_state)
    return narrow_model, nnx.state(narrow_model)
  narrow_variables = _like(traced.variables, slicing.slice_tree(host, traced.coupling, keep))
  overrides = rebuild.linen_overrides(traced.linen_layers, narrow_variables["params"])
  earlier = getattr(traced.model, "pruned_overrides", {})  # A narrowed model pruned again keeps its narrowing.
  overrides = {p: {**earlier.get(p, {}), **overrides.get(p, {})} for p in {*earlier, *overrides}}
  return rebuild.narrow_linen(traced.model, overrides), reboxed(traced.boxed, narrow_variables)


def prune_params_like(tree: PyTree, model: Any, params: PyTree, masks: Mapping[str, Any], *,
                      variables: PyTree = None, inputs: Any = None, apply_kwargs: Mapping[str, Any] | None = None,
                      rules: Rules | None = None) -> PyTree:
  """Slices every subtree of `tree` (an optimizer state) that mirrors `params`, the parameters before
  pruning, as `prune_params(..., masks=masks)` slices them: fine-tuning keeps the kept channels' momentum.

  Linen: `params` is ``variables['params']`` (pass the whole `variables` too when the model has batch
  statistics, or they are taken from an abstract init); NNX: `model` is the module and `params`
  ``nnx.state(model, nnx.Param)``. Reaches into `optax.chain`, `multi_transform` and `masked` states;
  ValueError names any leaf it cannot slice (see `optimizer_state`). `apply_kwargs`, `rules`: as given to
  `prune_params`.
  """
  if isinstance(model, nnx.Module):
    traced, prefix = trace(model, None, inputs, apply_kwargs, rules), ()
  else:
    if variables is None:
      shapes = abstract_linen_variables(model, input_specs(model, inputs), eval_kwargs(model, apply_kwargs))
      variables = {**shapes, "params": params}
    traced, prefix = trace(model, variables, inputs, apply_kwargs, rules), ("params",)
  keep = check_masks(traced, masks, allow_approximate=True)
  return slice_params_like(tree, params, lambda flat: slicing.slice_named(flat, traced.coupling, keep, prefix))
