"""Residual streams: the groups on which two independent data paths are added.

Pruning channel c of such a group removes it from every layer whose output is added there (every block
that writes into a ResNet's residual stream) and from every layer that reads it, and the channel is
scored by the largest of those layers' norms: it carries a sum that is zero only where every term is.
The paper prunes block-inner channels only, so `criteria.selected` leaves streams out unless asked.

What makes a stream is tracked per value of the jaxpr:

- its *kind* ('data': computed from the model's inputs; 'param': from variables only; 'const');
- its *origin*: where its channels were last mixed, the set of channel-mixing equations (a conv other than
  a depthwise one, a dot product: their rules call `Relations.set_origin`) or model inputs (-1, -2, ...)
  it is computed from through channel-by-channel operations only (elementwise ops, per-channel norms and
  biases, pooling or means over positions, depthwise convs, reshapes, calls into sub-jaxprs).

An add or subtract of two data values *joins* a stream on every axis where neither operand is broadcast
and their origins are disjoint: no value is an ancestor of both through channel-by-channel operations.
``relu(bn(conv2(y)) + x)`` joins (conv2's channels and the block input's); ``x + 0.044715 * x**3`` (the
tanh GELU), ``x - mean(x)`` (a LayerNorm) and ``x + x * gate(x)`` do not. Products never join
(squeeze-excite's ``x * sigmoid(conv(mean(x)))``, swish, GLU), nor does a group read by several layers (a
VAE's two heads, a branch and its projection shortcut). Not recognised: gated sums whose terms share a
gate, such as a highway layer's ``t * h + (1 - t) * x`` (not a stream here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from receding_jax.pruning.relations import Relations

KIND_ORDER = {"const": 0, "param": 1, "data": 2}
ADDITIVE = ("add", "add_any", "sub")
Provenance = tuple[str, frozenset[int]]


def inherit(eqn: Any, rel: Relations) -> None:
  """Gives `eqn`'s results the most data-dependent kind of its operands and the union of their origins
  (a channel-mixing rule then replaces the origin with its own equation)."""
  kind = max((rel.kind(v) for v in eqn.invars), key=KIND_ORDER.get, default="const")
  origin = frozenset().union(*(rel.origin(v) for v in eqn.invars))
  set_provenance(rel, eqn.outvars, [(kind, origin)] * len(eqn.outvars))


def provenance(rel: Relations, variables: Sequence[Any]) -> list[Provenance]:
  """(kind, origin) of each of `variables` in the current scope (to carry them into or out of a call)."""
  return [(rel.kind(v), rel.origin(v)) for v in variables]


def set_provenance(rel: Relations, variables: Sequence[Any], values: Sequence[Provenance]) -> None:
  for var, (kind, origin) in zip(variables, values, strict=True):
    rel.set_kind(var, kind)
    rel.set_origin(var, origin)


def record_joins(eqn: Any, rel: Relations) -> None:
  """Joins a stream on every axis where `eqn` adds (or subtracts) two independent data values."""
  if eqn.primitive.name not in ADDITIVE or len(eqn.invars) != 2:
    return
  a, b = eqn.invars
  if rel.kind(a) != "data" or rel.kind(b) != "data" or rel.origin(a) & rel.origin(b):
    return
  out, operands = rel.axes(eqn.outvars[0]), [(rel.axes(v), rel.broadcast_axes(v)) for v in (a, b)]
  for i, node in enumerate(out):
    if rel.sizes[node] > 1 and all(len(axes) == len(out) and i not in expanded
                                   and rel.sizes[axes[i]] == rel.sizes[node] for axes, expanded in operands):
      rel.join(node)


def stream_roots(rel: Relations, groups_of: Callable[[int], Iterable[int]]) -> set[int]:
  """The groups (as `groups_of(node)` names them: every group a node's axis is a factor of) that a join
  touches."""
  return {root for node in rel.joins for root in groups_of(node)}
