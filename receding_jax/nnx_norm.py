"""The bounded norm and gate for Flax NNX: the maths of `norm.BoundedScaleNorm` and `gate.BoundedGate`, NNX shells.

Variables: ``scale_logit`` (`nnx.Param`, importance = sigmoid(logit)), optional ``bias`` (`nnx.Param`),
``mean`` and ``var`` (`nnx.BatchStat`, float32). The layout matches the Linen module's, so penalties,
importances and pruning find it the same way; ``model.eval()`` switches it to the running statistics.
Training mode runs `norm.training_function(closed_form_backward)`, as the Linen module does.
`NnxBoundedGate` holds only ``scale_logit`` (and ``num_features``, which pruning resets), as `gate.BoundedGate`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from receding_jax.gate import bounded_gate
from receding_jax.norm import (
  Axes,
  bounded_scale,
  canonicalize_axes,
  normalize,
  training_function,
  update_running_average,
)

#: Logits ~ Normal(0, 1), as the Linen module (docs/method.md section 4).
DEFAULT_LOGIT_INIT = nnx.initializers.normal(stddev=1.0)


class NnxBoundedScaleNorm(nnx.Module):
  """BatchNorm with a bounded scale, y = sigmoid(w_c) * (x - mean_c) / sqrt(var_c + eps) [+ bias_c], in NNX.

  Args:
    num_features: channels along `axis` (one axis).
    use_running_average: normalise with the running statistics (``eval()`` sets it, ``train()`` clears it).
    axis: the feature axis; momentum, epsilon, dtype, param_dtype, use_bias, logit_init, bias_init,
      axis_name, axis_index_groups, closed_form_backward: as `norm.BoundedScaleNorm` (momentum 0.9 =
      PyTorch's 0.1, no bias).
    rngs: draws the logits (``rngs.params()``).
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool = False,
      axis: Axes = -1,
      momentum: float = 0.9,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = False,
      logit_init: nnx.Initializer = DEFAULT_LOGIT_INIT,
      bias_init: nnx.Initializer = nnx.initializers.zeros,
      axis_name: str | None = None,
      axis_index_groups: Any = None,
      closed_form_backward: bool = True,
      rngs: nnx.Rngs,
  ):
    if not isinstance(num_features, int) or num_features < 1:
      raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    self.num_features = num_features
    self.use_running_average = use_running_average
    self.axis, self.momentum, self.epsilon = axis, momentum, epsilon
    self.dtype, self.use_bias = dtype, use_bias
    self.axis_name, self.axis_index_groups = axis_name, axis_index_groups
    self.closed_form_backward = closed_form_backward
    shape = (num_features,)
    self.scale_logit = nnx.Param(logit_init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(bias_init(rngs.params(), shape, param_dtype)) if use_bias else None
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """Normalises `x` (channels along `axis`) and scales each channel by sigmoid(logit)."""
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    if len(feature_axes) != 1 or x.shape[feature_axes[0]] != self.num_features:
      raise ValueError(f"NnxBoundedScaleNorm has {self.num_features} features, the input has shape {x.shape} "
                       f"(axis {self.axis})")
    running = self.use_running_average if use_running_average is None else use_running_average
    bias = None if self.bias is None else self.bias[...]
    if running:
      return normalize(x, self.mean[...], self.var[...], bounded_scale(self.scale_logit[...]), bias, feature_axes,
                       self.epsilon, self.dtype)
    train = training_function(self.closed_form_backward)
    y, mean, var = train(x, self.scale_logit[...], bias, feature_axes, self.epsilon, self.dtype, self.axis_name,
                         self.axis_index_groups)
    self.mean[...] = update_running_average(self.mean[...], mean, self.momentum)
    self.var[...] = update_running_average(self.var[...], var, self.momentum)
    return y


class NnxBoundedGate(nnx.Module):
  """A per-channel gate with a bounded scale, y = sigmoid(w_c) * x_c, in NNX (see `gate.BoundedGate`).

  Args:
    num_features: channels along `axis` (one axis; the heads with ``axis=-2`` on [..., heads, head_dim]).
    axis, dtype, param_dtype, logit_init: as `gate.BoundedGate` (logits ~ Normal(0, 1)).
    rngs: draws the logits (``rngs.params()``).
  """

  def __init__(self, num_features: int, *, axis: int = -1, dtype: Any = None, param_dtype: Any = jnp.float32,
               logit_init: nnx.Initializer = DEFAULT_LOGIT_INIT, rngs: nnx.Rngs):
    if not isinstance(num_features, int) or num_features < 1:
      raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    self.num_features, self.axis, self.dtype = num_features, axis, dtype
    self.scale_logit = nnx.Param(logit_init(rngs.params(), (num_features,), param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Scales each channel of `x` (channels along `axis`) by sigmoid(its logit)."""
    return bounded_gate(x, self.scale_logit[...], self.axis, self.dtype)
