"""How each primitive couples the channels of its operands and results: one rule per primitive.

A rule is ``rule(eqn, rel)``: it reads one jaxpr equation and records relations between the axes of its
inputs and outputs on `rel` (`relations.Relations`: tie, shift, compose, fix, approximate). Give rules
for one call with ``rules={name: rule}`` (`prune_params`, `channel_masks`, `trace`, `analyze`, ...): they
add to or replace the built-in ones for that call only. `register_rule(name, rule)` adds one for every call
in the process (`RULES`). A primitive without a rule fixes every axis it touches (nothing coupled through
it can be pruned), naming itself as the reason.

Documented rules (the exact coupling; "fix" = those channels are never removed):
- elementwise ops (add, mul, max, exp, select_n, convert_element_type, ...): ties axis i of each operand
  to axis i of the result, except where the operand broadcasts (size 1);
- broadcast_in_dim, transpose, squeeze, expand_dims: ties the axes they carry over;
- rev: ties every axis to the result's; a reversed axis is fixed (a window of a conv: harmless);
- reshape: ties axes that survive unchanged; a merge (flatten) or a split records a composition; an
  axis both merged and split is fixed;
- dot_general: ties contracted and batch axes across operands and the free/batch axes to the result;
  its result is a new origin (`streams`), as is a conv's other than a depthwise one;
- conv_general_dilated: ties input features to the kernel's input axis and the kernel's output axis to
  the result's features; a depthwise conv (groups = input features, one kernel input channel) ties all
  three (with a channel multiplier m, output channel c * m + j reads input channel c: a composition, as in
  `conv_general_dilated_patches`); other grouped convs are fixed; window axes are not channels;
- reduce_sum/max/min/prod, cumulative ops: the reduced axis is *approximate*, the others are tied;
  argmax/argmin, sort, top_k: the reduced axis is fixed;
- reduce_window (pooling): an axis with window 1, stride 1 and no padding is tied, others fixed;
- pad, concatenate, slice, split: shifts by the offsets (padded positions fixed); strided or interior-
  padded axes are fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from receding_jax.pruning.relations import Relations

Rule = Callable[[Any, Relations], None]
RULES: dict[str, Rule] = {}


def register_rule(primitive: str, rule: Rule) -> None:
  """Registers (or replaces) the coupling rule of the primitive named `primitive` (``eqn.primitive.name``)."""
  if not isinstance(primitive, str) or not callable(rule):
    raise TypeError(f"register_rule needs a primitive name and a callable rule, got {primitive!r}, {rule!r}")
  RULES[primitive] = rule


def rules_with(extra: Mapping[str, Rule] | None = None) -> dict[str, Rule]:
  """The rules of one analysis: `RULES` with `extra` ({primitive name: rule}) added or replacing them, as a
  new dict (`RULES` itself is never changed by a call)."""
  extra = dict(extra or {})
  for primitive, rule in extra.items():
    if not isinstance(primitive, str) or not callable(rule):
      raise TypeError(f"rules must map primitive names to callable rules, got {primitive!r}: {rule!r}")
  return {**RULES, **extra}


def _shape(var: Any) -> tuple[int, ...]:
  return tuple(getattr(var.aval, "shape", ()))


def _tie_same(rel: Relations, a: list[int] | None, b: list[int] | None, pairs) -> None:
  """Ties a[i] to b[j] for every (i, j) in `pairs` whose sizes agree (a size-1 broadcast is not a tie)."""
  if a is None or b is None:
    return
  for i, j in pairs:
    if rel.sizes[a[i]] == rel.sizes[b[j]]:
      rel.tie(a[i], b[j])


ELEMENTWISE = (
    "abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp conj convert_element_type copy copy_p "
    "cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite le lgamma "
    "log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem round rsqrt "
    "select_n shift_left shift_right_arithmetic shift_right_logical sign sin sinh sqrt square stop_gradient sub tan "
    "tanh xor"
).split()


def elementwise(eqn, rel: Relations) -> None:
  out = rel.axes(eqn.outvars[0])
  ndim = len(out)
  for var in eqn.invars:  # Where an add joins a residual stream is `streams.record_joins`'s business.
    axes = rel.axes(var)
    if axes is not None and len(axes) == ndim:
      _tie_same(rel, axes, out, [(i, i) for i in range(ndim)])
  for extra in eqn.outvars[1:]:
    _tie_same(rel, rel.axes(extra), out, [(i, i) for i in range(ndim)])


def broadcast_in_dim(eqn, rel: Relations) -> None:
  dims = eqn.params["broadcast_dimensions"]
  src, out = rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0])
  _tie_same(rel, src, out, list(enumerate(dims)))
  kept = {j for i, j in enumerate(dims) if src is not None and rel.sizes[src[i]] == rel.sizes[out[j]]}
  rel.set_broadcast(eqn.outvars[0], {j for j in range(len(out)) if j not in kept})


def transpose(eqn, rel: Relations) -> None:
  perm = eqn.params["permutation"]
  _tie_same(rel, rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0]), [(p, i) for i, p in enumerate(perm)])


def rev(eqn, rel: Relations) -> None:
  """Ties every axis to the result's; a reversed axis is also fixed (its channels come out in the opposite
  order), which costs nothing where it is a convolution window (a transposed conv's flipped kernel)."""
  src, out = rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0])
  _tie_same(rel, src, out, [(i, i) for i in range(len(src))])
  for i in eqn.params["dimensions"]:
    if rel.sizes[src[i]] > 1:
      rel.fix(src[i], "rev (reversed order) over this axis")


def squeeze(eqn, rel: Relations) -> None:
  src = rel.axes(eqn.invars[0])
  dropped = {d % len(src) for d in eqn.params["dimensions"]}
  kept = [i for i in range(len(src)) if i not in dropped]
  _tie_same(rel, src, rel.axes(eqn.outvars[0]), list(zip(kept, range(len(kept)), strict=True)))


def expand_dims(eqn, rel: Relations) -> None:
  src, out = rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0])
  added = {d % len(out) for d in eqn.params["dimensions"]}
  kept = [i for i in range(len(out)) if i not in added]
  _tie_same(rel, src, out, list(zip(range(len(src)), kept, strict=True)))


def reshape_blocks(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
  """Splits two shapes with equal products into aligned blocks of axes with equal products (size-1 axes
  dropped); None when they do not align."""
  ia = [i for i, s in enumerate(a) if s != 1]
  ib = [i for i, s in enumerate(b) if s != 1]
  blocks, i, j = [], 0, 0
  while i < len(ia) or j < len(ib):
    if i == len(ia) or j == len(ib):
      return None
    ba, bb, pa, pb = [ia[i]], [ib[j]], a[ia[i]], b[ib[j]]
    i, j = i + 1, j + 1
    while pa != pb:
      if pa < pb and i < len(ia):
        ba.append(ia[i]), (pa := pa * a[ia[i]])
        i += 1
      elif pb < pa and j < len(ib):
        bb.append(ib[j]), (pb := pb * b[ib[j]])
        j += 1
      else:
        return None
    blocks.append((ba, bb))
  return blocks


def reshape(eqn, rel: Relations) -> None:
  src, out = rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0])
  blocks = reshape_blocks(_shape(eqn.invars[0]), _shape(eqn.outvars[0]))
  if blocks is None or src is None:
    rel.fix_all([*eqn.invars, *eqn.outvars], "reshape with unaligned axes")
    return
  for ins, outs in blocks:
    if len(ins) == 1 and len(outs) == 1:
      rel.tie(src[ins[0]], out[outs[0]])
    elif len(outs) == 1:
      rel.compose(out[outs[0]], tuple(src[i] for i in ins), "reshape (merge)")
    elif len(ins) == 1:
      rel.compose(src[ins[0]], tuple(out[i] for i in outs), "reshape (split)")
    else:
      for node in [src[i] for i in ins] + [out[i] for i in outs]:
        rel.fix(node, "reshape that both merges and splits axes")


def dot_general(eqn, rel: Relations) -> None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs, out = rel.axes(eqn.invars[0]), rel.axes(eqn.invars[1]), rel.axes(eqn.outvars[0])
  if lhs is None or rhs is None:
    rel.fix_all([*eqn.invars, *eqn.outvars], "dot_general with a constant operand")
    return
  _tie_same(rel, lhs, rhs, list(zip(lc, rc, strict=True)) + list(zip(lb, rb, strict=True)))
  lfree = [i for i in range(len(lhs)) if i not in lc and i not in lb]
  rfree = [i for i in range(len(rhs)) if i not in rc and i not in rb]
  _tie_same(rel, lhs, out, [(d, k) for k, d in enumerate([*lb, *lfree])])
  _tie_same(rel, rhs, out, [(d, len(lb) + len(lfree) + k) for k, d in enumerate(rfree)])
  rel.set_origin(eqn.outvars[0], frozenset({rel.equation}))
  rel.count_macs(int(np.prod(_shape(eqn.outvars[0]))) * int(np.prod([rel.sizes[lhs[i]] for i in lc])),
                 tuple(out) + tuple(lhs[i] for i in lc))


def conv_general_dilated(eqn, rel: Relations) -> None:
  dn = eqn.params["dimension_numbers"]
  lhs, rhs, out = rel.axes(eqn.invars[0]), rel.axes(eqn.invars[1]), rel.axes(eqn.outvars[0])
  if lhs is None or rhs is None:
    rel.fix_all([*eqn.invars, *eqn.outvars], "conv_general_dilated with a constant operand")
    return
  (lbatch, lfeat, *_), (rout, rin, *rspatial), (obatch, ofeat, *_) = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  groups, batch_groups = eqn.params["feature_group_count"], eqn.params["batch_group_count"]
  if rel.sizes[lhs[lbatch]] == rel.sizes[out[obatch]]:
    rel.tie(lhs[lbatch], out[obatch])
  window = int(np.prod([rel.sizes[rhs[i]] for i in rspatial]))
  for axes, spatial in ((rhs, rspatial), (lhs, dn.lhs_spec[2:]), (out, dn.out_spec[2:])):
    for i in spatial:  # Windows and the maps they slide over are positions, not channels.
      rel.ignore(axes[i])
  macs = int(np.prod(_shape(eqn.outvars[0]))) * rel.sizes[rhs[rin]] * window
  in_features, out_features = rel.sizes[lhs[lfeat]], rel.sizes[out[ofeat]]
  if batch_groups != 1:
    rel.fix_all([*eqn.invars, *eqn.outvars], f"convolution with batch_group_count={batch_groups}")
  elif groups == 1:
    rel.tie(lhs[lfeat], rhs[rin])
    rel.tie(rhs[rout], out[ofeat])
    rel.set_origin(eqn.outvars[0], frozenset({rel.equation}))
    rel.count_macs(macs, (out[ofeat], rhs[rin]))
  elif groups == in_features and rel.sizes[rhs[rin]] == 1 and out_features % groups == 0:
    rel.tie(rhs[rout], out[ofeat])  # Depthwise: output channel c * m + j reads input channel c.
    if out_features == groups:
      rel.tie(lhs[lfeat], out[ofeat])
    else:
      multiplier = rel.fresh(out_features // groups)
      rel.ignore(multiplier)
      rel.compose(out[ofeat], (lhs[lfeat], multiplier), "depthwise convolution with a channel multiplier")
    if rel.kind(eqn.invars[1]) != "const":  # A constant one-hot kernel is a gather (image patches), not MACs.
      rel.count_macs(macs, (lhs[lfeat],))
  else:
    reason = f"grouped convolution (feature_group_count={groups})"
    for node in (lhs[lfeat], rhs[rin], rhs[rout], out[ofeat]):
      rel.fix(node, reason)
    rel.set_origin(eqn.outvars[0], frozenset({rel.equation}))


def _reduction(approximate: bool):
  def rule(eqn, rel: Relations) -> None:
    src = rel.axes(eqn.invars[0])
    reduced = set(eqn.params["axes"])
    kept = [i for i in range(len(src)) if i not in reduced]
    for out in eqn.outvars:
      _tie_same(rel, src, rel.axes(out), list(zip(kept, range(len(kept)), strict=True)))
    for i in reduced:
      if approximate:
        rel.approximate(src[i], f"{eqn.primitive.name} over this axis")
      else:
        rel.fix(src[i], f"{eqn.primitive.name} over this axis")
  return rule


def _along_axis(param: str, approximate: bool):
  """Ops that act along one axis (cumsum, sort, argmax) and keep the others."""
  def rule(eqn, rel: Relations) -> None:
    src = rel.axes(eqn.invars[0])
    axis = (len(src) - 1) if param is None else eqn.params[param] % len(src)
    for var in eqn.outvars:
      out = rel.axes(var)
      if len(out) == len(src):
        _tie_same(rel, src, out, [(i, i) for i in range(len(src)) if i != axis])
      else:
        _tie_same(rel, src, out, [(i, k) for k, i in enumerate(j for j in range(len(src)) if j != axis)])
    for var in eqn.invars[1:]:
      axes = rel.axes(var)
      if axes is not None and len(axes) == len(src):
        _tie_same(rel, src, axes, [(i, i) for i in range(len(src))])
    if approximate:
      rel.approximate(src[axis], f"{eqn.primitive.name} along this axis")
    else:
      rel.fix(src[axis], f"{eqn.primitive.name} along this axis")
  return rule


def reduce_window(eqn, rel: Relations) -> None:
  src, out = rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0])
  window, strides = eqn.params["window_dimensions"], eqn.params["window_strides"]
  padding = eqn.params.get("padding", ((0, 0),) * len(src))
  dilation = eqn.params.get("base_dilation", (1,) * len(src))
  for i, (w, s, p, d) in enumerate(zip(window, strides, padding, dilation, strict=True)):
    if w == 1 and s == 1 and tuple(p) == (0, 0) and d == 1:
      rel.tie(src[i], out[i])
    else:
      rel.fix(src[i], f"{eqn.primitive.name} with a window over this axis")
      rel.fix(out[i], f"{eqn.primitive.name} with a window over this axis")


def pad(eqn, rel: Relations) -> None:
  src, out = rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0])
  for i, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
    if (lo, hi, interior) == (0, 0, 0):
      rel.tie(src[i], out[i])
    elif interior == 0:
      rel.shift(src[i], out[i], lo, "pad")
      rel.fix_range(out[i], 0, max(lo, 0), "zero padding")
      rel.fix_range(out[i], min(lo + rel.sizes[src[i]], rel.sizes[out[i]]), rel.sizes[out[i]], "zero padding")
    else:
      rel.fix(src[i], "pad with interior padding")
      rel.fix(out[i], "pad with interior padding")


def concatenate(eqn, rel: Relations) -> None:
  out = rel.axes(eqn.outvars[0])
  dim, offset = eqn.params["dimension"], 0
  for var in eqn.invars:
    src = rel.axes(var)
    if src is None:
      rel.fix(out[dim], "concatenation with a constant")
      offset += _shape(var)[dim]
      continue
    _tie_same(rel, src, out, [(i, i) for i in range(len(src)) if i != dim])
    rel.shift(src[dim], out[dim], offset, "concatenate")
    offset += rel.sizes[src[dim]]


def split(eqn, rel: Relations) -> None:
  src = rel.axes(eqn.invars[0])
  axis, offset = eqn.params["axis"], 0
  for var in eqn.outvars:
    out = rel.axes(var)
    _tie_same(rel, src, out, [(i, i) for i in range(len(src)) if i != axis])
    rel.shift(out[axis], src[axis], offset, "split")
    offset += rel.sizes[out[axis]]


def slice_rule(eqn, rel: Relations) -> None:
  src, out = rel.axes(eqn.invars[0]), rel.axes(eqn.outvars[0])
  strides = eqn.params["strides"] or (1,) * len(src)
  for i, (start, stride) in enumerate(zip(eqn.params["start_indices"], strides, strict=True)):
    if rel.sizes[src[i]] == rel.sizes[out[i]]:
      rel.tie(src[i], out[i])
    elif stride == 1:
      rel.shift(out[i], src[i], start, "slice")
    else:
      rel.fix(src[i], "strided slice over this axis")
      rel.fix(out[i], "strided slice over this axis")


def no_coupling(eqn, rel: Relations) -> None:
  """Primitives whose outputs do not depend on channels of inputs (iota, random bits of a key)."""


for _name in ELEMENTWISE:
  register_rule(_name, elementwise)
for _name, _rule in {
    "broadcast_in_dim": broadcast_in_dim, "transpose": transpose, "squeeze": squeeze, "expand_dims": expand_dims,
    "rev": rev,
    "reshape": reshape, "dot_general": dot_general, "conv_general_dilated": conv_general_dilated,
    "reduce_sum": _reduction(True), "reduce_max": _reduction(True), "reduce_min": _reduction(True),
    "reduce_prod": _reduction(True), "reduce_and": _reduction(True), "reduce_or": _reduction(True),
    "argmax": _reduction(False), "argmin": _reduction(False),
    "cumsum": _along_axis("axis", True), "cumprod": _along_axis("axis", True),
    "cummax": _along_axis("axis", True), "cummin": _along_axis("axis", True),
    "cumlogsumexp": _along_axis("axis", True), "sort": _along_axis("dimension", False),
    "top_k": _along_axis(None, False), "reduce_window_sum": reduce_window,
    "reduce_window_max": reduce_window, "reduce_window_min": reduce_window, "reduce_window": reduce_window,
    "pad": pad, "concatenate": concatenate, "split": split, "slice": slice_rule, "iota": no_coupling,
}.items():
  register_rule(_name, _rule)
