"""Slicing the pytrees that mirror the parameters (optimizer states) the way pruning slices the parameters.

An optax state holds per-parameter arrays (SGD momentum, Adam moments) in subtrees that have the
parameters' structure, wrapped in the transforms' own containers (tuples of `optax.chain`, the
`inner_states` of `optax.multi_transform`, `optax.masked`'s state). Inside `multi_transform` and
`masked` the leaves a transform does not own are `optax.MaskedNode()`, which has no leaves of its own;
a subtree therefore *mirrors* the parameters when, with `MaskedNode` counted as a leaf, its structure is
the parameters' (or, for NNX, whose optimizer wraps each `Param` in an `OptVariable`, its leaf names
are). Such subtrees are sliced leaf by leaf (MaskedNodes stay); every other leaf is kept as it is unless
it has the shape of a parameter that pruning changes, in which case the state cannot be sliced faithfully
and ValueError names it. Architecture-free: the slicing itself is a callback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from receding_jax.selection import PyTree, leaf_names, path_names

Names = tuple[str, ...]
#: Slices a {parameter name: leaf} dict (any subset of the parameters) as pruning slices the parameters.
SliceFn = Callable[[dict[Names, Any]], dict[Names, Any]]


def _is_masked_node(node: Any) -> bool:
  return isinstance(node, optax.MaskedNode)


def _shape(leaf: Any) -> tuple[int, ...]:
  return tuple(getattr(leaf, "shape", np.shape(leaf)))


def _changed_shapes(params: PyTree, slice_fn: SliceFn) -> dict[Names, tuple[tuple[int, ...], tuple[int, ...]]]:
  """{name: (shape before, shape after)} of every parameter that `slice_fn` changes."""
  flat = dict(zip(leaf_names(params), jax.tree.leaves(params), strict=True))
  sliced = slice_fn(flat)
  return {k: (_shape(v), _shape(sliced[k])) for k, v in flat.items() if _shape(v) != _shape(sliced[k])}


def _where(path: tuple[Any, ...], names: Names = ()) -> str:
  return "/".join(path_names(path) + names) or "<root>"


def _slice_mirror(node: PyTree, path: tuple[Any, ...], params: PyTree, slice_fn: SliceFn, changed: dict) -> PyTree:
  """Slices a subtree with the parameters' structure; its MaskedNode leaves stay as they are."""
  leaves, treedef = jax.tree.flatten(node, is_leaf=_is_masked_node)
  names = leaf_names(params)
  todo = {}
  for i, (name, leaf) in enumerate(zip(names, leaves, strict=True)):
    if _is_masked_node(leaf) or name not in changed:
      continue
    if _shape(leaf) != changed[name][0]:
      raise ValueError(
          f"prune_params_like cannot slice {_where(path, name)}: its shape {_shape(leaf)} is not the shape "
          f"{changed[name][0]} of the parameter {'/'.join(name)} it mirrors (a factored or reshaped state)"
      )
    todo[name] = i
  sliced = slice_fn({name: leaves[i] for name, i in todo.items()})
  for name, i in todo.items():
    leaves[i] = sliced[name]
  return jax.tree.unflatten(treedef, leaves)


def slice_params_like(tree: PyTree, params: PyTree, slice_fn: SliceFn) -> PyTree:
  """Applies `slice_fn` to every subtree of `tree` that mirrors `params` (see the module docstring).

  Returns a new tree (nothing is mutated). Raises ValueError naming the path of a mirroring leaf whose
  shape is not its parameter's, and of any other leaf with the shape of a parameter that `slice_fn`
  changes: such a leaf belongs to a parameter but its layout is unknown, so keeping it unsliced would
  only fail later, inside the optimizer's update, with a shape error.
  """
  changed = _changed_shapes(params, slice_fn)
  if not changed:
    return tree
  structure = jax.tree.structure(params)
  names = leaf_names(params)
  changed_shapes: dict[tuple[int, ...], Names] = {}
  for name, (before, _) in changed.items():
    changed_shapes.setdefault(before, name)
  def mirrors(node: Any) -> bool:
    """Same structure as the parameters, or (NNX: `OptVariable`s for `Param`s) the same leaf names."""
    if _is_masked_node(node) or not jax.tree.leaves(node, is_leaf=_is_masked_node):
      return False
    if jax.tree.structure(node, is_leaf=_is_masked_node) == structure:
      return True
    flat = jax.tree_util.tree_leaves_with_path(node, is_leaf=_is_masked_node)
    return len(flat) == len(names) and [path_names(p) for p, _ in flat] == names

  def visit(path, node):
    if mirrors(node):
      return _slice_mirror(node, path, params, slice_fn, changed)
    if _shape(node) in changed_shapes:
      raise ValueError(
          f"prune_params_like cannot slice {_where(path)}: it has the shape {_shape(node)} of a pruned "
          f"parameter ({'/'.join(changed_shapes[_shape(node)])}) but is not inside a subtree with the "
          "parameters' structure, so which of its entries belong to the kept channels is unknown"
      )
    return node

  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=mirrors)
