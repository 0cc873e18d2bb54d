"""Which parameters belong to which norm: masks over a Flax parameter pytree (Linen or NNX).

A mask is a pytree of bools with the structure of the parameters (optax's convention), and every
penalty and importance helper accepts either such a pytree or a callable that builds one from the
parameters. The defaults here identify norm parameters in any Flax model by the variable layout that
the norm modules create, never by a model class:

- bounded-norm logits: leaves named ``scale_logit`` (created by `BoundedScaleNorm` and `BoundedGate`);
- BatchNorm scales, exactly when the running statistics are at hand: with Linen ``variables``
  (``params`` + ``batch_stats``), the ``scale`` leaves of modules that keep a running ``mean`` in
  ``batch_stats``; with a whole `flax.nnx.State` (``nnx.state(model)``), the ``scale`` leaves of modules
  that also hold ``mean`` and ``var`` batch statistics. With parameters alone (Linen ``params``,
  ``nnx.state(model, nnx.Param)``), every ``scale`` leaf except those of modules auto-named
  LayerNorm_*/GroupNorm_*/RMSNorm_*/InstanceNorm_*.

NNX states flatten every `nnx.Variable` to a trailing ``.value`` key, which is not part of a leaf's name:
``bn/scale/.value`` is named ``('bn', 'scale')``, as the Linen leaf ``params['bn']['scale']``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from receding_jax.norm import LOGIT_NAME

PyTree = Any
MaskSpec = PyTree | Callable[[PyTree], PyTree] | None

_NON_BATCH_NORM_PREFIXES = ("LayerNorm_", "GroupNorm_", "RMSNorm_", "InstanceNorm_")
_STAT_NAMES = ("mean", "var")


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
  """Turns a `jax.tree_util` key path into plain strings ('conv1', 'kernel').

  The trailing ``.value`` attribute of an `nnx.Variable` is dropped, so an NNX leaf has the name of
  the variable that holds it.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  return tuple(_key_name(key) for key in path)


def leaf_names(tree: PyTree) -> list[tuple[str, ...]]:
  """The name of every leaf of `tree` (see `path_names`), in `jax.tree.leaves` order."""
  return [path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def bounded_logit_mask(params: PyTree) -> PyTree:
  """True at every `BoundedScaleNorm` and `BoundedGate` logit (leaves named ``scale_logit``)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: path_names(p)[-1:] == (LOGIT_NAME,), params)


def _split_variables(tree: PyTree) -> tuple[PyTree, PyTree | None]:
  """(params, batch_stats) from Linen variables, or (tree, None) for params alone or an NNX state. Linen
  variables without ``batch_stats`` keep no running statistics: they have no BatchNorm (a named LayerNorm's
  ``scale`` is none)."""
  if isinstance(tree, Mapping) and "params" in tree and not is_nnx_state(tree):
    return tree["params"], tree.get("batch_stats", {})
  return tree, None


def _has_running_mean(batch_stats: PyTree, module_path: tuple[str, ...]) -> bool:
  node = batch_stats
  for name in module_path:
    if not isinstance(node, Mapping) or name not in node:
      return False
    node = node[name]
  return isinstance(node, Mapping) and "mean" in node


def _is_variable(node: Any) -> bool:
  return isinstance(node, nnx.Variable)


def is_nnx_state(tree: PyTree) -> bool:
  """Whether `tree` is a `flax.nnx` state: an `nnx.State`, or any pytree holding `nnx.Variable`s."""
  return isinstance(tree, nnx.State) or any(map(_is_variable, jax.tree.leaves(tree, is_leaf=_is_variable)))


def _nnx_stat_modules(state: PyTree) -> set[tuple[str, ...]]:
  """Modules of an NNX state that hold both ``mean`` and ``var`` batch statistics (`nnx.BatchStat`
  variables; in a pure state, ``as_pure(nnx.state(model))``, any leaves of those names)."""
  found: dict[tuple[str, ...], set[str]] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_variable):
    names = path_names(path)
    if names[-1:] and names[-1] in _STAT_NAMES and (isinstance(leaf, nnx.BatchStat) or not _is_variable(leaf)):
      found.setdefault(names[:-1], set()).add(names[-1])
  return {module for module, stats in found.items() if stats == set(_STAT_NAMES)}


def batch_norm_scale_mask(tree: PyTree) -> PyTree:
  """True at every BatchNorm ``scale`` leaf.

  `tree` is Linen variables ({'params': ..., 'batch_stats': ...}; the mask is over ``params``), which
  identify BatchNorm layers exactly (a ``scale`` whose module keeps a running ``mean``); or an NNX state
  holding batch statistics (the mask is over the state): exactly the ``scale`` beside ``mean`` and
  ``var``; or parameters alone, which select every ``scale`` except those of auto-named
  LayerNorm/GroupNorm/RMSNorm/InstanceNorm modules.
  """
  params, batch_stats = _split_variables(tree)
  stat_modules = _nnx_stat_modules(params) if is_nnx_state(params) else set()

  def is_scale(path, _):
    names = path_names(path)
    if names[-1:] != ("scale",):
      return False
    if batch_stats is not None:
      return _has_running_mean(batch_stats, names[:-1])
    if stat_modules:
      return names[:-1] in stat_modules
    return not (len(names) > 1 and names[-2].startswith(_NON_BATCH_NORM_PREFIXES))

  return jax.tree_util.tree_map_with_path(is_scale, params)


def resolve_mask(mask: MaskSpec, params: PyTree, default: Callable[[PyTree], PyTree]) -> list[bool]:
  """The flat list of bools (one per leaf of `params`, in `jax.tree.leaves` order) that `mask` means.

  `mask` is None (use `default`), a callable params -> bool pytree, or a bool pytree with the
  structure of `params` (an NNX mask may hold `nnx.Variable`s where the parameters hold bare arrays, or
  the reverse, as long as the leaves have the same names). Raises TypeError for any other kind of mask
  or non-bool leaves, and ValueError when a mask pytree's structure differs from the parameters'.
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
  if mask_def != params_def and leaf_names(mask) != leaf_names(params):
    raise ValueError(f"mask structure {mask_def} does not match the parameters' structure {params_def}")
  for leaf in mask_leaves:
    if not isinstance(leaf, (bool, np.bool_)):
      raise TypeError(f"mask leaves must be Python bools, got {type(leaf).__name__}: {leaf!r}")
  return [bool(leaf) for leaf in mask_leaves]


_LOOKED_FOR = {
    bounded_logit_mask: (f"bounded-norm logit (a leaf named {LOGIT_NAME!r})", "use BoundedScaleNorm or BoundedGate"),
    batch_norm_scale_mask: ("BatchNorm scale (a leaf named 'scale' of a BatchNorm)", "use BatchNorm"),
}


def select_leaves(mask: MaskSpec, params: PyTree, default: Callable[[PyTree], PyTree], caller: str) -> list[bool]:
  """`resolve_mask`, raising a one-line ValueError when the mask selects no leaf at all.

  A penalty or importance over nothing is always a mistake (a model without the expected norm, or a
  mask that matches nothing) that would otherwise pass silently as 0; `caller` names the function.
  """
  flags = resolve_mask(mask, params, default)
  if any(flags):
    return flags
  if mask is not None:
    raise ValueError(f"{caller}: the given mask selects none of the {len(flags)} leaves of the parameters")
  what, hint = _LOOKED_FOR.get(default, (f"leaf selected by {default.__name__}", "check the model"))
  raise ValueError(f"{caller} found no {what} in the parameters; pass mask=... or {hint}")
