"""Shrinking a network while it trains: one call from (model, variables, optimizer state) to the narrow triple.

Linen: ``model, variables, opt_state, masks, removed = shrink(model, variables, opt_state, threshold=0.01)``;
NNX: ``model, state, optimizer, masks, removed = shrink(model, opt_state=optimizer, threshold=0.01)`` (a new
module and a new `nnx.Optimizer` for it; the originals untouched). The model is traced once: the masks,
the narrow variables and the sliced optimizer state (momentum, Adam moments, inside `optax.chain`,
`multi_transform` and `masked`) all come from that one analysis; step counts and schedule states are
kept as they are, so the learning-rate schedule continues. Where nothing is removed the inputs come back
as they are (the same objects), so a loop can call it every few epochs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from flax import nnx

from receding_jax.errors import InputError
from receding_jax.pruning import criteria, slicing
from receding_jax.pruning.api import Rules, _choose, _narrow, check_masks, count_params
from receding_jax.pruning.checking import host_arrays, verify
from receding_jax.pruning.criteria import Masks
from receding_jax.pruning.models import Traced, rescored, trace
from receding_jax.pruning.optimizer_state import slice_params_like

PyTree = Any


class Shrunk(NamedTuple):
  """What `shrink` returns: the narrow model, its variables (NNX: its `nnx.state`), its optimizer state
  (NNX: a new `nnx.Optimizer` where one was given), the masks and {group name: channels removed}."""

  model: Any
  variables: Any
  opt_state: Any
  masks: Masks
  removed: dict[str, int]


def _masks(traced: Traced, threshold: float | None, ratio: float | None, masks: Mapping[str, Any] | None,
           rule: criteria.KeepRule, prune_streams: bool, max_removed: int | None, keep_groups: Sequence[str]) -> Masks:
  given = [name for name, v in (("threshold", threshold), ("ratio", ratio), ("masks", masks)) if v is not None]
  if len(given) != 1:
    raise InputError(f"shrink takes exactly one of threshold, ratio and masks, got {given or 'none'}")
  if masks is not None:
    return dict(masks)
  chosen = _choose(traced, ratio, None, threshold, "global", rule.min_channels, rule.multiple, prune_streams, False,
                   keep_groups)
  if max_removed is None:
    return chosen
  if isinstance(max_removed, bool) or not isinstance(max_removed, (int, np.integer)) or max_removed < 0:
    raise InputError(f"max_removed must be an int >= 0, got {max_removed!r}")
  groups = [g for g in criteria.selected(traced.groups, prune_streams, False, keep_groups) if g.name in chosen]
  if sum(int(np.size(m) - np.count_nonzero(m)) for m in chosen.values()) <= max_removed:
    return chosen
  # Too many: of the channels the criterion removes, only the max_removed least important go.
  candidates = [np.where(chosen[g.name], np.inf, g.importance) for g in groups]
  removed = criteria.least_important(candidates, int(max_removed))
  return {g.name: rule.apply(g.importance, ~r) for g, r in zip(groups, removed, strict=True)}


def _kept_per_norm(traced: Traced, keep: Mapping[int, np.ndarray]) -> dict[str, np.ndarray]:
  """{norm path: bool [its channels], True = kept} for every norm on a group that loses channels."""
  return {path: keep[g.group.index][offset:offset + size] for g in traced.groups if g.group.index in keep
          for path, offset, size in g.norms}


def _sliced_optimizer(traced: Traced, keep: Mapping[int, np.ndarray], model: Any, variables: PyTree,
                      opt_state: Any, narrow_model: Any) -> Any:
  """`opt_state` sliced as the parameters were; an `nnx.Optimizer` becomes a new one for `narrow_model`
  with the same step."""
  if opt_state is None:
    return None
  slice_fn = lambda prefix: lambda flat: slicing.slice_named(flat, traced.coupling, keep, prefix)
  if traced.kind == "linen":
    return slice_params_like(opt_state, variables["params"], slice_fn(("params",)))
  if not isinstance(opt_state, nnx.Optimizer):
    return slice_params_like(opt_state, nnx.state(model, nnx.Param), slice_fn(()))
  optimizer = opt_state
  narrow = nnx.Optimizer(narrow_model, optimizer.tx, wrt=optimizer.wrt, graph=optimizer.graph)
  narrow.opt_state = slice_params_like(optimizer.opt_state, nnx.state(model, optimizer.wrt), slice_fn(()))
  narrow.step[...] = optimizer.step[...]
  return narrow


def shrink(
    model: Any,
    variables: PyTree = None,
    opt_state: Any = None,
    *,
    threshold: float | None = None,
    ratio: float | None = None,
    masks: Mapping[str, Any] | None = None,
    min_channels: int = 3,
    channel_multiple: int = 1,
    prune_streams: bool = False,
    inputs: Any = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    rules: Rules | None = None,
    check: bool = True,
    importances: Mapping[str, Any] | None = None,
    max_removed: int | None = None,
    report: dict[str, int] | None = None,
    keep_groups: Sequence[str] = (),
) -> Shrunk:
  """Removes channels from a model in training and from its optimizer state, by one criterion.

  Args:
    model: a Linen module (with its `variables`: 'params' and, if any, 'batch_stats') or an NNX module
      (`variables` None; its state is read from it, and it is left untouched).
    opt_state: the optax state of the parameters (any state `prune_params_like` slices), or for NNX an
      `nnx.Optimizer`; None to shrink the model alone.
    threshold, ratio, masks: exactly one: keep a channel iff its importance is above `threshold`, prune a
      `ratio` of channels (global scope), or your own {group name: bool [channels]} (see `channel_masks`).
    min_channels, channel_multiple, prune_streams, inputs, apply_kwargs, rules, keep_groups: as for
      `prune_params`.
    check: verify the narrow model against the wide one with the removed channels zeroed.
    importances: {norm path (as `neuron_importances` names it): float [channels]} scoring those norms
      instead of their own scales (+inf keeps a channel): e.g. a training loop's patience, which lets a
      channel go only once it stayed below the threshold for several checks.
    max_removed: never remove more channels than this (the least important of those the criterion picks).
    report: if given, receives 'params_before', 'params_after', 'macs_before', 'macs_after' (MACs of one
      input, from the same trace) and 'kept', {norm path: bool [channels] kept} for the norms of the
      pruned groups (a loop's per-channel records, e.g. patience counts, follow the channels with it).

  Returns:
    `Shrunk(model, variables, opt_state, masks, removed)`; the inputs themselves (and removed == {}) when
    no channel goes (with `importances`, also when they leave no prunable group a channel to remove).
    InputError when the model has no group a criterion may prune (see `channel_masks`).
  """
  traced = trace(model, variables, inputs, apply_kwargs, rules)
  if importances is not None:
    traced = rescored(traced, importances)
    if masks is None and not criteria.selected(traced.groups, prune_streams, False, keep_groups):
      return Shrunk(model, nnx.state(model) if traced.kind == "nnx" else variables, opt_state, {}, {})  # All kept.
  rule = criteria.KeepRule(min_channels, channel_multiple)
  chosen = _masks(traced, threshold, ratio, masks, rule, prune_streams, max_removed, keep_groups)
  keep = check_masks(traced, chosen)
  if report is not None:
    macs = criteria.mac_model(traced.coupling)
    params = count_params(model if traced.kind == "nnx" else variables)
    report.update(params_before=params, params_after=params, macs_before=macs({}), macs_after=macs(keep),
                  kept=_kept_per_norm(traced, keep))
  if not keep:
    return Shrunk(model, nnx.state(model) if traced.kind == "nnx" else variables, opt_state, chosen, {})
  host = host_arrays(traced.variables)
  narrow_model, narrow_variables = _narrow(traced, keep, host)
  if check:
    verify(traced, keep, narrow_model, narrow_variables, host)
  narrow_opt_state = _sliced_optimizer(traced, keep, model, variables, opt_state, narrow_model)
  removed = {name: int(np.size(m) - np.count_nonzero(m)) for name, m in chosen.items() if not np.all(m)}
  if report is not None:
    report["params_after"] = count_params(narrow_model if traced.kind == "nnx" else narrow_variables)
  return Shrunk(narrow_model, narrow_variables, narrow_opt_state, chosen, removed)
