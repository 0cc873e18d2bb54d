"""Sparsity penalties on norm scales, as pure functions and as optax gradient transformations.

Each penalty is a scalar function of a parameter pytree restricted by a mask (see `selection`), and
each ``add_*`` transform adds ``strength * grad(penalty)(params)`` to the incoming updates. Place the
transform *before* the optimiser in `optax.chain`, so that the penalty's gradient goes through
momentum exactly as if the penalty had been added to the loss:

    tx = optax.chain(add_receding_penalty(1e-3, shift=3.0), optax.sgd(0.1, momentum=0.9, nesterov=True))

Penalties (s = sigmoid(w + shift), gamma = BatchNorm scale):
  - receding (this method):  sum_c s_c * (1 - log s_c); its gradient, -s (1 - s) log s, is >= 0, so
    descent only pushes logits down, and the push vanishes for clearly important channels (s -> 1).
  - L1 (Network Slimming, Liu et al. 2017):  sum_c |gamma_c|.
  - polarization (Zhuang et al. 2020):  t * sum_c |gamma_c| - sum_c |gamma_c - mean(gamma)|, with the
    sums and the mean over the gammas of all masked layers together. Their recipe also clips gamma to
    [0, 1] after every step: chain `project_to_interval(0.0, 1.0)` *after* the optimiser.

`params` may be Linen parameters or a `flax.nnx.State` (``nnx.state(model, nnx.Param)``, as
`nnx.Optimizer` passes them, or a whole ``nnx.state(model)``). A default mask that finds no leaf, or a
given mask that selects none, raises ValueError: a penalty over nothing would silently be 0.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from receding_jax.selection import (
    MaskSpec,
    PyTree,
    batch_norm_scale_mask,
    bounded_logit_mask,
    select_leaves,
)

LeafPenalty = Callable[[Sequence[jax.Array]], jax.Array]


def _as_float32(leaf: jax.Array) -> jax.Array:
  return jnp.asarray(leaf).astype(jnp.promote_types(jnp.asarray(leaf).dtype, jnp.float32))


@jax.custom_jvp
def _receding_elementwise(x: jax.Array) -> jax.Array:
  """s (1 - log s) with s = sigmoid(x), via log-sigmoid: finite for any finite x."""
  log_s = jax.nn.log_sigmoid(x)
  return jnp.exp(log_s) * (1.0 - log_s)


@_receding_elementwise.defjvp
def _receding_elementwise_jvp(primals, tangents):
  # d/dx = -s (1 - s) log s, written with sigmoid(-x) for 1 - s: autodiff of the product above would
  # cancel two nearly equal terms and lose all relative precision for large logits.
  (x,), (dx,) = primals, tangents
  log_s = jax.nn.log_sigmoid(x)
  s = jnp.exp(log_s)
  return s * (1.0 - log_s), -s * jax.nn.sigmoid(-x) * log_s * dx


def _receding_of_leaves(leaves: Sequence[jax.Array], shift: float) -> jax.Array:
  """sum over leaves of s (1 - log s), s = sigmoid(w + shift), in float32."""
  total = jnp.zeros((), jnp.float32)
  for w in leaves:
    total = total + jnp.sum(_receding_elementwise(_as_float32(w) + shift))
  return total


def _l1_of_leaves(leaves: Sequence[jax.Array]) -> jax.Array:
  return sum((jnp.sum(jnp.abs(_as_float32(g))) for g in leaves), jnp.zeros((), jnp.float32))


def _polarization_of_leaves(leaves: Sequence[jax.Array], t: float) -> jax.Array:
  if not leaves:
    return jnp.zeros((), jnp.float32)
  gammas = jnp.concatenate([jnp.ravel(_as_float32(g)) for g in leaves])
  return t * jnp.sum(jnp.abs(gammas)) - jnp.sum(jnp.abs(gammas - jnp.mean(gammas)))


def _selected(params: PyTree, mask: MaskSpec, default, caller: str) -> list[jax.Array]:
  if isinstance(params, nnx.Module):  # An NNX model: its parameters (and, for BatchNorms, statistics).
    params = nnx.state(params)
  flags = select_leaves(mask, params, default, caller)
  return [leaf for leaf, keep in zip(jax.tree.leaves(params), flags, strict=True) if keep]


def receding_penalty(params: PyTree, shift: float = 0.0, mask: MaskSpec = None) -> jax.Array:
  """The receding penalty sum_c s_c (1 - log s_c), s_c = sigmoid(w_c + shift), a float32 scalar.

  Args:
    params: parameter pytree (``variables['params']``, an `nnx.State`) or an NNX module.
    shift: b in the paper; larger values push channels with higher importance too (VGG: 3).
    mask: which leaves are bounded-norm logits; default: every ``scale_logit``.
  """
  return _receding_of_leaves(_selected(params, mask, bounded_logit_mask, "receding_penalty"), shift)


def l1_penalty(params: PyTree, mask: MaskSpec = None) -> jax.Array:
  """Network Slimming's sum_c |gamma_c| over BatchNorm scales (default mask), a float32 scalar."""
  return _l1_of_leaves(_selected(params, mask, batch_norm_scale_mask, "l1_penalty"))


def polarization_penalty(params: PyTree, t: float, mask: MaskSpec = None) -> jax.Array:
  """Zhuang et al.'s t * sum|gamma| - sum|gamma - mean(gamma)|, over all masked scales together."""
  _check_non_negative("t", t)
  return _polarization_of_leaves(_selected(params, mask, batch_norm_scale_mask, "polarization_penalty"), t)


def _check_non_negative(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
  if not value >= 0:
    raise ValueError(f"{name} must be >= 0, got {value!r}")


class PenaltyScheduleState(NamedTuple):
  """State of a penalty transform whose strength follows a schedule: the number of steps taken."""

  count: jax.Array


def _add_penalty_gradient(
    leaf_penalty: LeafPenalty, strength: float | optax.Schedule, mask: MaskSpec, default, caller: str
) -> optax.GradientTransformation:
  """updates + strength * grad(leaf_penalty)(masked params); only the masked leaves are touched.

  A constant strength keeps no state (`optax.EmptyState`); a schedule (step -> strength) keeps a count.
  `init` already refuses a mask that selects nothing, so a model without the penalised norm fails
  before training rather than training without a penalty.
  """
  scheduled = callable(strength)
  if not scheduled:
    _check_non_negative("strength", strength)

  def init_fn(params):
    select_leaves(mask, params, default, caller)  # Fail early on a bad mask.
    if scheduled:
      return PenaltyScheduleState(count=jnp.zeros((), jnp.int32))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("penalty transforms need the parameters: call update(updates, state, params)")
    flags = select_leaves(mask, params, default, caller)
    leaves = jax.tree.leaves(params)
    chosen = [i for i, keep in enumerate(flags) if keep]
    grads = jax.grad(leaf_penalty)([leaves[i] for i in chosen])
    if scheduled:
      scale, state = strength(state.count), PenaltyScheduleState(count=optax.safe_increment(state.count))
    else:
      scale = strength
    flat_updates, treedef = jax.tree.flatten(updates)
    for i, g in zip(chosen, grads, strict=True):
      flat_updates[i] = flat_updates[i] + (scale * g).astype(flat_updates[i].dtype)
    return jax.tree.unflatten(treedef, flat_updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def add_receding_penalty(
    strength: float | optax.Schedule, shift: float = 0.0, mask: MaskSpec = None
) -> optax.GradientTransformation:
  """Adds strength * grad(receding_penalty) to the updates (see `receding_penalty`).

  Paper settings: VGG-16 strength 1e-3, shift 3; ResNet-56 strength 1e-4, shift 0 (160 epochs, batch 64).
  """
  return _add_penalty_gradient(
      lambda leaves: _receding_of_leaves(leaves, shift), strength, mask, bounded_logit_mask, "add_receding_penalty"
  )


def add_l1_penalty(strength: float | optax.Schedule, mask: MaskSpec = None) -> optax.GradientTransformation:
  """Adds strength * sign(gamma) on BatchNorm scales (Network Slimming; paper: 1e-4 VGG, 1e-5 ResNet)."""
  return _add_penalty_gradient(_l1_of_leaves, strength, mask, batch_norm_scale_mask, "add_l1_penalty")


def add_polarization_penalty(
    strength: float | optax.Schedule, t: float, mask: MaskSpec = None
) -> optax.GradientTransformation:
  """Adds strength * grad(polarization_penalty); chain `project_to_interval(0, 1)` after the optimiser.

  Zhuang et al.'s settings: ResNet-56 strength 5e-5, t 1.4; VGG-16 3e-5, t 1.5; ResNet-50 8e-5, t 1.2.
  """
  _check_non_negative("t", t)
  return _add_penalty_gradient(
      lambda leaves: _polarization_of_leaves(leaves, t), strength, mask, batch_norm_scale_mask,
      "add_polarization_penalty",
  )


def project_to_interval(
    lower: float = 0.0, upper: float = 1.0, mask: MaskSpec = None
) -> optax.GradientTransformation:
  """Changes the final updates so that masked parameters end in [lower, upper] after `apply_updates`.

  Chain it last (after the optimiser): polarization's recipe clips BatchNorm scales to [0, 1] after
  every step. Default mask: BatchNorm scales. `init` refuses a mask that selects nothing.
  """
  if not lower <= upper:
    raise ValueError(f"project_to_interval needs lower <= upper, got lower={lower!r}, upper={upper!r}")

  def init_fn(params):
    select_leaves(mask, params, batch_norm_scale_mask, "project_to_interval")
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("project_to_interval needs the parameters: call update(updates, state, params)")
    flags = select_leaves(mask, params, batch_norm_scale_mask, "project_to_interval")
    flat_updates, treedef = jax.tree.flatten(updates)
    for i, (p, keep) in enumerate(zip(jax.tree.leaves(params), flags, strict=True)):
      if keep:
        flat_updates[i] = jnp.clip(p + flat_updates[i], lower, upper) - p
    return jax.tree.unflatten(treedef, flat_updates), state

  return optax.GradientTransformation(init_fn, update_fn)
