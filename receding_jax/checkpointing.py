"""Orbax checkpoints of a run: the one module that talks to orbax, so a move to orbax v1 touches only it.

A checkpoint step holds two items:
  - 'state': a pytree (params, batch_stats, optimizer state, step, rng, ...), `StandardSave`;
  - 'model': a JSON model spec ({'name', 'num_classes', 'norm', 'overrides'}) that rebuilds the model,
    pruned widths included, with `receding_jax.models.get_model`.
Orbax writes each step to a temporary directory and renames it when complete, so a crash or kill
mid-save leaves the previous steps intact and the partial one invisible.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

PyTree = Any


def make_manager(
    directory: str | os.PathLike,
    keep_last: int = 2,
    keep_best: int = 0,
    best_metric: str | None = None,
    create: bool = True,
) -> ocp.CheckpointManager:
  """A CheckpointManager that keeps the `keep_last` newest steps and the `keep_best` with the highest
  `best_metric` (from the metrics passed to `save`)."""
  if keep_last < 1:
    raise ValueError(f"keep_last must be >= 1, got {keep_last!r}")
  keep: list[policies.PreservationPolicy] = [policies.LatestN(n=keep_last)]
  if keep_best:
    if not best_metric:
      raise ValueError(f"keep_best={keep_best} needs a best_metric")
    keep.append(policies.BestN(get_metric_fn=lambda m: m[best_metric], n=keep_best))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep),
      create=create,
      enable_async_checkpointing=False,
  )
  handlers = {"state": ocp.StandardCheckpointHandler(), "model": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: PyTree,
    model_spec: Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
) -> None:
  """Saves `state` and `model_spec` as step `step` and waits until it is on disk."""
  manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), model=ocp.args.JsonSave(dict(model_spec))),
      metrics=dict(metrics) if metrics is not None else None,
  )
  manager.wait_until_finished()


def latest_step(manager: ocp.CheckpointManager) -> int | None:
  """The newest complete step, or None."""
  return manager.latest_step()


def restore(
    manager: ocp.CheckpointManager, step: int | None = None, target: PyTree | None = None
) -> tuple[PyTree, dict]:
  """(state, model_spec) of `step` (default: the newest). `target` (arrays or `jax.ShapeDtypeStruct`s,
  shardings included) gives the restored structure and placement; without it the saved tree comes back
  as numpy arrays on the host, whatever topology saved it. Raises FileNotFoundError when there is no
  such step and ValueError when it cannot be read."""
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint step {step} in {manager.directory} (steps: {manager.all_steps()})")
  try:
    if target is None:  # Host numpy arrays, whatever devices wrote them (a TPU slice's checkpoint on a CPU).
      metadata = manager.item_metadata(step)["state"]
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), model=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
  except Exception as e:  # orbax raises many kinds for a damaged step; name the step and the directory.
    raise ValueError(f"checkpoint step {step} in {manager.directory} cannot be read: {e}") from e
  return restored["state"], dict(restored["model"])
