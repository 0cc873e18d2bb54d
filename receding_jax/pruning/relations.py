"""What a jaxpr says about channels: the relations each primitive's rule records, over (value, axis) nodes.

A *node* is one axis of one value of the traced computation (a jaxpr variable in one call scope). Rules
(`rules`) read an equation and record how its inputs' and outputs' axes correspond:

- `tie(a, b)`: the two axes index the same channels, position for position (elementwise ops, a conv's
  input features and its kernel's input axis, the contracted axes of a dot product, ...);
- `shift(a, b, offset)`: channel i of `a` is channel i + offset of `b` (concatenate, pad, slice);
- `compose(whole, parts)`: `whole` is the row-major flatten of the `parts` axes (a reshape);
- `fix(a, reason)`: the axis cannot lose channels (model inputs and outputs, constants, unknown
  primitives); `fix_range(a, lo, hi, reason)`: only positions [lo, hi) cannot (zero padding);
- `ignore(a)`: the axis is not a channel axis (a convolution window);
- `approximate(a, reason)`: a reduction runs over the axis, so removing a channel changes the result
  unless the channel is exactly zero there (LayerNorm over channels, a sum over features);
- `set_origin(var, {rel.equation})`: the result's channels are mixed anew here (a conv, a dot product),
  so adding it to a value from elsewhere joins a residual stream (`streams`).

`coupling` turns these into channel groups. Rules never see the union-find; they only call these methods.
"""

from __future__ import annotations

import dataclasses
from typing import Any

Node = int


def _is_variable(var: Any) -> bool:
  """A jaxpr variable (not a literal constant operand)."""
  return hasattr(var, "aval") and type(var).__name__ != "Literal"


@dataclasses.dataclass
class Relations:
  """The relations recorded while walking a jaxpr, over integer node ids (see the module docstring)."""

  sizes: list[int] = dataclasses.field(default_factory=list)
  ties: list[tuple[Node, Node]] = dataclasses.field(default_factory=list)
  shifts: list[tuple[Node, Node, int, str]] = dataclasses.field(default_factory=list)
  compositions: list[tuple[Node, tuple[Node, ...], str]] = dataclasses.field(default_factory=list)
  fixed: list[tuple[Node, str]] = dataclasses.field(default_factory=list)
  fixed_ranges: list[tuple[Node, int, int, str]] = dataclasses.field(default_factory=list)
  approximate_at: list[tuple[Node, str]] = dataclasses.field(default_factory=list)
  #: Axes that are not channels at all (a convolution's window): never part of a group.
  ignored: list[Node] = dataclasses.field(default_factory=list)
  #: Multiply-accumulates of conv and dot_general equations: (MACs, the nodes whose sizes they scale with).
  macs: list[tuple[int, tuple[Node, ...]]] = dataclasses.field(default_factory=list)
  #: Axes where two independent data paths are added (a residual add): the group is a stream (`streams`).
  joins: list[Node] = dataclasses.field(default_factory=list)
  #: What each value depends on: 'data' (the model's inputs), 'param' (variables only) or 'const'.
  kinds: dict[tuple[int, Any], str] = dataclasses.field(default_factory=dict)
  #: Where a data value's channels were last mixed: the channel-mixing equations (or model inputs, numbered
  #: -1, -2, ...) it comes from. An add joins a stream only where its operands' origins are disjoint (GELU's
  #: x + 0.0447 x^3 adds one layer's output to a function of itself; a residual adds two layers' outputs).
  origins: dict[tuple[int, Any], frozenset[int]] = dataclasses.field(default_factory=dict)
  #: Axes of a value that broadcast_in_dim expanded (they do not make an elementwise op a join).
  broadcast: dict[tuple[int, Any], set[int]] = dataclasses.field(default_factory=dict)
  _ids: dict[tuple[int, Any, int], Node] = dataclasses.field(default_factory=dict)
  scope: int = 0
  equation: int = 0

  def axes(self, var: Any) -> list[Node] | None:
    """The nodes of every axis of `var` in the current scope; None for a literal (a constant operand)."""
    if not _is_variable(var):
      return None
    shape = getattr(var.aval, "shape", ())
    out = []
    for axis, size in enumerate(shape):
      key = (self.scope, var, axis)
      if key not in self._ids:
        self._ids[key] = len(self.sizes)
        self.sizes.append(int(size))
      out.append(self._ids[key])
    return out

  def fresh(self, size: int) -> Node:
    """A node for an axis that no value has (the channel multiplier of a depthwise conv's output)."""
    self.sizes.append(int(size))
    return len(self.sizes) - 1

  def ignore(self, a: Node) -> None:
    """`a` is not a channel axis (a convolution window): its class never forms a group."""
    self.ignored.append(a)

  def kind(self, var: Any) -> str:
    """'data' if `var` depends on the model's inputs, 'param' if on variables only, else 'const'."""
    if not _is_variable(var):
      return "const"
    return self.kinds.get((self.scope, var), "const")

  def set_kind(self, var: Any, kind: str) -> None:
    if _is_variable(var):
      self.kinds[(self.scope, var)] = kind

  def origin(self, var: Any) -> frozenset[int]:
    """The origins of `var` (see `origins`); empty for parameters, constants and literals."""
    return self.origins.get((self.scope, var), frozenset()) if _is_variable(var) else frozenset()

  def set_origin(self, var: Any, origin: frozenset[int]) -> None:
    if _is_variable(var):
      self.origins[(self.scope, var)] = frozenset(origin)

  def set_broadcast(self, var: Any, axes: set[int]) -> None:
    self.broadcast[(self.scope, var)] = axes

  def broadcast_axes(self, var: Any) -> set[int]:
    return self.broadcast.get((self.scope, var), set())

  def join(self, a: Node) -> None:
    """Two independent data paths are added along `a` (a residual add)."""
    self.joins.append(a)

  def tie(self, a: Node, b: Node) -> None:
    """Axes `a` and `b` index the same channels in the same order (their sizes must be equal)."""
    if self.sizes[a] != self.sizes[b]:
      raise RuntimeError(f"internal: tied axes of sizes {self.sizes[a]} and {self.sizes[b]}")
    self.ties.append((a, b))

  def shift(self, a: Node, b: Node, offset: int, where: str) -> None:
    """Channel i of `a` is channel i + `offset` of `b`."""
    self.shifts.append((a, b, int(offset), where))

  def compose(self, whole: Node, parts: tuple[Node, ...], where: str) -> None:
    """`whole` is the row-major flatten of `parts` (the last part fastest)."""
    self.compositions.append((whole, tuple(parts), where))

  def fix(self, a: Node, reason: str) -> None:
    """No channel of `a` may be removed."""
    self.fixed.append((a, reason))

  def fix_range(self, a: Node, lo: int, hi: int, reason: str) -> None:
    """Positions [lo, hi) of `a` may not be removed (the others may)."""
    if hi > lo:
      self.fixed_ranges.append((a, lo, hi, reason))

  def approximate(self, a: Node, reason: str) -> None:
    """A reduction runs over `a`: removing channels is exact only where they are zero."""
    self.approximate_at.append((a, reason))

  def count_macs(self, macs: int, scaled_by: tuple[Node, ...]) -> None:
    """An equation does `macs` multiply-accumulates, proportional to the sizes of the `scaled_by` axes."""
    self.macs.append((int(macs), tuple(scaled_by)))

  def fix_all(self, variables: list[Any], reason: str) -> None:
    """Fixes every axis of every (non-literal) variable: the conservative rule for unknown primitives."""
    for var in variables:
      for node in self.axes(var) or ():
        self.fix(node, reason)
