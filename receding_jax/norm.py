"""Bounded scaler normalisation: BatchNorm whose per-channel scale is sigmoid(logit).

The maths lives in pure functions (`batch_moments`, `normalize`, `update_running_average`) so it can be
used without the module; `BoundedScaleNorm` is a thin Linen shell that owns the logits (``params``) and
the running statistics (``batch_stats``), with the interface of `flax.linen.BatchNorm`.

Statistics in data-parallel training: under `jax.jit` with the batch sharded over a mesh, the reductions
below run over the *global* batch (XLA inserts the collectives). Per-device statistics are only what you
get by running the module inside `shard_map` without ``axis_name``; with ``axis_name`` set there, the
statistics are averaged over that axis, i.e. global again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Axes = int | Sequence[int]

#: Name of the learnable per-channel logit in ``params``; importance = sigmoid(logit).
LOGIT_NAME = "scale_logit"


def canonicalize_axes(ndim: int, axes: Axes) -> tuple[int, ...]:
  """Returns `axes` as sorted non-negative ints; raises ValueError naming any axis out of range."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  out = []
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(f"norm axis {axis} is out of range for an input with {ndim} dimensions")
    out.append(axis % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"norm axes {axes} name the same dimension twice")
  return tuple(sorted(out))


def bounded_scale(logit: jax.Array) -> jax.Array:
  """The bounded per-channel scale, sigmoid(logit), in (0, 1): the channel's importance."""
  return jax.nn.sigmoid(logit)


def batch_moments(
    x: jax.Array,
    reduction_axes: Sequence[int],
    axis_name: str | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array]:
  """Per-channel batch mean and biased variance of `x` over `reduction_axes`, in at least float32.

  Two-pass (var = E[(x - E[x])^2]), so it stays accurate for inputs with a large mean. With `axis_name`
  (inside `shard_map`/`vmap`) both moments are averaged over that named axis.
  """
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = tuple(reduction_axes)

  def mean_over_batch(v):
    m = v.mean(axes)
    if axis_name is not None:
      m = jax.lax.pmean(m, axis_name, axis_index_groups=axis_index_groups)
    return m

  mean = mean_over_batch(x)
  centred = x - jnp.expand_dims(mean, axes)
  var = mean_over_batch(jnp.square(centred))
  return mean, var


def normalize(
    x: jax.Array,
    mean: jax.Array,
    var: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    feature_axes: Sequence[int],
    epsilon: float,
    dtype: Any = None,
) -> jax.Array:
  """(x - mean) * scale / sqrt(var + epsilon) + bias, with per-channel arrays of shape [features].

  `feature_axes` are the (canonical) axes of `x` the per-channel arrays run along. The result has
  `dtype`, or else the promotion of `x`, `scale` and `bias` (as `flax.linen.BatchNorm` does).
  """
  feature_axes = tuple(feature_axes)
  shape = [1] * x.ndim
  for ax in feature_axes:
    shape[ax] = x.shape[ax]

  def expand(v):
    return jnp.reshape(v, shape)

  mul = jax.lax.rsqrt(expand(var) + epsilon)
  if scale is not None:
    mul = mul * expand(scale)
  y = (x - expand(mean)) * mul
  if bias is not None:
    y = y + expand(bias)
  if dtype is None:
    dtype = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
  return y.astype(dtype)


def update_running_average(running: jax.Array, batch_value: jax.Array, momentum: float) -> jax.Array:
  """Exponential moving average, Flax convention: momentum * running + (1 - momentum) * batch_value.

  PyTorch's momentum 0.1 is Flax's 0.9.
  """
  return momentum * running + (1.0 - momentum) * batch_value


class BoundedScaleNorm(nn.Module):
  """BatchNorm with a bounded scale: y = sigmoid(w_c) * (x - mean_c) / sqrt(var_c + eps) [+ bias_c].

  Interface of `flax.linen.BatchNorm` (same meaning of every shared attribute), with the method's
  defaults: ``momentum=0.9`` (PyTorch's 0.1) and no bias. Variables:
    - ``params/scale_logit``: one logit per channel, init Normal(0, 1); importance = sigmoid(logit).
    - ``params/bias`` (only with ``use_bias``), init 0.
    - ``batch_stats/mean``, ``batch_stats/var``: float32 running statistics (biased variance, as Flax).

  Attributes:
    use_running_average: normalise with the running statistics (evaluation) instead of the batch's.
    axis: the feature axis or axes (channels); negative values count from the end.
    momentum: decay of the running averages (Flax convention).
    epsilon: added to the variance.
    dtype: output dtype; ``None`` promotes input and parameters (bf16 input, f32 params -> f32).
    param_dtype: dtype of the logits and bias.
    use_bias: learn an additive per-channel bias (the paper has none).
    logit_init: initializer of the logits.
    bias_init: initializer of the bias.
    axis_name, axis_index_groups: average statistics over a named axis (`shard_map`/`vmap` only; under
      `jax.jit` with sharded inputs the statistics are global without it).
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = False
  logit_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)
  bias_init: nn.initializers.Initializer = nn.initializers.zeros
  axis_name: str | None = None
  axis_index_groups: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """Normalises `x` (any rank, channels along `axis`) and scales each channel by sigmoid(logit)."""
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)

    self._check_stored_shapes(feature_shape)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)
    logit = self.param(LOGIT_NAME, self.logit_init, feature_shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = batch_moments(
          x,
          reduction_axes,
          axis_name=None if self.is_initializing() else self.axis_name,
          axis_index_groups=self.axis_index_groups,
      )
      if not self.is_initializing():
        ra_mean.value = update_running_average(ra_mean.value, mean, self.momentum)
        ra_var.value = update_running_average(ra_var.value, var, self.momentum)

    return normalize(
        x, mean, var, bounded_scale(logit), bias, feature_axes, self.epsilon, self.dtype
    )

  def _check_stored_shapes(self, feature_shape: tuple[int, ...]) -> None:
    """Raises ValueError if stored variables were made for another channel count than the input's."""
    names = [("batch_stats", "mean"), ("batch_stats", "var"), ("params", LOGIT_NAME)]
    if self.use_bias:
      names.append(("params", "bias"))
    for collection, name in names:
      if self.has_variable(collection, name):
        stored = jnp.shape(self.get_variable(collection, name))
        if stored != feature_shape:
          raise ValueError(
              f"{self.name or type(self).__name__}: the input has {feature_shape} channels along axis "
              f"{self.axis}, but the stored {collection}/{name} has shape {stored}"
          )
