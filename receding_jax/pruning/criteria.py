"""Choosing channels: groups scored by their norms, and masks by ratio, threshold or MAC target.

A group is scored by the norms whose scale lies on it: sigmoid(logit) of a bounded norm, |gamma| of a
BatchNorm (`importances`). Where several norms cover one channel (a residual stream: every block's last
norm adds into it; a depthwise conv between two norms) the channel's importance is the **maximum** over
them: it may go only when it is unimportant everywhere. Positions no norm covers, and fixed positions,
are always kept.

By default only groups that are prunable, scored, and not streams are pruned (the paper prunes a
ResNet's block-inner channels only). A stream is a group on which two independent data paths are added
(a residual add; `streams` says precisely which): several readers (a VAE's two heads) or a gate
(squeeze-excite) do not make one. `prune_streams=True` adds streams, `allow_approximate=True` adds groups
that a reduction runs over (LayerNorm over channels).
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from receding_jax.errors import InputError
from receding_jax.pruning.coupling import Coupling, Factor, Group

Masks = dict[str, np.ndarray]
SCOPES = ("global", "local")


@dataclasses.dataclass(frozen=True)
class ScoredGroup:
  """A group with its name and importances.

  Attributes:
    group: the coupling group.
    name: the path of its first norm ('stage1_block0/norm1'), or 'leaf/path:axis' of its first member
      ('leaf/path:axis[i]' where groups would share it: `_distinct_names`).
    norms: (norm path, offset, channels) of every norm on it.
    importance: float64 [size]; +inf where a channel must be kept (fixed or not covered by a norm).
    stream: the group is a stream (`coupling.Group.stream`).
  """

  group: Group
  name: str
  norms: tuple[tuple[str, int, int], ...]
  importance: np.ndarray
  stream: bool

  @property
  def size(self) -> int:
    return self.group.size


def score_groups(coupling: Coupling, importances: Mapping[str, tuple[Any, np.ndarray]]) -> list[ScoredGroup]:
  """Names and scores every group. `importances`: {norm path: (its scale leaf key, importance [C])}."""
  norms: dict[int, list[tuple[str, int, int, np.ndarray]]] = {}
  for path, (leaf, values) in importances.items():
    factors = coupling.layouts.get(leaf, {}).get(0, ())
    if len(factors) == 1 and factors[0].group >= 0:
      f = factors[0]
      norms.setdefault(f.group, []).append((path, f.offset, f.size, np.asarray(values, np.float64)))
  out = []
  for group in coupling.groups:
    found = norms.get(group.index, [])
    best = np.full(group.size, -np.inf)
    covered = np.zeros(group.size, int)
    for _, offset, size, values in found:
      best[offset:offset + size] = np.maximum(best[offset:offset + size], values)
      covered[offset:offset + size] += 1
    importance = np.where((covered > 0) & ~group.fixed, best, np.inf)
    if found:
      name = found[0][0]
    else:
      leaf, axis = group.members[0]
      name = f"{'/'.join(leaf)}:{axis}"
    out.append(ScoredGroup(group, name, tuple((p, o, s) for p, o, s, _ in found), importance, group.stream))
  return _distinct_names(out, coupling)


def _distinct_names(groups: list[ScoredGroup], coupling: Coupling) -> list[ScoredGroup]:
  """The groups with unique names. A name that several groups share (the position and channel groups of
  one flattened dense kernel axis are all named 'leaf:axis') becomes, for each of them, 'leaf:axis[i]',
  i its factor's place in that axis' layout (the same in the narrow model), else 'name#group index'.
  Names that were unique stay: masks and checkpoints keyed by them keep working."""
  def place(g: ScoredGroup) -> str:
    leaf, axis = g.group.members[0]
    factors = coupling.layouts.get(leaf, {}).get(axis, ())
    where = [i for i, f in enumerate(factors) if f.group == g.group.index]
    return f"{g.name}[{where[0]}]" if where else f"{g.name}#{g.group.index}"

  def rename(gs: list[ScoredGroup], new_name: Callable[[ScoredGroup], str]) -> list[ScoredGroup]:
    count = collections.Counter(g.name for g in gs)
    return [dataclasses.replace(g, name=new_name(g)) if count[g.name] > 1 else g for g in gs]

  return rename(rename(groups, place), lambda g: f"{g.name}#{g.group.index}")


def selected(groups: list[ScoredGroup], prune_streams: bool, allow_approximate: bool,
             keep_groups: Collection[str] = ()) -> list[ScoredGroup]:
  """The groups a criterion prunes: scored, with a removable channel, prunable (or approximate if
  allowed), not streams unless `prune_streams`, and not named in `keep_groups` (InputError for a name no
  group has: a typo must not leave a group prunable silently)."""
  unknown = sorted(set(keep_groups) - {g.name for g in groups})
  if unknown:
    raise InputError(f"keep_groups names groups the model does not have: {unknown}; its groups are "
                     f"{[g.name for g in groups][:20]}")
  statuses = ("prunable", "approximate") if allow_approximate else ("prunable",)
  return [g for g in groups if g.norms and np.isfinite(g.importance).any() and g.group.status in statuses
          and (prune_streams or not g.stream) and g.name not in keep_groups]


def nothing_to_score(groups: list[ScoredGroup], prune_streams: bool, allow_approximate: bool) -> str:
  """Why a criterion can prune none of `groups` (`selected` is empty): what the model has, and what to do."""
  removable = [g for g in groups if g.group.status != "unprunable"]
  scored = [g for g in removable if g.norms and np.isfinite(g.importance).any()]
  found = (f"{len(removable)} prunable group(s) ({len(groups)} in all), {len(scored)} scored by a "
           "BoundedScaleNorm, BatchNorm or BoundedGate")
  if not scored:
    return (f"a criterion (ratio, mac_reduction, threshold) needs importances, and this model has none: "
            f"{found}; add one of those layers on the channels to prune, or pass masks= (group names from "
            "rj.pruning.trace(...).groups)")
  streams = sum(g.stream for g in scored) if not prune_streams else 0
  approximate = sum(g.group.status == "approximate" for g in scored) if not allow_approximate else 0
  return (f"a criterion (ratio, mac_reduction, threshold) has no group to prune: {found}, of which "
          f"{streams} stream(s) (prune_streams=True prunes them) and {approximate} approximate "
          "(allow_approximate=True prunes them); or pass masks=")


@dataclasses.dataclass(frozen=True)
class KeepRule:
  """How many channels a group keeps at least: `min_channels`, and a multiple of `multiple` (both capped
  at the group's width), the extra ones being the most important channels not kept yet."""

  min_channels: int = 3
  multiple: int = 1

  def apply(self, importance: np.ndarray, keep: np.ndarray) -> np.ndarray:
    keep = keep | ~np.isfinite(importance)  # Fixed and unscored channels stay.
    size = importance.size
    need = min(max(self.min_channels, -(-int(keep.sum()) // self.multiple) * self.multiple), size)
    if keep.sum() >= need:
      return keep
    order = np.argsort(-importance, kind="stable")
    extra = order[~keep[order]][: need - int(keep.sum())]
    keep = keep.copy()
    keep[extra] = True
    return keep


def threshold_masks(groups: list[ScoredGroup], thresholds: Mapping[str, float], rule: KeepRule) -> Masks:
  """Keep a channel iff its importance is above its group's threshold (one at the threshold goes)."""
  return {g.name: rule.apply(g.importance, g.importance > thresholds[g.name]) for g in groups}


def removal_count(ratio: float, candidates: int) -> int:
  """How many of `candidates` removable channels a `ratio` prune removes: as many as the official rule
  (keep iff importance > the ratio-quantile, linear interpolation) removes from distinct importances,
  floor(ratio * (candidates - 1)) + 1, and none at ratio 0."""
  if ratio <= 0.0 or candidates == 0:
    return 0
  return min(candidates, int(np.floor(ratio * (candidates - 1))) + 1)


def least_important(importances: list[np.ndarray], count: int) -> list[np.ndarray]:
  """Removal masks (one per array) of the `count` least important channels of all `importances` together,
  ties broken by a stable order (the earlier array, then the lower channel index); +inf never goes."""
  flat = np.concatenate(importances)
  removed = np.zeros(flat.size, bool)
  removed[np.argsort(flat, kind="stable")[:count]] = True
  return np.split(removed, np.cumsum([i.size for i in importances])[:-1])


def ratio_masks(groups: list[ScoredGroup], ratio: float, scope: str, rule: KeepRule) -> Masks:
  """Remove the `ratio` share (`removal_count`) of the removable channels, least important first: of all
  selected groups together ('global') or of each group on its own ('local'). Channels tied at the cut are
  split by a stable order, so ties never remove more (or fewer) than asked; `rule` may add some back."""
  if not groups:
    return {}
  candidates = lambda g: int(np.isfinite(g.importance).sum())
  if scope == "global":
    count = removal_count(ratio, sum(candidates(g) for g in groups))
    removed = least_important([g.importance for g in groups], count)
  else:
    removed = [least_important([g.importance], removal_count(ratio, candidates(g)))[0] for g in groups]
  return {g.name: rule.apply(g.importance, ~r) for g, r in zip(groups, removed, strict=True)}


def _kept_share(f: Factor, keep: Mapping[int, np.ndarray]) -> float:
  if f.group not in keep:
    return 1.0
  return float(keep[f.group][f.offset:f.offset + f.size].sum()) / f.size


def mac_model(coupling: Coupling) -> Callable[[Mapping[int, np.ndarray]], int]:
  """Exact multiply-accumulates of the pruned function for any {group index: keep mask}: every conv and
  dot product scales with the kept share of each channel factor it runs over."""
  def macs(keep: Mapping[int, np.ndarray]) -> int:
    total = 0.0
    for count, factors in coupling.macs:
      share = 1.0
      for f in factors:
        share *= _kept_share(f, keep)
      total += count * share
    return round(total)
  return macs


def flop_model(coupling: Coupling) -> Callable[[Mapping[int, np.ndarray]], int]:
  """Deprecated name of `mac_model` (it counts multiply-accumulates, not FLOPs)."""
  warnings.warn("flop_model is deprecated: it counts multiply-accumulates; use mac_model", DeprecationWarning,
                stacklevel=2)
  return mac_model(coupling)


def mac_target_masks(
    coupling: Coupling, groups: list[ScoredGroup], reduction: float, scope: str, rule: KeepRule
) -> Masks:
  """The smallest pruning ratio (bisection to 1e-4) whose masks cut MACs by at least `reduction`."""
  macs = mac_model(coupling)
  index = {g.name: g.group.index for g in groups}
  count = lambda masks: macs({index[n]: m for n, m in masks.items()})
  full = macs({})
  target = (1.0 - reduction) * full
  low, high = 0.0, 1.0 - 1e-9
  best = ratio_masks(groups, high, scope, rule)
  if count(best) > target:
    raise InputError(
        f"a MAC reduction of {reduction:g} is impossible with min_channels={rule.min_channels} and "
        f"channel_multiple={rule.multiple}: at most {1 - count(best) / max(full, 1):.3f}"
    )
  while high - low > 1e-4:
    mid = 0.5 * (low + high)
    masks = ratio_masks(groups, mid, scope, rule)
    if count(masks) <= target:
      high, best = mid, masks
    else:
      low = mid
  return best


def check_ratio(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0.0 <= value < 1.0:
    raise InputError(f"{name} must be a number in [0, 1), got {value!r}")


def choose(
    coupling: Coupling, groups: list[ScoredGroup], *, ratio: float | None, mac_reduction: float | None,
    threshold: float | None, scope: str, min_channels: int, channel_multiple: int,
) -> Masks:
  """Masks {group name: bool [size]} for the `groups` a criterion prunes (exactly one criterion)."""
  if sum(c is not None for c in (ratio, mac_reduction, threshold)) != 1:
    raise InputError(
        "give exactly one of ratio, mac_reduction, threshold; got "
        f"ratio={ratio!r}, mac_reduction={mac_reduction!r}, threshold={threshold!r}"
    )
  if scope not in SCOPES:
    raise InputError(f"scope must be one of {SCOPES}, got {scope!r}")
  for name, value in (("min_channels", min_channels), ("channel_multiple", channel_multiple)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise InputError(f"{name} must be an int >= 1, got {value!r}")
  rule = KeepRule(min_channels, channel_multiple)
  if ratio is not None:
    check_ratio("ratio", ratio)
    return ratio_masks(groups, float(ratio), scope, rule)
  if mac_reduction is not None:
    check_ratio("mac_reduction", mac_reduction)
    return mac_target_masks(coupling, groups, float(mac_reduction), scope, rule)
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
    raise InputError(f"threshold must be a finite number, got {threshold!r}")
  return threshold_masks(groups, {g.name: float(threshold) for g in groups}, rule)
