"""Functional structured pruning: importances -> channel masks -> a narrower model and its variables.

Every architecture is described as a list of prunable *channel groups*. A group is scored by one norm
layer and names every leaf that loses entries when one of its channels goes: the producer's output
channels, the norm's own leaves (``params`` and ``batch_stats``), and each consumer's input channels
(the classifier included). Nothing here mutates its inputs; the narrow model is the same class
rebuilt with narrower widths. Register another architecture with ``describe.register(MyModel)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from receding_jax.importances import neuron_importances
from receding_jax.models import CifarResNet, CifarVGG, ImageNetVGG, ResNet
from receding_jax.pruning.optimizer_state import slice_params_like

PyTree = Any
Masks = dict[str, np.ndarray]
SCOPES = ("global", "local")


@dataclasses.dataclass(frozen=True)
class Cut:
  """Leaves of one collection that a group's channels index.

  Attributes:
    collection: 'params' or 'batch_stats'.
    path: a leaf path, or a module path meaning every leaf below it ('norm3' -> scale_logit, ...).
    axis: the axis of those leaves that runs over the group's channels.
    flattened: the axis is a flatten of [positions, channels] (channels fastest), as when a feature
      map is flattened into a dense layer; the number of positions is read off the leaf.
  """

  collection: str
  path: tuple[str, ...]
  axis: int
  flattened: bool = False


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
  """Channels pruned together, scored by the norm at `norm`; `name` is that norm's path string."""

  norm: tuple[str, ...]
  cuts: tuple[Cut, ...]

  @property
  def name(self) -> str:
    return "/".join(self.norm)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The prunable groups of a model, in the order of its width attribute, and how to rebuild it."""

  groups: tuple[ChannelGroup, ...]
  widths: tuple[int, ...]
  width_attribute: str
  rebuild: Callable[[tuple[int, ...]], nn.Module]


def _norm_cuts(norm: tuple[str, ...]) -> tuple[Cut, ...]:
  return (Cut("params", norm, 0), Cut("batch_stats", norm, 0))


def _producer_consumer_group(producer: tuple[str, ...], norm: tuple[str, ...], *consumers: Cut) -> ChannelGroup:
  """conv producer -> norm -> consumers: the conv's output channels (kernel axis 3, bias) and the norm."""
  cuts = (Cut("params", (*producer, "kernel"), 3), Cut("params", (*producer, "bias"), 0))
  return ChannelGroup(norm, cuts + _norm_cuts(norm) + consumers)


@functools.singledispatch
def describe(model: nn.Module) -> Architecture:
  """The prunable channel groups of `model`; raises TypeError for an unregistered architecture."""
  raise TypeError(
      f"no pruning description for {type(model).__name__}; register one with "
      "receding_jax.pruning.describe.register"
  )


def _describe_vgg(model: CifarVGG | ImageNetVGG, first_dense: str) -> Architecture:
  widths = tuple(model.widths)
  groups = []
  for i in range(len(widths)):
    if i + 1 < len(widths):
      consumer = Cut("params", (f"conv{i + 1}", "kernel"), 2)
    else:
      consumer = Cut("params", (first_dense, "kernel"), 0, flattened=True)
    groups.append(_producer_consumer_group((f"conv{i}",), (f"norm{i}",), consumer))
  return Architecture(tuple(groups), widths, "widths", lambda w: model.clone(widths=tuple(w)))


@describe.register
def _(model: CifarVGG) -> Architecture:
  return _describe_vgg(model, "classifier")


@describe.register
def _(model: ImageNetVGG) -> Architecture:
  return _describe_vgg(model, "fc0")


@describe.register
def _(model: CifarResNet) -> Architecture:
  groups = []
  for s in range(len(model.stage_widths)):
    for b in range(model.blocks_per_stage):
      block = f"stage{s}_block{b}"
      groups.append(
          _producer_consumer_group((block, "conv1"), (block, "norm1"), Cut("params", (block, "conv2", "kernel"), 2))
      )
  return Architecture(tuple(groups), model.widths, "inner_widths", lambda w: model.clone(inner_widths=tuple(w)))


@describe.register
def _(model: ResNet) -> Architecture:
  groups = []
  for s, size in enumerate(model.stage_sizes):
    for b in range(size):
      block = f"stage{s}_block{b}"
      for k in (1, 2):
        consumer = Cut("params", (block, f"conv{k + 1}", "kernel"), 2)
        groups.append(_producer_consumer_group((block, f"conv{k}"), (block, f"norm{k}"), consumer))
  return Architecture(tuple(groups), model.widths, "inner_widths", lambda w: model.clone(inner_widths=tuple(w)))


# ---------------------------------------------------------------------------------------------------
# Counting parameters and FLOPs.


def count_params(variables: PyTree) -> int:
  """Number of trainable parameters (the ``params`` collection, or a params pytree itself)."""
  params = variables["params"] if isinstance(variables, Mapping) and "params" in variables else variables
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def _abstract_init(model: nn.Module, input_shape: Sequence[int]) -> PyTree:
  x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def layer_macs(model: nn.Module, input_shape: Sequence[int] | None = None) -> dict[tuple[str, ...], int]:
  """Multiply-accumulates of every conv and dense layer for one input, keyed by the kernel's path.

  Read off the model itself (an abstract trace of `model.init`), so it follows any widths.
  MACs of a layer = output positions x kernel size (kernel size already includes in/groups x out).
  """
  input_shape = tuple(input_shape or model.input_shape)
  macs: dict[tuple[str, ...], int] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, (nn.Conv, nn.Dense)) and context.method_name == "__call__":
      kernel = module.get_variable("params", "kernel")
      positions = int(np.prod(out.shape[1:-1])) if out.ndim > 2 else 1
      macs[(*module.path, "kernel")] = positions * int(np.size(kernel))
    return out

  with nn.intercept_methods(record):
    _abstract_init(model, input_shape)
  return macs


def count_flops(model: nn.Module, input_shape: Sequence[int] | None = None) -> int:
  """Multiply-accumulates of the conv and dense layers for one input of `input_shape` (default: the
  model's ``input_shape``). Norms, activations and pooling are not counted (they are <1% here)."""
  return int(sum(layer_macs(model, input_shape).values()))


# ---------------------------------------------------------------------------------------------------
# Choosing channels.


def _check_ratio(name: str, value: float) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value < 1.0:
    raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def group_importances(model: nn.Module, variables: PyTree) -> dict[str, np.ndarray]:
  """Importance of every prunable channel, per group: sigmoid(logit) or |gamma| of the scoring norm."""
  arch = describe(model)
  all_importances = neuron_importances(variables)
  out = {}
  for group, width in zip(arch.groups, arch.widths, strict=True):
    if group.name not in all_importances:
      raise ValueError(f"the variables have no norm at {group.name!r}; they do not belong to {type(model).__name__}")
    values = np.asarray(all_importances[group.name], np.float64)
    if values.shape != (width,):
      raise ValueError(f"norm {group.name!r} has {values.shape[0]} channels, the model expects {width}")
    out[group.name] = values
  return out


@dataclasses.dataclass(frozen=True)
class KeepRule:
  """How many channels a group keeps at least: `min_channels`, and a multiple of `multiple` (both capped
  at the group's width), the extra ones being the most important channels not kept yet."""

  min_channels: int = 3
  multiple: int = 1

  def apply(self, importance: np.ndarray, keep: np.ndarray) -> np.ndarray:
    size = importance.size
    need = min(max(self.min_channels, -(-int(keep.sum()) // self.multiple) * self.multiple), size)
    if keep.sum() >= need:
      return keep
    order = np.argsort(-importance, kind="stable")
    extra = order[~keep[order]][: need - int(keep.sum())]
    keep = keep.copy()
    keep[extra] = True
    return keep


def _threshold_masks(
    importances: Mapping[str, np.ndarray], thresholds: Mapping[str, float], rule: KeepRule
) -> Masks:
  return {name: rule.apply(imp, imp > thresholds[name]) for name, imp in importances.items()}


def _ratio_masks(importances: Mapping[str, np.ndarray], ratio: float, scope: str, rule: KeepRule) -> Masks:
  """Keep a channel iff its importance exceeds the `ratio`-quantile (all groups, or its own group)."""
  if ratio == 0.0:
    return {name: np.ones(imp.shape, bool) for name, imp in importances.items()}
  if scope == "global":
    threshold = float(np.quantile(np.concatenate(list(importances.values())), ratio))
    thresholds = dict.fromkeys(importances, threshold)
  else:
    thresholds = {name: float(np.quantile(imp, ratio)) for name, imp in importances.items()}
  return _threshold_masks(importances, thresholds, rule)


def flop_model(model: nn.Module) -> Callable[[Masks], int]:
  """A fast exact FLOP count of the pruned model for any masks: every layer's MACs are bilinear in its
  input and output channel counts, so they scale by the kept fractions along the cut kernel axes."""
  arch = describe(model)
  base = layer_macs(model)
  axes: dict[tuple[str, ...], list[tuple[str, int]]] = {}
  for group, width in zip(arch.groups, arch.widths, strict=True):
    for cut in group.cuts:
      if cut.collection == "params" and cut.path in base:
        axes.setdefault(cut.path, []).append((group.name, width))

  def flops(masks: Masks) -> int:
    total = 0.0
    for path, macs in base.items():
      factor = 1.0
      for name, width in axes.get(path, ()):
        factor *= int(np.sum(masks[name])) / width
      total += macs * factor
    return round(total)

  return flops


def _flop_target_masks(
    model: nn.Module, importances: Mapping[str, np.ndarray], reduction: float, scope: str, rule: KeepRule
) -> Masks:
  """The smallest pruning ratio (bisection to 1e-4) whose masks cut FLOPs by at least `reduction`."""
  flops = flop_model(model)
  full = flops({name: np.ones(imp.shape, bool) for name, imp in importances.items()})
  target = (1.0 - reduction) * full
  low, high = 0.0, 1.0 - 1e-9
  best = _ratio_masks(importances, high, scope, rule)
  if flops(best) > target:
    raise ValueError(
        f"a FLOP reduction of {reduction:g} is impossible with min_channels={rule.min_channels} and "
        f"channel_multiple={rule.multiple}: at most "
        f"{1 - flops(best) / full:.3f}"
    )
  while high - low > 1e-4:
    mid = 0.5 * (low + high)
    masks = _ratio_masks(importances, mid, scope, rule)
    if flops(masks) <= target:
      high, best = mid, masks
    else:
      low = mid
  return best


def channel_masks(
    model: nn.Module,
    variables: PyTree,
    ratio: float | None = None,
    *,
    scope: str = "global",
    min_channels: int = 3,
    flop_reduction: float | None = None,
    threshold: float | None = None,
    channel_multiple: int = 1,
) -> Masks:
  """Which channels to keep in every prunable group (METHOD.md section 6); exactly one criterion.

  Args:
    model: a zoo model (or any architecture registered with `describe`).
    variables: its variables; importances come from the scoring norms (sigmoid(logit) or |gamma|).
    ratio: share of channels to prune, in [0, 1): keep a channel iff its importance is above the
      `ratio`-quantile of all prunable importances ('global') or of its own group's ('local').
      Ratio 0 keeps everything.
    scope: 'global' (RNI, L1, polarization) or 'local' (UCS).
    min_channels: every group keeps at least this many channels (its most important ones).
    flop_reduction: instead of `ratio`, the share of conv/dense MACs to remove, in [0, 1); the
      smallest ratio (in the given scope) that reaches it is used.
    threshold: instead of `ratio`, keep a channel iff its importance is above this value (with
      bounded importances "prune everything below 0.01" means the same in every model).
    channel_multiple: round every group's kept count up to a multiple of this (its next most important
      channels), capped at its width: irregular widths run slower per FLOP on CPUs and tensor cores.

  Returns:
    {group name (the scoring norm's path): bool array [channels], True = keep}.
  """
  if sum(c is not None for c in (ratio, flop_reduction, threshold)) != 1:
    raise ValueError(
        "give exactly one of ratio, flop_reduction, threshold; got "
        f"ratio={ratio!r}, flop_reduction={flop_reduction!r}, threshold={threshold!r}"
    )
  if scope not in SCOPES:
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
  for name, value in (("min_channels", min_channels), ("channel_multiple", channel_multiple)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  rule = KeepRule(min_channels, channel_multiple)
  importances = group_importances(model, variables)
  if ratio is not None:
    _check_ratio("ratio", ratio)
    return _ratio_masks(importances, float(ratio), scope, rule)
  if flop_reduction is not None:
    _check_ratio("flop_reduction", flop_reduction)
    return _flop_target_masks(model, importances, float(flop_reduction), scope, rule)
  if not np.isfinite(threshold):
    raise ValueError(f"threshold must be a finite number, got {threshold!r}")
  return _threshold_masks(importances, dict.fromkeys(importances, float(threshold)), rule)


# ---------------------------------------------------------------------------------------------------
# Slicing variables.


def _check_masks(arch: Architecture, masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Masks as bool arrays for every group (missing groups keep all); ValueError on any bad mask."""
  names = [g.name for g in arch.groups]
  unknown = sorted(set(masks) - set(names))
  if unknown:
    raise ValueError(f"masks name groups the model does not have: {unknown}; its groups are {names}")
  out = {}
  for name, width in zip(names, arch.widths, strict=True):
    mask = np.asarray(masks.get(name, np.ones(width, bool)))
    if mask.dtype != bool:
      raise ValueError(f"mask for {name!r} must be boolean, got dtype {mask.dtype}")
    if mask.shape != (width,):
      raise ValueError(f"mask for {name!r} has shape {mask.shape}, the group has {width} channels")
    if not mask.any():
      raise ValueError(f"mask for {name!r} keeps zero channels")
    out[name] = mask
  return out


def _check_variables(
    model: nn.Module, variables: PyTree, collections: Sequence[str] = ("params", "batch_stats")
) -> None:
  """ValueError naming the first leaf of `collections` whose presence or shape differs from `model`'s."""
  expected = traverse_util.flatten_dict(_abstract_init(model, model.input_shape))
  expected = {k: v for k, v in expected.items() if k[0] in collections}
  given = traverse_util.flatten_dict(dict(variables))
  for key, spec in expected.items():
    if key not in given:
      raise ValueError(f"the variables lack {'/'.join(key)}, which {type(model).__name__} has")
    if tuple(np.shape(given[key])) != tuple(spec.shape):
      raise ValueError(
          f"{'/'.join(key)} has shape {tuple(np.shape(given[key]))}, {type(model).__name__} expects {spec.shape}"
      )
  extra = sorted("/".join(k) for k in given if k[0] in collections and k not in expected)
  if extra:
    raise ValueError(f"the variables have leaves that {type(model).__name__} does not: {extra[:5]}")


def _take(leaf: Any, index: np.ndarray, axis: int, flattened: bool, width: int) -> Any:
  """Keeps `index` of `width` channels along `axis` (a [positions, channels] flatten if `flattened`)."""
  xp = np if isinstance(leaf, np.ndarray) else jnp
  if flattened:
    positions = leaf.shape[axis] // width
    index = (np.arange(positions)[:, None] * width + index[None, :]).ravel()
  return xp.take(leaf, index, axis=axis)


def _slice_flat(flat: dict[tuple[str, ...], Any], arch: Architecture, masks: Masks) -> dict:
  """Applies every group's cuts to a flattened {(collection, *path): leaf} dict, returning a new dict."""
  flat = dict(flat)
  for group, width in zip(arch.groups, arch.widths, strict=True):
    index = np.flatnonzero(masks[group.name])
    if index.size == width:
      continue
    for cut in group.cuts:
      prefix = (cut.collection, *cut.path)
      for key in [k for k in flat if k[: len(prefix)] == prefix]:
        flat[key] = _take(flat[key], index, cut.axis, cut.flattened, width)
  return flat


def prune_params(
    model: nn.Module,
    variables: PyTree,
    ratio: float | None = None,
    *,
    masks: Mapping[str, Any] | None = None,
    scope: str = "global",
    min_channels: int = 3,
    flop_reduction: float | None = None,
    threshold: float | None = None,
    channel_multiple: int = 1,
) -> tuple[nn.Module, dict]:
  """Physically removes channels: returns the narrower model and its variables.

  Give `masks` (from `channel_masks`, or your own {group name: bool [channels]}; groups left out keep
  every channel) or one criterion of `channel_masks` (`ratio`, `flop_reduction` or `threshold`, with
  `scope`, `min_channels` and `channel_multiple`). Works on jax or numpy arrays (numpy in, numpy out);
  nothing is mutated and everything is checked before any slicing. A removed BatchNorm channel's bias
  (beta) goes with it, as in Network Slimming; bounded norms have no bias by default, so their pruning
  is exact when the removed importances are 0.
  """
  arch = describe(model)
  _check_variables(model, variables)
  if masks is None:
    masks = channel_masks(
        model, variables, ratio, scope=scope, min_channels=min_channels,
        flop_reduction=flop_reduction, threshold=threshold, channel_multiple=channel_multiple,
    )
  elif any(c is not None for c in (ratio, flop_reduction, threshold)):
    raise ValueError("give either masks or a pruning criterion (ratio, flop_reduction, threshold), not both")
  masks = _check_masks(arch, masks)
  flat = _slice_flat(traverse_util.flatten_dict(dict(variables)), arch, masks)
  widths = tuple(int(masks[g.name].sum()) for g in arch.groups)
  return arch.rebuild(widths), traverse_util.unflatten_dict(flat)


def prune_params_like(tree: PyTree, model: nn.Module, params: PyTree, masks: Mapping[str, Any]) -> PyTree:
  """Slices every subtree of `tree` (an optimizer state) that mirrors `params`, the parameters before
  pruning, as `prune_params(..., masks=masks)` slices them: fine-tuning keeps the kept channels' momentum.

  Reaches into `optax.chain`, `multi_transform` and `masked` states (MaskedNodes stay); other leaves
  (step counts) are kept. ValueError names any leaf it cannot slice (see `pruning_state`).
  """
  arch = describe(model)
  masks = _check_masks(arch, masks)
  _check_variables(model, {"params": params}, collections=("params",))

  def slice_named(flat: dict[tuple[str, ...], Any]) -> dict[tuple[str, ...], Any]:
    sliced = _slice_flat({("params", *name): leaf for name, leaf in flat.items()}, arch, masks)
    return {key[1:]: leaf for key, leaf in sliced.items()}

  return slice_params_like(tree, params, slice_named)
