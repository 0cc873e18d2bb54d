"""Orbax checkpoints of a run: the one module that talks to orbax, so a move to orbax v1 touches only it.

A checkpoint step holds two items:
  - 'state': a pytree (params, batch_stats, optimizer state, step, rng, ...), `StandardSave`;
  - 'model': a JSON model spec ({'name', 'num_classes', 'norm', 'overrides'}, and the pruned widths by
    module path under 'pruned') that `training.model_specs.build_model` rebuilds the model from.
Orbax writes each step to a temporary directory and renames it when complete, so a crash or kill
mid-save leaves the previous steps intact and the partial one invisible.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from receding_jax.training import workdir

PyTree = Any
_SETTLE_SECONDS = 1.0


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
  return ocp.CheckpointManager(workdir.path(directory), options=options, item_handlers=handlers)


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


class DamagedCheckpointError(ValueError):
  """A checkpoint step exists but cannot be read (a missing, truncated or corrupt file)."""


def damage_description(error: BaseException) -> str:
  """One line saying what is wrong with a step, from what orbax/tensorstore raised: the kind of damage
  and the innermost file and reason (tensorstore's specs left out)."""
  text = str(error).split(" [tensorstore_spec")[0].strip()
  files = list(re.finditer(r'local file "([^"]+)": ', text))
  if files:
    detail = f"{files[-1].group(1)}: {text[files[-1].end():]}"
  else:
    detail = text.splitlines()[0] if text else type(error).__name__
  missing = isinstance(error, FileNotFoundError) or "does not exist" in text or "NOT_FOUND" in text
  kind = "a missing file" if missing else "a truncated or corrupt file"
  return f"{kind} ({detail[:300]})"


def restore(
    manager: ocp.CheckpointManager, step: int | None = None, target: PyTree | None = None
) -> tuple[PyTree, dict]:
  """(state, model_spec) of `step` (default: the newest). `target` (arrays or `jax.ShapeDtypeStruct`s,
  shardings included) gives the restored structure and placement; without it the saved tree comes back
  as numpy arrays on the host, whatever topology saved it. Raises FileNotFoundError when there is no
  such step and DamagedCheckpointError (one line: directory, step, kind of damage) when it cannot be read;
  nothing on disk is changed either way."""
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint step {step} in {manager.directory} (steps: {manager.all_steps()})")
  try:
    metadata = manager.item_metadata(step)["state"]  # Reads every array's metadata: finds most damage.
    if target is None:  # Host numpy arrays, whatever devices wrote them (a TPU slice's checkpoint on a CPU).
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), model=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
  except Exception as e:  # orbax raises many kinds for a damaged step; name the step and the directory.
    # A failed read leaves tensorstore's other reads running; they report to a closed event loop on
    # stderr. Let them finish first, so that this error is the last thing the user reads.
    time.sleep(_SETTLE_SECONDS)
    raise DamagedCheckpointError(
        f"checkpoint step {step} in {manager.directory} is damaged: {damage_description(e)}"
    ) from None
  return restored["state"], dict(restored["model"])


def read_step(directory: str | os.PathLike, step: int | None = None) -> tuple[PyTree, dict, int]:
  """(state as host numpy arrays, model spec, step) of `step` (default: the newest) of the checkpoints in
  `directory`, which is only read; errors as `restore`."""
  manager = make_manager(directory, create=False)
  try:
    state, spec = restore(manager, step)
    return state, spec, int(manager.latest_step() if step is None else step)
  finally:
    manager.close()


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves the (damaged) step `step` out of the manager's directory into ``<directory>_damaged/<step>``, on
  process 0, so that resuming from an older step can save this step number again; returns where it went."""
  directory = workdir.path(manager.directory)
  source = directory / str(step)
  target = directory.parent / f"{directory.name}_damaged" / f"{step}_{int(time.time())}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"set_aside {source}")
  return str(target)
