"""Bounded gate: a per-channel scale sigmoid(logit) without normalisation, for places without a BatchNorm.

The receding importance lives in a bounded norm's scale (docs/method.md section 1). Transformers, ViTs and
ConvNeXt have no BatchNorm, and a LayerNorm over channels couples them only approximately, so their hidden
units and attention heads had no importance to recede. A gate gives them one: y_c = sigmoid(w_c) * x_c,
nothing else. Put it where a channel's whole contribution passes through it: after the activation of an
MLP's hidden units (a transformer's MLP, ConvNeXt's inverted bottleneck), or on the head axis of the
attention output before the output projection (``axis=-2`` of [..., heads, head_dim]).

Its logit has the bounded norm's name and place (``params/<module>/scale_logit``, init Normal(0, 1)), so the
receding penalty's default mask, `neuron_importances`, the training loop's norm learning rate and the pruner
(`prune_params`, `channel_masks`) find it by its variable layout, with no registration. The maths is
`bounded_gate`, a pure function; `BoundedGate` is its Linen shell (`nnx_norm.NnxBoundedGate` the NNX one).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from receding_jax.norm import LOGIT_NAME, Axes, bounded_scale, canonicalize_axes, per_channel


def bounded_gate(x: jax.Array, logit: jax.Array, feature_axes: Axes = -1, dtype: Any = None) -> jax.Array:
  """x * sigmoid(logit) per channel: `logit` has the shape of `x` along `feature_axes` (e.g. [features]).

  `feature_axes` may be negative and several (then `logit` has their shape, in order). The product is taken
  in the promotion of `x` and `logit` (a bf16 input with float32 logits: float32), then cast to `dtype`
  (None: keep that promotion), as `norm.normalize` does.
  """
  axes = canonicalize_axes(x.ndim, feature_axes)
  want = tuple(x.shape[ax] for ax in axes)
  if jnp.shape(logit) != want:
    raise ValueError(f"bounded_gate: the logits have shape {jnp.shape(logit)}, the input {x.shape} has {want} "
                     f"along axes {axes}")
  y = x * per_channel(bounded_scale(logit), x.shape, axes)
  return y if dtype is None else y.astype(dtype)


class BoundedGate(nn.Module):
  """A per-channel gate with a bounded scale: y = sigmoid(w_c) * x_c, the importance of channel c in (0, 1).

  The bounded norm's importance without its normalisation, for channels no BatchNorm covers (see the module
  docstring for where to put it). Variables: ``params/scale_logit``, one logit per channel along `axis`,
  init Normal(0, 1) like `BoundedScaleNorm`'s; no state, the same in training and inference.

  Attributes:
    axis: the channel axis or axes (default the last); -2 gates the heads of a [..., heads, head_dim] array.
    dtype: output dtype; ``None`` promotes input and logits (bf16 input, float32 logits -> float32).
    param_dtype: dtype of the logits.
    logit_init: initializer of the logits.
  """

  axis: Axes = -1
  dtype: Any = None
  param_dtype: Any = jnp.float32
  logit_init: nn.initializers.Initializer = nn.initializers.normal(stddev=1.0)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Scales each channel of `x` (any rank, channels along `axis`) by sigmoid(its logit)."""
    feature_shape = tuple(x.shape[ax] for ax in canonicalize_axes(x.ndim, self.axis))
    logit = self.param(LOGIT_NAME, self.logit_init, feature_shape, self.param_dtype)
    return bounded_gate(x, logit, self.axis, self.dtype)
