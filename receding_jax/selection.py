"""Which parameters belong to which norm: masks over a Flax parameter pytree.

A mask is a pytree of bools with the structure of the parameters (optax's convention), and every
penalty and importance helper accepts either such a pytree or a callable that builds one from the
parameters. The defaults here identify norm parameters in any Flax model by the variable layout that
the norm modules create, never by a model class:

- bounded-norm logits: leaves named ``scale_logit`` (created by `BoundedScaleNorm`);
- BatchNorm scales: with full ``variables`` (``params`` + ``batch_stats``), exactly the ``scale`` leaves
  of modules that also keep a running ``mean`` in ``batch_stats``; with ``params`` alone, every
  ``scale`` leaf except those of modules auto-named LayerNorm_*/GroupNorm_*/RMSNorm_*/InstanceNorm_*.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from receding_jax.norm import LOGIT_NAME

PyTree = Any
MaskSpec = PyTree | Callable[[PyTree], PyTree] | None

_NON_BATCH_NORM_PREFIXES = ("LayerNorm_", "GroupNorm_", "RMSNorm_", "InstanceNorm_")


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """Turns a `jax.tree_util` key path into plain strings ('conv1', 'kernel')."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def path_string(path: tuple[Any, ...]) -> str:
  """A key path as 'block1/norm1/scale_logit'."""
  return "/".join(path_names(path))


def bounded_logit_mask(params: PyTree) -> PyTree:
  """True at every `BoundedScaleNorm` logit (leaves named ``scale_logit``)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_names(p)[-1:] == (LOGIT_NAME,), params)


def _split_variables(tree: PyTree) -> tuple[PyTree, PyTree | None]:
  """(params, batch_stats) from full variables, or (params, None) when given params alone."""
  if isinstance(tree, Mapping) and "params" in tree:
    return tree["params"], tree.get("batch_stats")
  return tree, None


def _has_running_mean(batch_stats: PyTree, module_path: tuple[str, ...]) -> bool:
  node = batch_stats
  for name in module_path:
    if not isinstance(node, Mapping) or name not in node:
      return False
    node = node[name]
  return isinstance(node, Mapping) and "mean" in node


def batch_norm_scale_mask(tree: PyTree) -> PyTree:
  """True at every BatchNorm ``scale`` leaf; a mask over ``params``.

  `tree` is either full variables ({'params': ..., 'batch_stats': ...}), which identifies BatchNorm
  layers exactly (a ``scale`` whose module keeps a running ``mean``), or ``params`` alone, which selects
  every ``scale`` except those of auto-named LayerNorm/GroupNorm/RMSNorm/InstanceNorm modules.
  """
  params, batch_stats = _split_variables(tree)

  def is_scale(path, _):
    names = path_names(path)
    if names[-1:] != ("scale",):
      return False
    if batch_stats is not None:
      return _has_running_mean(batch_stats, names[:-1])
    return not (len(names) > 1 and names[-2].startswith(_NON_BATCH_NORM_PREFIXES))

  return jax.tree_util.tree_map_with_path(is_scale, params)


def resolve_mask(mask: MaskSpec, params: PyTree, default: Callable[[PyTree], PyTree]) -> list[bool]:
  """The flat list of bools (one per leaf of `params`, in `jax.tree.leaves` order) that `mask` means.

  `mask` is None (use `default`), a callable params -> bool pytree, or a bool pytree with the
  structure of `params`. Raises TypeError for any other kind of mask or non-bool leaves, and
  ValueError when a mask pytree's structure differs from the parameters'.
  """
  if mask is None:
    mask = default
  if callable(mask):
    mask = mask(params)
  elif isinstance(mask, (str, bytes, int, float, np.ndarray, jax.Array)):
    raise TypeError(
        f"mask must be None, a callable or a pytree of bools like the parameters; got {type(mask).__name__}"
    )
  mask_leaves, mask_def = jax.tree.flatten(mask)
  params_def = jax.tree.structure(params)
  if mask_def != params_def:
    raise ValueError(f"mask structure {mask_def} does not match the parameters' structure {params_def}")
  for leaf in mask_leaves:
    if not isinstance(leaf, (bool, np.bool_)):
      raise TypeError(f"mask leaves must be Python bools, got {type(leaf).__name__}: {leaf!r}")
  return [bool(leaf) for leaf in mask_leaves]
