"""Shrinking while training, the loop's side: patience counts, the budget, and one shrink of a run's state.

The run's bookkeeping is a small pytree saved with every checkpoint under the state's ``"shrink"`` key
(`BOOK_KEY`), so a killed run resumes with the same counts:
  - ``counts``: int32 [channels of every norm], how many checks in a row each channel's importance was at
    or below ``shrink.threshold``, in `neuron_importances`' order (norm paths sorted);
  - ``prunable``, ``macs``, ``params``: the unshrunk network's prunable channels, MACs of one input and
    parameters (the budget's base, and what the prune phase's ratios count);
  - ``removed``: prunable channels removed so far.
A shrink itself is `pruning.shrink` on the run's model: params, batch statistics and optimiser state sliced
by the same masks, the step count and schedule untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from receding_jax import pruning
from receding_jax.importances import neuron_importances
from receding_jax.training import model_specs

BOOK_KEY = "shrink"
#: The model spec's mark of a network narrowed while it trained (its prune phase counts the unshrunk one).
SHRUNK_KEY = "shrunk"


def is_check(config: ml_collections.ConfigDict, epochs_done: int) -> bool:
  """Whether the end of epoch `epochs_done` (counted from 1) is a shrink check; never the last epoch's end,
  where a shrink would compile a narrow network that no step trains."""
  s = config.shrink
  return (bool(s.enabled) and s.start_epoch <= epochs_done < config.optim.num_epochs
          and (epochs_done - s.start_epoch) % s.every_epochs == 0)


def kept_whole(model: Any) -> tuple[str, ...]:
  """The groups a zoo model's criterion leaves whole (a ResNet-50's stem: docs/method.md section 6), for the
  budget, every shrink and the prune phase alike."""
  return getattr(model, "PAPER_UNPRUNED", ())


def _selected(model: Any, variables: Any, spec: Mapping[str, Any], prune_streams: bool):
  traced = pruning.trace(model, variables, model_specs.example_inputs(spec))
  return traced, pruning.criteria.selected(traced.groups, prune_streams, False, kept_whole(model))


def new_book(spec: Mapping[str, Any], variables: Mapping[str, Any], prune_streams: bool) -> dict[str, np.ndarray]:
  """The bookkeeping of a run that starts shrinking from the (unshrunk) model of `spec` with `variables`
  (host arrays or shapes): zero counts, its prunable channels and MACs, nothing removed."""
  model = model_specs.build_model(spec)
  traced, groups = _selected(model, variables, spec, prune_streams)
  prunable = sum(int(np.isfinite(g.importance).sum()) for g in groups)
  return {"counts": np.zeros(norm_channels(variables), np.int32), "prunable": _count(prunable),
          "macs": _count(pruning.mac_model(traced.coupling)({})), "removed": _count(0),
          "params": _count(pruning.count_params(variables))}


def _count(n: int) -> np.ndarray:
  """A count as a 0-d int64 array (what orbax saves and restores as it is)."""
  return np.asarray(n, np.int64)


def norm_channels(variables: Mapping[str, Any]) -> int:
  """Channels of every norm of `variables` (arrays or shapes) together: the length of ``counts``."""
  zeros = jax.tree.map(lambda x: np.zeros(np.shape(x), np.float32), dict(variables))
  return int(sum(np.size(v) for v in neuron_importances(zeros).values()))


def abstract_book(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Zero bookkeeping of a model with `variables` (shapes): a checkpoint's restore target, host numpy
  (int64 MACs stay int64 whatever jax's x64 setting)."""
  return {"counts": np.zeros(norm_channels(variables), np.int32),
          **{k: _count(0) for k in ("prunable", "macs", "removed", "params")}}


def counted(counts: np.ndarray, importances: Mapping[str, Any], threshold: float) -> np.ndarray:
  """`counts` after one check: +1 where the importance is at or below `threshold`, else back to 0."""
  low = np.concatenate([np.ravel(np.asarray(importances[k])) <= threshold for k in sorted(importances)])
  return np.where(low, np.asarray(counts) + 1, 0).astype(np.int32)


def _per_norm(flat: np.ndarray, importances: Mapping[str, Any]) -> dict[str, np.ndarray]:
  keys = sorted(importances)
  return dict(zip(keys, np.split(np.asarray(flat), np.cumsum([np.size(importances[k]) for k in keys])[:-1]),
                  strict=True))


def eligible(counts: np.ndarray, importances: Mapping[str, Any], patience: int) -> dict[str, np.ndarray]:
  """{norm path: importance where the channel stayed low for `patience` checks, +inf elsewhere}: what a
  threshold criterion may remove."""
  stale = _per_norm(np.asarray(counts) >= patience, importances)
  return {k: np.where(stale[k], np.asarray(v, np.float64), np.inf) for k, v in importances.items()}


@dataclasses.dataclass(frozen=True)
class Shrink:
  """One shrink of a run: the narrow spec, variables and optimiser state (host arrays), the bookkeeping
  after it, {group: channels removed}, and params/MACs before and after."""

  spec: dict[str, Any]
  variables: dict[str, Any]
  opt_state: Any
  book: dict[str, np.ndarray]
  removed: dict[str, int]
  counts: dict[str, int]


def budget(config: ml_collections.ConfigDict, book: Mapping[str, Any]) -> int:
  """Channels that may still go: max_ratio of the unshrunk prunable channels, less those removed."""
  return max(int(np.floor(config.shrink.max_ratio * int(book["prunable"]))) - int(book["removed"]), 0)


def due(config: ml_collections.ConfigDict, book: Mapping[str, Any]) -> bool:
  """Whether a check with `book`'s counts (already updated) may remove anything: budget is left and some
  channel stayed low for `patience` checks. Cheap: a run fetches its state and traces only when due."""
  return budget(config, book) > 0 and bool(np.any(np.asarray(book["counts"]) >= config.shrink.patience))


def shrink_state(config: ml_collections.ConfigDict, spec: Mapping[str, Any], variables: Mapping[str, Any],
                 opt_state: Any, importances: Mapping[str, Any], book: Mapping[str, Any]) -> Shrink | None:
  """Removes the channels of `variables` (host {'params', 'batch_stats'}) whose counts in `book` (already
  updated by this check) reached the patience, within the budget; None when none goes (always, when the
  check is not `due`: call it only then, it traces the model)."""
  s, p = config.shrink, config.prune
  model = model_specs.build_model(spec)
  report: dict[str, Any] = {}
  shrunk = pruning.shrink(
      model, dict(variables), opt_state, threshold=float(s.threshold),
      importances=eligible(book["counts"], importances, s.patience), max_removed=budget(config, book),
      min_channels=p.min_channels, channel_multiple=p.channel_multiple, prune_streams=p.prune_streams,
      inputs=model_specs.example_inputs(spec), report=report, keep_groups=kept_whole(model))
  if not shrunk.removed:
    return None
  kept = report["kept"]
  flat_kept = np.concatenate([np.ravel(kept.get(k, np.ones(np.size(v), bool))) for k, v in sorted(importances.items())])
  new_book = {**book, "counts": np.asarray(book["counts"])[flat_kept],
              "removed": _count(int(book["removed"]) + sum(shrunk.removed.values()))}
  narrow_spec = {**spec, "pruned": shrunk.model.pruned_overrides, SHRUNK_KEY: True}
  counts = {k: int(v) for k, v in report.items() if k != "kept"}
  return Shrink(narrow_spec, dict(shrunk.variables), shrunk.opt_state, new_book, shrunk.removed, counts)
