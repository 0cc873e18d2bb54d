"""Coupled channels of any JAX function, found from its jaxpr: which parameter axes must be pruned together.

`analyze(fn, variables, *inputs)` traces ``fn(variables, *inputs)`` abstractly, lets every equation's
rule (`rules`) record how channels flow (`relations`), and resolves those relations into *groups*: sets
of parameter axes that index the same channels. Removing channel c of a group removes, from every member
axis, the entries that belong to c (an output channel of a conv kernel, the matching norm scale, bias and
running statistics, the next conv's input channel, the matching rows of a dense layer after a flatten).

Two passes. Ties (same channels, same order) are merged by union-find into *classes*; shifts (concatenate,
pad, slice) then place classes at offsets inside a group with a weighted union-find; compositions
(reshape merges and splits) make an axis a row-major product of classes, so a flattened feature map's
dense kernel rows belong to the channel group at every position. Inconsistent offsets or composed axes
that are also shifted make the group unprunable with that reason. The function's outputs, its inputs and
constants are fixed; positions added by zero padding are fixed.

Call primitives (jit, custom_jvp_call, custom_vjp_call, checkpoint, ...) are entered, one scope per call
site; any primitive without a rule fixes what it touches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from receding_jax.pruning.attention import marked
from receding_jax.pruning.relations import Relations
from receding_jax.pruning.rules import Rule, reshape_blocks, rules_with
from receding_jax.pruning.streams import inherit, provenance, record_joins, set_provenance, stream_roots
from receding_jax.selection import path_names

LeafKey = tuple[str, ...]
CALL_PRIMITIVES = {
    "jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr",
    "checkpoint": "jaxpr", "remat": "jaxpr", "named_call": "call_jaxpr",
}


@dataclasses.dataclass(frozen=True)
class Factor:
  """A stretch of `size` consecutive channels of group `group` (-1: no group), starting at `offset`."""

  group: int
  offset: int
  size: int


@dataclasses.dataclass(frozen=True)
class Group:
  """Channels pruned together.

  Attributes:
    index: position in `Coupling.groups`.
    size: number of channel positions (the union of its members' ranges).
    members: (leaf, axis) of every parameter axis indexed by the group's channels (whole or in part).
    fixed: bool [size], positions that can never be removed (zero padding, a model output, ...).
    status: 'prunable', 'approximate' (a reduction runs over the channels) or 'unprunable'.
    reasons: why a position is fixed or the group approximate, one line each.
    stream: two independent data paths are added on its channels (a residual stream, `streams`).
  """

  index: int
  size: int
  members: tuple[tuple[LeafKey, int], ...]
  fixed: np.ndarray
  status: str
  reasons: tuple[str, ...]
  stream: bool = False


@dataclasses.dataclass(frozen=True)
class Coupling:
  """The analysis of one function: its groups, every parameter axis's layout and its multiply-accumulates.

  `layouts[leaf][axis]` is that axis as a row-major product of factors (one factor unless it is a
  flatten); axes whose factors all have group -1 are left out. `macs` lists (MACs, factors) for every
  conv and dot product: the MACs scale with the kept share of each factor's channels.
  """

  groups: tuple[Group, ...]
  layouts: dict[LeafKey, dict[int, tuple[Factor, ...]]]
  macs: tuple[tuple[int, tuple[Factor, ...]], ...]
  leaves: tuple[LeafKey, ...]


def _sub_jaxpr(eqn) -> tuple[Any, Sequence[Any]] | None:
  """(jaxpr, consts) of a call primitive's body when its inputs and outputs line up with the equation's."""
  param = CALL_PRIMITIVES.get(eqn.primitive.name)
  body = eqn.params.get(param) if param else None
  if body is None:
    return None
  jaxpr, consts = (body.jaxpr, body.consts) if hasattr(body, "consts") else (body, ())
  if len(jaxpr.invars) != len(eqn.invars) or len(jaxpr.outvars) != len(eqn.outvars):
    return None
  return jaxpr, consts


def _tie_vars(rel: Relations, outer: list[int] | None, inner: list[int] | None) -> None:
  if outer is not None and inner is not None:
    for a, b in zip(outer, inner, strict=True):
      rel.tie(a, b)


def _fix_constants(rel: Relations, constvars: Sequence[Any]) -> None:
  for var in constvars:
    for node in rel.axes(var) or ():
      if rel.sizes[node] > 1:
        rel.fix(node, "a constant array of the model's code")


def _walk(jaxpr, rel: Relations, scopes: list[int], rules: Mapping[str, Rule]) -> None:
  for eqn in jaxpr.eqns:
    rel.equation += 1
    inherit(eqn, rel)  # Kind and origin (`streams`); a channel-mixing rule replaces the origin.
    sub = _sub_jaxpr(eqn)
    if sub is not None:
      body, _ = sub
      outer_in, outer_out = [rel.axes(v) for v in eqn.invars], [rel.axes(v) for v in eqn.outvars]
      carried = provenance(rel, eqn.invars)
      saved, rel.scope = rel.scope, scopes[0]
      scopes[0] += 1
      _fix_constants(rel, body.constvars)
      set_provenance(rel, body.invars, carried)
      for outer, var in zip(outer_in, body.invars, strict=True):
        _tie_vars(rel, outer, rel.axes(var))
      _walk(body, rel, scopes, rules)
      for outer, var in zip(outer_out, body.outvars, strict=True):
        _tie_vars(rel, outer, rel.axes(var))
      carried = provenance(rel, body.outvars)
      rel.scope = saved
      set_provenance(rel, eqn.outvars, carried)
      continue
    rule = rules.get(eqn.primitive.name)
    if rule is None:
      rel.fix_all([*eqn.invars, *eqn.outvars], f"primitive '{eqn.primitive.name}' has no coupling rule "
                  "(rules={name: rule} or receding_jax.pruning.register_rule adds one)")
    else:
      rule(eqn, rel)
    record_joins(eqn, rel)


class _UnionFind:
  """Union-find with offsets: `find(x)` = (root, d) with coordinate in root = coordinate in x + d."""

  def __init__(self, n: int):
    self.parent, self.delta = list(range(n)), [0] * n

  def find(self, x: int) -> tuple[int, int]:
    path = []
    while self.parent[x] != x:
      path.append(x)
      x = self.parent[x]
    total = 0
    for node in reversed(path):  # Compress: every node on the path points at the root.
      total += self.delta[node]
      self.parent[node], self.delta[node] = x, total
    return (x, self.delta[path[0]]) if path else (x, 0)

  def union(self, a: int, b: int, offset: int) -> bool:
    """Records coordinate(b) = coordinate(a) + offset; False if that contradicts what is known."""
    ra, da = self.find(a)
    rb, db = self.find(b)
    if ra == rb:
      return da == offset + db
    self.parent[ra], self.delta[ra] = rb, offset + db - da
    return True


def _unify_compositions(rel: Relations, uf: _UnionFind, spoiled: list[tuple[int, str]]) -> dict[int, tuple[int, ...]]:
  """Merges what compositions imply: one axis flattened from (c, m) and from (c, kh, kw) ties the c's and
  makes m the flatten of (kh, kw). Returns {class root: its part nodes}, iterated to a fixpoint."""
  todo, known = list(rel.compositions), set()
  while True:
    comps: dict[int, tuple[tuple[int, ...], str]] = {}
    changed = False
    for whole, parts, where in list(todo):
      root = uf.find(whole)[0]
      if root not in comps:
        comps[root] = (parts, where)
        continue
      old = comps[root][0]
      if [uf.find(p)[0] for p in old] == [uf.find(p)[0] for p in parts]:
        continue
      blocks = reshape_blocks(tuple(rel.sizes[p] for p in old), tuple(rel.sizes[p] for p in parts))
      if blocks is None or any(len(a) > 1 and len(b) > 1 for a, b in blocks):
        spoiled.extend((p, f"an axis is reshaped in two incompatible ways ({where})") for p in old + parts)
        continue
      for a, b in blocks:
        if len(a) == 1 and len(b) == 1:
          if uf.find(old[a[0]])[0] != uf.find(parts[b[0]])[0]:
            uf.union(old[a[0]], parts[b[0]], 0)
            changed = True
          continue
        new = (old[a[0]], tuple(parts[j] for j in b)) if len(a) == 1 else (parts[b[0]], tuple(old[j] for j in a))
        key = (uf.find(new[0])[0], tuple(uf.find(p)[0] for p in new[1]))
        if key not in known:
          known.add(key)
          todo.append((*new, where))
          changed = True
    if not changed:
      return {root: parts for root, (parts, _) in comps.items()}


def _classes(rel: Relations, spoiled: list[tuple[int, str]]) -> tuple[list[int], dict[int, tuple[int, ...]]]:
  """Phase 1: every node's class (tied axes) and each composed class's part classes."""
  uf = _UnionFind(len(rel.sizes))
  for a, b in rel.ties:
    uf.union(a, b, 0)
  comps = _unify_compositions(rel, uf, spoiled)
  cls = [uf.find(n)[0] for n in range(len(rel.sizes))]
  return cls, {cls[root]: tuple(cls[p] for p in parts) for root, parts in comps.items()}


@dataclasses.dataclass
class _Resolved:
  """Positions of every class (phase-1 root) inside its group (phase-2 root), and per-group facts."""

  place: dict[int, tuple[int, int]]  # class -> (group root, offset)
  compositions: dict[int, tuple[int, ...]]  # class -> its part classes
  spoiled: dict[int, list[str]]  # group root -> reasons the whole group is unprunable
  ignored: set[int]  # group roots that are not channels


def _resolve(rel: Relations, cls: list[int], compositions: dict[int, tuple[int, ...]],
             spoiled_nodes: list[tuple[int, str]]) -> _Resolved:
  """Phase 2: places classes at offsets in groups (shifts) and collects what spoils a group."""
  uf = _UnionFind(len(rel.sizes))
  spoiled: dict[int, list[str]] = {}
  for node, reason in spoiled_nodes:
    spoiled.setdefault(cls[node], []).append(reason)
  for a, b, offset, where in rel.shifts:
    if not uf.union(cls[a], cls[b], offset):
      spoiled.setdefault(cls[a], []).append(f"channels meet at two different offsets ({where})")
  place = {c: uf.find(c) for c in set(cls)}
  members_of: dict[int, int] = {}
  for root, _ in place.values():
    members_of[root] = members_of.get(root, 0) + 1
  for whole, parts in compositions.items():
    if members_of[place[whole][0]] > 1:
      for p in parts:
        spoiled.setdefault(p, []).append("a reshaped axis is also concatenated, padded or sliced")
  ignored = {cls[n] for n in rel.ignored}
  ignored |= {f for c in list(ignored) for f in _expand(c, compositions)}
  return _Resolved(place, compositions, _by_root(spoiled, place), {place[c][0] for c in ignored})


def _by_root(per_class: dict[int, list[str]], place: dict[int, tuple[int, int]]) -> dict[int, list[str]]:
  out: dict[int, list[str]] = {}
  for c, reasons in per_class.items():
    out.setdefault(place[c][0], []).extend(reasons)
  return out


def _expand(c: int, compositions: dict[int, tuple[int, ...]], depth: int = 0) -> tuple[int, ...]:
  """The leaf factor classes of class `c` (a composition of compositions flattens)."""
  if c not in compositions or depth > 8:
    return (c,)
  return tuple(f for p in compositions[c] for f in _expand(p, compositions, depth + 1))


def _class_factors(c: int, res: _Resolved, sizes: list[int]) -> list[tuple[int, int, int, int]]:
  """(class, group root, offset, size) of each leaf factor of class `c`."""
  return [(f, *res.place[f], sizes[f]) for f in _expand(c, res.compositions)]


def _group_spans(res: _Resolved, sizes: list[int]) -> dict[int, tuple[int, int]]:
  spans: dict[int, tuple[int, int]] = {}
  for c, (root, offset) in res.place.items():
    lo, hi = spans.get(root, (offset, offset + sizes[c]))
    spans[root] = (min(lo, offset), max(hi, offset + sizes[c]))
  return spans


def _mark(rel: Relations, cls: list[int], res: _Resolved, spans: dict[int, tuple[int, int]]):
  """Fixed positions and reasons per group root, and the roots of approximate groups."""
  fixed = {root: np.zeros(hi - lo, bool) for root, (lo, hi) in spans.items()}
  reasons: dict[int, list[str]] = {}

  def fix(c: int, lo: int | None, hi: int | None, reason: str) -> None:
    factors = _class_factors(c, res, rel.sizes)
    whole = len(factors) > 1 or lo is None
    for _, root, offset, size in factors:
      start = offset - spans[root][0]
      a, b = (start, start + size) if whole else (start + lo, start + hi)
      fixed[root][a:b] = True
      reasons.setdefault(root, []).append(reason)

  for node, reason in rel.fixed:
    fix(cls[node], None, None, reason)
  for node, lo, hi, reason in rel.fixed_ranges:
    fix(cls[node], lo, hi, reason)
  for root, why in res.spoiled.items():
    fixed[root][:] = True
    reasons.setdefault(root, []).extend(why)
  approximate: dict[int, list[str]] = {}
  for node, reason in rel.approximate_at:
    for _, root, _, _ in _class_factors(cls[node], res, rel.sizes):
      approximate.setdefault(root, []).append(reason)
  return fixed, reasons, approximate


def _unique(items: list[str]) -> tuple[str, ...]:
  return tuple(dict.fromkeys(items))


def _build(rel: Relations, param_nodes: list[tuple[LeafKey, list[int]]], leaves: tuple[LeafKey, ...]) -> Coupling:
  spoiled: list[tuple[int, str]] = []
  cls, compositions = _classes(rel, spoiled)
  res = _resolve(rel, cls, compositions, spoiled)
  spans = _group_spans(res, rel.sizes)
  fixed, reasons, approximate = _mark(rel, cls, res, spans)
  _is_group = lambda root: root not in res.ignored and spans[root][1] - spans[root][0] > 1
  index: dict[int, int] = {}
  raw_layouts: dict[LeafKey, dict[int, list[tuple[int, int, int, int]]]] = {}
  for leaf, nodes in param_nodes:
    for axis, node in enumerate(nodes):
      factors = _class_factors(cls[node], res, rel.sizes)
      if any(_is_group(root) for _, root, _, _ in factors):
        raw_layouts.setdefault(leaf, {})[axis] = factors
        for _, root, _, _ in factors:
          if _is_group(root):
            index.setdefault(root, len(index))

  def factor(root: int, offset: int, size: int) -> Factor:
    if not _is_group(root):
      return Factor(-1, 0, size)
    return Factor(index[root], offset - spans[root][0], size)

  layouts = {leaf: {axis: tuple(factor(*f[1:]) for f in fs) for axis, fs in axes.items()}
             for leaf, axes in raw_layouts.items()}
  members: dict[int, list[tuple[LeafKey, int]]] = {}
  for leaf, axes in layouts.items():
    for axis, fs in axes.items():
      for f in fs:
        if f.group >= 0 and (leaf, axis) not in members.setdefault(f.group, []):
          members[f.group].append((leaf, axis))
  streams = stream_roots(rel, lambda node: [f[1] for f in _class_factors(cls[node], res, rel.sizes)])
  groups = []
  for root, i in sorted(index.items(), key=lambda item: item[1]):
    lo, hi = spans[root]
    status = "unprunable" if fixed[root].all() else "approximate" if root in approximate else "prunable"
    why = _unique(reasons.get(root, []) + approximate.get(root, []))
    groups.append(Group(i, hi - lo, tuple(members.get(i, ())), fixed[root], status, why, root in streams))
  macs = []
  for count, nodes in rel.macs:
    seen = {}
    for node in nodes:
      for c, root, offset, size in _class_factors(cls[node], res, rel.sizes):
        seen.setdefault(c, (root, offset, size))
    fs = tuple(factor(*v) for v in seen.values() if v[0] in index)
    macs.append((count, tuple(f for f in fs if f.group >= 0)))
  return Coupling(tuple(groups), layouts, tuple(macs), leaves)


def analyze(fn: Callable[..., Any], variables: Any, *inputs: Any, rules: Mapping[str, Rule] | None = None) -> Coupling:
  """Finds the coupled channels of ``fn(variables, *inputs)``.

  Args:
    fn: a pure function of the variables (a pytree: Linen variables or an `nnx.State`) and the inputs,
      returning the predictions (every output axis is fixed: anchor only what the model predicts).
    variables: the variables, or their `jax.ShapeDtypeStruct`s (nothing is computed).
    *inputs: example inputs or their `jax.ShapeDtypeStruct`s.
    rules: {primitive name: rule} for this call only, added to (or replacing) the built-in `rules.RULES`.

  Returns:
    A `Coupling`: groups of parameter axes, each 'prunable', 'approximate' or 'unprunable' with reasons.
  """
  table = rules_with(rules)  # Bad rules fail before the trace.
  with marked():  # Attention's shape rules made visible to the rules (`attention`).
    closed = jax.make_jaxpr(fn)(variables, *inputs)
  jaxpr = closed.jaxpr
  leaves = tuple(path_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(variables))
  rel = Relations()
  _fix_constants(rel, jaxpr.constvars)
  param_nodes = [(leaf, rel.axes(var)) for leaf, var in zip(leaves, jaxpr.invars, strict=False)]
  for var in jaxpr.invars[:len(leaves)]:
    rel.set_kind(var, "param")
  for number, var in enumerate(jaxpr.invars[len(leaves):]):
    rel.set_kind(var, "data")
    rel.set_origin(var, frozenset({-1 - number}))
    for node in rel.axes(var) or ():
      rel.fix(node, "an axis of the model's input")
  _walk(jaxpr, rel, [1], table)
  for var in jaxpr.outvars:
    for node in rel.axes(var) or ():
      rel.fix(node, "an axis of the model's output")
  return _build(rel, param_nodes, leaves)
