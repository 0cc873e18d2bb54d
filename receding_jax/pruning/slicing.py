"""Slicing variables by channel masks: every parameter axis of a group loses its removed channels' entries.

An axis's layout (`coupling.Factor`s) says which group positions it holds: one stretch of one group, or a
row-major product of stretches (a flattened feature map: positions x channels). The kept entries of such
an axis are the mixed-radix combinations of each factor's kept indices. Works on numpy and jax arrays
(numpy in, numpy out), and on any pytree whose leaf names (`selection.path_names`) are the coupling's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from receding_jax.pruning.coupling import Coupling, Factor
from receding_jax.selection import path_names

Keep = Mapping[int, np.ndarray]  # {group index: bool [group size]}, True = keep.


def kept_indices(factors: tuple[Factor, ...], keep: Keep) -> np.ndarray | None:
  """Indices kept along an axis with these factors; None when it keeps everything."""
  parts = []
  for f in factors:
    if f.group in keep:
      parts.append((np.flatnonzero(keep[f.group][f.offset:f.offset + f.size]), f.size))
    else:
      parts.append((np.arange(f.size), f.size))
  if all(len(k) == size for k, size in parts):
    return None
  index = np.zeros(1, np.int64)
  for k, size in parts:
    index = (index[:, None] * size + k[None, :]).ravel()
  return index


def _on_host(fn):
  """Runs `fn` on a numpy copy of a jax array and returns a jax array (numpy stays numpy): slicing on the
  host costs no compilation per leaf shape."""
  def run(leaf: Any, layout: Mapping[int, tuple[Factor, ...]], keep: Keep) -> Any:
    if isinstance(leaf, (np.ndarray, np.generic)):
      return fn(leaf, layout, keep)
    return jnp.asarray(fn(np.asarray(leaf), layout, keep))
  return run


@_on_host
def slice_leaf(leaf: Any, layout: Mapping[int, tuple[Factor, ...]], keep: Keep) -> Any:
  """`leaf` without the removed channels' entries along every axis of its layout."""
  for axis, factors in layout.items():
    index = kept_indices(factors, keep)
    if index is not None:
      leaf = np.take(leaf, index, axis=axis)
  return leaf


@_on_host
def zero_leaf(leaf: Any, layout: Mapping[int, tuple[Factor, ...]], keep: Keep) -> Any:
  """`leaf` with the removed channels' entries set to zero (the shape unchanged)."""
  for axis, factors in layout.items():
    index = kept_indices(factors, keep)
    if index is not None:
      mask = np.zeros(leaf.shape[axis], bool)
      mask[index] = True
      shape = [1] * leaf.ndim
      shape[axis] = -1
      leaf = np.where(mask.reshape(shape), leaf, np.zeros((), leaf.dtype))
  return leaf


def _map_named(fn, tree: Any, coupling: Coupling, keep: Keep) -> Any:
  def visit(path, leaf):
    layout = coupling.layouts.get(path_names(path))
    return leaf if layout is None or not hasattr(leaf, "shape") else fn(leaf, layout, keep)
  return jax.tree_util.tree_map_with_path(visit, tree)


def slice_tree(tree: Any, coupling: Coupling, keep: Keep) -> Any:
  """Every leaf of `tree` named like a coupled parameter, sliced; other leaves as they are."""
  return _map_named(slice_leaf, tree, coupling, keep)


def zero_tree(tree: Any, coupling: Coupling, keep: Keep) -> Any:
  """Every coupled leaf with its removed channels' entries zeroed: the wide twin of the pruned model."""
  return _map_named(zero_leaf, tree, coupling, keep)


def slice_named(flat: Mapping[tuple[str, ...], Any], coupling: Coupling, keep: Keep,
                prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  """Slices a {leaf name: array} dict; names are looked up as `prefix` + name ('params' for Linen)."""
  out = {}
  for name, leaf in flat.items():
    layout = coupling.layouts.get((*prefix, *name))
    out[name] = leaf if layout is None else slice_leaf(leaf, layout, keep)
  return out
