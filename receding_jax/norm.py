"""Bounded scaler normalisation: BatchNorm whose per-channel scale is sigmoid(logit).

The maths lives in pure functions (`batch_moments`, `normalize`, `update_running_average`) so it can be
used without the module; `BoundedScaleNorm` is a thin Linen shell that owns the logits (``params``) and
the running statistics (``batch_stats``), with the interface of `flax.linen.BatchNorm`.

Training mode runs `bounded_norm_train`: the two-pass forward with a closed-form backward (a custom VJP,
`norm_backward`; `jit`, `vmap`, `shard_map`, with or without ``axis_name``). A custom VJP is reverse mode
only: for forward mode (`jax.jvp`, `jax.jacfwd`) or higher derivatives build the module with
``closed_form_backward=False``, which differentiates the same formula by autodiff
(`bounded_norm_train_autodiff`; 1.13-1.27x slower per norm on 2 CPU cores).

Statistics in data-parallel training: under `jax.jit` with the batch sharded over a mesh, the reductions
below run over the *global* batch (XLA inserts the collectives). Per-device statistics are only what you
get by running the module inside `shard_map` without ``axis_name``; with ``axis_name`` set there, the
statistics are averaged over that axis, i.e. global again.
"""

from __future__ import annotations

import functools
import math
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


def per_channel(v: jax.Array, x_shape: Sequence[int], feature_axes: Sequence[int]) -> jax.Array:
  """`v` of shape [features] reshaped to broadcast against an input of `x_shape` along `feature_axes`."""
  shape = [1] * len(x_shape)
  for ax in feature_axes:
    shape[ax] = x_shape[ax]
  return jnp.reshape(v, shape)


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
  def expand(v):
    return per_channel(v, x.shape, feature_axes)

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


def bounded_norm_train(
    x: jax.Array,
    logit: jax.Array,
    bias: jax.Array | None,
    feature_axes: Sequence[int],
    epsilon: float,
    dtype: Any = None,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode bounded norm: (y, batch mean, batch var), with a closed-form backward.

  The values are those of `batch_moments` + `normalize` with scale sigmoid(`logit`) (two-pass statistics
  in at least float32, output dtype as `normalize`); the gradients wrt `x`, `logit` and `bias` are the
  closed form of `norm_backward` instead of autodiff of the two passes (fewer passes over `x`). The mean
  and var are returned for the running averages and carry no gradient. `feature_axes` are canonical;
  with `axis_name` (inside `shard_map` or `vmap`) the statistics and the backward's sums run over that named
  axis too. Reverse mode only: use `bounded_norm_train_autodiff` for forward-mode or higher derivatives.
  """
  groups = None if axis_index_groups is None else tuple(tuple(g) for g in axis_index_groups)
  logit, bias = (_varying_like(x, p) for p in (logit, bias))
  y, mean, var = _bounded_norm_train(x, logit, bias, tuple(feature_axes), epsilon, dtype, axis_name, groups)
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def bounded_norm_train_autodiff(
    x: jax.Array, logit: jax.Array, bias: jax.Array | None, feature_axes: Sequence[int], epsilon: float,
    dtype: Any = None, axis_name: str | None = None, axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`bounded_norm_train` (same arguments and values) differentiated by JAX through the two passes: the
  reference formula, which also supports forward mode and higher derivatives (slower backward)."""
  mean, var = batch_moments(x, _reduction_axes(x.ndim, feature_axes), axis_name, axis_index_groups)
  y = normalize(x, mean, var, bounded_scale(logit), bias, feature_axes, epsilon, dtype)
  return y, mean, var


def training_function(closed_form: bool) -> Any:
  """The training-mode function the modules call: `bounded_norm_train` (closed-form backward) or
  `bounded_norm_train_autodiff`; same arguments and values."""
  return bounded_norm_train if closed_form else bounded_norm_train_autodiff


def norm_backward(
    g: jax.Array,
    x: jax.Array,
    mean: jax.Array,
    rstd: jax.Array,
    scale: jax.Array,
    feature_axes: Sequence[int],
    count: jax.Array,
    axis_name: str | None = None,
    axis_index_groups: Any = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(dx, sum g, sum g xhat) for y = scale * xhat + bias, xhat = (x - mean) * rstd, batch statistics.

  `g` is dy (any float dtype); `mean`, `rstd` = 1/sqrt(var + eps) and `scale` have shape [features] and
  `count` is the number of elements per channel in the whole (global) batch. With the statistics' own
  gradient folded in, dx = scale rstd (g - mean(g) - xhat mean(g xhat)), the means over the batch and the
  named axis. The returned sums run over this shard's batch only: they are d bias and d scale of its share
  (the named axis' transpose or `vmap` adds the others'). Computed in the dtype of `mean` and `scale`, dx
  cast to `x`'s.
  """
  compute = jnp.result_type(mean, scale)
  reduction_axes = _reduction_axes(x.ndim, feature_axes)

  def expand(v):
    return per_channel(v.astype(compute), x.shape, feature_axes)

  g = g.astype(compute)
  xhat = (x.astype(compute) - expand(mean)) * expand(rstd)
  local_sums = g.sum(reduction_axes), (g * xhat).sum(reduction_axes)
  sum_g, sum_g_xhat = local_sums
  if axis_name is not None:
    sum_g, sum_g_xhat = jax.lax.psum(local_sums, axis_name, axis_index_groups=axis_index_groups)
  dx = expand(scale * rstd) * (g - expand(sum_g / count) - xhat * expand(sum_g_xhat / count))
  return dx.astype(x.dtype), *local_sums


def _reduction_axes(ndim: int, feature_axes: Sequence[int]) -> tuple[int, ...]:
  return tuple(i for i in range(ndim) if i not in feature_axes)


def _varying_like(x: jax.Array, param: jax.Array | None) -> jax.Array | None:
  """`param` marked as varying over the `shard_map` axes that `x` varies over (a no-op elsewhere).

  The backward returns each shard's own parameter gradient; the transpose of this cast sums them over the
  devices, as autodiff does for a replicated parameter."""
  if param is None:
    return None
  axes = tuple(sorted(jax.typeof(x).manual_axis_type.varying - jax.typeof(param).manual_axis_type.varying))
  return jax.lax.pcast(param, axes, to="varying") if axes else param


def _batch_count(x_shape, reduction_axes, axis_name, axis_index_groups) -> jax.Array:
  """Elements per channel in the global batch (a float32 scalar): the local count times the named axis'."""
  count = math.prod(x_shape[i] for i in reduction_axes)
  if axis_name is not None:
    count = count * jax.lax.psum(1, axis_name, axis_index_groups=axis_index_groups)
  return jnp.asarray(count, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _bounded_norm_train(x, logit, bias, feature_axes, epsilon, dtype, axis_name, axis_index_groups):
  return bounded_norm_train_autodiff(x, logit, bias, feature_axes, epsilon, dtype, axis_name, axis_index_groups)


def _bounded_norm_train_forward(x, logit, bias, feature_axes, epsilon, dtype, axis_name, axis_index_groups):
  """The forward, and what the backward needs: x, the statistics, the scale and the global count.

  The count is computed here because a collective over a `vmap` axis is refused in the backward of a
  custom VJP when its operand is a constant (the batch-dependent sums there are fine)."""
  outputs = bounded_norm_train_autodiff(x, logit, bias, feature_axes, epsilon, dtype, axis_name, axis_index_groups)
  _, mean, var = outputs
  count = _batch_count(x.shape, _reduction_axes(x.ndim, feature_axes), axis_name, axis_index_groups)
  rstd = jax.lax.rsqrt(var + epsilon)
  return outputs, (x, mean, rstd, bounded_scale(logit), bias, count)


def _bounded_norm_train_backward(feature_axes, epsilon, dtype, axis_name, axis_index_groups, residuals, cotangents):
  """Cotangents of x, logit and bias from dy; those of the returned mean and var are dropped (no gradient)."""
  del epsilon, dtype
  x, mean, rstd, scale, bias, count = residuals
  dx, sum_g, sum_g_xhat = norm_backward(
      cotangents[0], x, mean, rstd, scale, feature_axes, count, axis_name, axis_index_groups
  )
  dlogit = (sum_g_xhat * scale * (1 - scale)).astype(scale.dtype)  # d sigmoid(w) / dw = s (1 - s).
  dbias = None if bias is None else sum_g.astype(bias.dtype)
  return dx, dlogit, dbias


_bounded_norm_train.defvjp(_bounded_norm_train_forward, _bounded_norm_train_backward)


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
    closed_form_backward: train through `bounded_norm_train` (custom VJP, reverse mode only); False
      differentiates the same formula by autodiff, which forward mode and higher derivatives need.
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
  closed_form_backward: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """Normalises `x` (any rank, channels along `axis`) and scales each channel by sigmoid(logit)."""
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[ax] for ax in feature_axes)

    self._check_stored_shapes(feature_shape)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, feature_shape, jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, feature_shape, jnp.float32)
    logit = self.param(LOGIT_NAME, self.logit_init, feature_shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None

    if use_running_average:
      scale = bounded_scale(logit)
      return normalize(x, ra_mean.value, ra_var.value, scale, bias, feature_axes, self.epsilon, self.dtype)
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = training_function(self.closed_form_backward)(
        x, logit, bias, feature_axes, self.epsilon, self.dtype, axis_name, self.axis_index_groups
    )
    if not self.is_initializing():
      ra_mean.value = update_running_average(ra_mean.value, mean, self.momentum)
      ra_var.value = update_running_average(ra_var.value, var, self.momentum)
    return y

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
