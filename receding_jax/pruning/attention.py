"""Attention whose shape rules the jaxpr does not show, made visible to the coupling analysis.

`jax.nn.dot_product_attention` (what `nnx.MultiHeadAttention` runs by default, and what many models call)
checks in Python that query, key and value have one head dimension H, and scales the logits by
1/sqrt(H) read off the shape unless given ``scale=``. Its jaxpr is plain dot products in which the
value's head dimension is free: the analysis offered it for pruning, and the narrow model then failed
the shape check. While `coupling.analyze` traces, `marked()` wraps the function so that its query, key
and value first pass through `same_channels_p`, an identity primitive whose rule ties their head axes
and, where the scale is read off H (pruning it would change the logits), fixes them with the reason.

The wrapper is installed on `jax.nn` for the trace only (under a lock; other threads calling it meanwhile
get the same results). A model that captured the function before (``from jax.nn import
dot_product_attention``) is not marked: there the check still refuses the result. The primitive has an
identity implementation, lowering, batching and derivative, so a trace that jax caches (a jitted function
inside the model) still runs anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from receding_jax.pruning.relations import Relations
from receding_jax.pruning.rules import register_rule

SCALE_REASON = ("jax.nn.dot_product_attention needs equal query, key and value head dimensions and scales "
                "by 1/sqrt(head dimension) read off the shape (a fixed scale= would make them prunable together)")

same_channels_p = Primitive("same_channels")
same_channels_p.multiple_results = True
same_channels_p.def_impl(lambda *xs, **_: list(xs))
same_channels_p.def_abstract_eval(lambda *avals, **_: list(avals))
mlir.register_lowering(same_channels_p, mlir.lower_fun(lambda *xs, **_: list(xs), multiple_results=True))
ad.primitive_jvps[same_channels_p] = lambda primals, tangents, **p: (same_channels_p.bind(*primals, **p), tangents)
ad.primitive_transposes[same_channels_p] = lambda cts, *_, **__: list(cts)


def _batched(args, dims, *, axes: tuple[int, ...], reason: str | None):
  """vmap: each operand's marked axis moves up by one where its batch axis comes before it."""
  moved = tuple(a + (d is not None and d <= a) for a, d in zip(axes, dims, strict=True))  # None: unbatched.
  return same_channels_p.bind(*args, axes=moved, reason=reason), dims


batching.primitive_batchers[same_channels_p] = _batched


def same_channels(eqn, rel: Relations) -> None:
  """The coupling rule: each result is its operand; the marked axes index the same channels (tied), all
  fixed with `reason` when one is given."""
  tied = []
  for var, out, axis in zip(eqn.invars, eqn.outvars, eqn.params["axes"], strict=True):
    src, dst = rel.axes(var), rel.axes(out)
    if src is None:
      rel.fix_all([out], "a constant operand of attention")
    else:
      for a, b in zip(src, dst, strict=True):
        rel.tie(a, b)
    tied.append(dst[axis])
  for a, b in itertools.pairwise(tied):
    if rel.sizes[a] == rel.sizes[b]:
      rel.tie(a, b)
  if eqn.params["reason"]:
    for node in tied:
      rel.fix(node, eqn.params["reason"])


register_rule("same_channels", same_channels)


def _marked_attention(original: Any) -> Any:
  """`original` (jax.nn.dot_product_attention) with its query, key and value marked first."""
  @functools.wraps(original)
  def attention(query, key, value, *args, scale=None, **kwargs):
    arrays = [jnp.asarray(x) for x in (query, key, value)]
    axes = tuple(x.ndim - 1 for x in arrays)
    tied = same_channels_p.bind(*arrays, axes=axes, reason=None if scale is not None else SCALE_REASON)
    return original(*tied, *args, scale=scale, **kwargs)
  attention.receding_marked = True
  return attention


_lock = threading.Lock()
_state = {"depth": 0, "found": None}


@contextlib.contextmanager
def marked() -> Iterator[None]:
  """`jax.nn.dot_product_attention` marked (see the module docstring) while the block runs; reentrant."""
  with _lock:
    if _state["depth"] == 0:
      _state["found"] = jax.nn.dot_product_attention
      if not getattr(_state["found"], "receding_marked", False):
        jax.nn.dot_product_attention = _marked_attention(_state["found"])
    _state["depth"] += 1
  try:
    yield
  finally:
    with _lock:
      _state["depth"] -= 1
      if _state["depth"] == 0:
        jax.nn.dot_product_attention = _state["found"]
