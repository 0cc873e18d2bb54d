"""Orbax checkpoints of a run: the one module that talks to orbax, so a move to orbax v1 touches only it.

A checkpoint step holds two items:
  - 'state': a pytree (params, batch_stats, optimizer state, step, rng, ...), `StandardSave`;
  - 'model': a JSON model spec ({'name', 'num_classes', 'norm', 'overrides'}, and the pruned widths by
    module path under 'pruned') that `training.model_specs.build_model` rebuilds the model from.
Orbax writes each step to a temporary directory and renames it when complete, so a crash or kill
mid-save leaves the previous steps intact and the partial one invisible.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from receding_jax.errors import InputError
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


class DamagedCheckpointError(InputError):
  """A checkpoint step exists but cannot be read (a missing, truncated or corrupt file)."""


class CheckpointMismatchError(InputError):
  """A readable checkpoint step whose saved tree does not fit the structure asked for (another version of
  the code or of optax, or another model, wrote it): nothing is wrong with its files."""


#: What tensorstore/orbax say about a file that is missing, cut short or garbled (the step is damaged).
_DAMAGE_MARKERS = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "Error decoding", "corrupt", "does not exist")
#: What they say about a failure outside the files: access, quota, a transient store (the step may be fine).
_OUTSIDE_MARKERS = ("PERMISSION_DENIED", "UNAUTHENTICATED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                    "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED")
#: What orbax says when the tree asked for does not fit the saved one (caught before reading, normally).
_MISMATCH_MARKERS = ("Structure mismatch", "is not compatible with the stored shape")


def is_damage(error: BaseException) -> bool:
  """Whether `error`, raised reading a step, says that one of its files is missing, truncated or corrupt
  (not: access denied, a transient store failure, a tree that does not fit)."""
  if isinstance(error, PermissionError):
    return False
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
    return True
  text = str(error)
  if any(m in text for m in _OUTSIDE_MARKERS + _MISMATCH_MARKERS):
    return False
  return any(m in text for m in _DAMAGE_MARKERS)


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


def _leaf_paths(tree: PyTree) -> dict[str, tuple[int, ...]]:
  """{'opt_state/0/trace/conv/kernel': shape} of every leaf; a namedtuple field, a dict key and a list
  index all print as one path segment, as orbax stores them."""
  def segment(key) -> str:
    for attribute in ("key", "name", "idx"):
      if hasattr(key, attribute):
        return str(getattr(key, attribute))
    return str(key)

  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(segment(k) for k in path): tuple(np.shape(leaf)) for path, leaf in leaves}


def mismatch_description(saved: PyTree, target: PyTree) -> str | None:
  """Where `target`'s tree does not fit the `saved` one (orbax's metadata tree): leaves the checkpoint
  lacks, leaves it has beyond the target, shapes that differ (three of each named); None when it fits."""
  have, want = _leaf_paths(saved), _leaf_paths(target)
  problems = []
  for label, names in (("the checkpoint lacks", [k for k in want if k not in have]),
                       ("it has beyond what is expected", [k for k in have if k not in want])):
    if names:
      problems.append(f"{label} {len(names)} leaves ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
  shapes = [f"{k} saved {have[k]}, expected {want[k]}" for k in want if k in have and have[k] != want[k]]
  if shapes:
    problems.append(f"{len(shapes)} shapes differ ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})")
  return "; ".join(problems) or None


def restore(
    manager: ocp.CheckpointManager, step: int | None = None, target: PyTree | Callable[[dict], PyTree] | None = None
) -> tuple[PyTree, dict]:
  """(state, model_spec) of `step` (default: the newest). `target` (arrays or `jax.ShapeDtypeStruct`s,
  shardings included, or a function of the step's model spec that gives them: a network that shrank while it
  trained has the shapes its spec says) gives the restored structure and placement; without it the saved tree comes back
  as numpy arrays on the host, whatever topology saved it. Raises FileNotFoundError when there is no such
  step, CheckpointMismatchError when the saved tree does not fit `target` (naming where),
  DamagedCheckpointError (one line: directory, step, kind of damage) when a file of the step is missing or
  corrupt, and any other failure (access, a transient store error) as it came, naming the step; nothing
  on disk is changed either way."""
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f"no checkpoint step {step} in {manager.directory} (steps: {manager.all_steps()})")
  where = f"checkpoint step {step} in {manager.directory}"
  try:
    metadata = manager.item_metadata(step)["state"]  # Reads every array's metadata: finds most damage.
    if callable(target):
      target = target(dict(manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))["model"]))
    if target is not None and (mismatch := mismatch_description(metadata, target)):
      raise CheckpointMismatchError(
          f"{where} is readable but does not fit the state expected here: {mismatch}; another version of "
          "the code or of optax, or another model, wrote it: resume it with that version, or use a new workdir")
    if target is None:  # Host numpy arrays, whatever devices wrote them (a TPU slice's checkpoint on a CPU).
      target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), metadata)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), model=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
  except CheckpointMismatchError:
    raise
  except Exception as e:
    # A failed read leaves tensorstore's other reads running; they report to a closed event loop on
    # stderr. Let them finish first, so that this error is the last thing the user reads.
    time.sleep(_SETTLE_SECONDS)
    if any(m in str(e) for m in _MISMATCH_MARKERS):
      raise CheckpointMismatchError(f"{where} does not fit the state expected here: {str(e)[:300]}") from None
    if not is_damage(e):
      e.add_note(f"while reading {where} (not a damaged file: nothing was changed)")
      raise
    raise DamagedCheckpointError(f"{where} is damaged: {damage_description(e)}") from None
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
