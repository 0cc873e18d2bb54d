"""VGG with a norm after every convolution: the CIFAR variant (docs/method.md section 5) and ImageNet VGG-16-BN."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from receding_jax.models.layers import NormKind, conv, dense, make_norm, max_pool_2x2

#: Conv widths of VGG-16; a max-pool follows the convolutions at these (0-based) indices.
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
VGG16_POOL_AFTER = (1, 3, 6, 9)


def conv_stack(
    x: jax.Array,
    widths: Sequence[int],
    pool_after: Sequence[int],
    norm: NormKind,
    train: bool,
    batch_norm_scale_init: float,
    compute_dtype: str = "float32",
    cpu_friendly: bool = False,
) -> jax.Array:
  """conv3x3(+bias) -> norm -> ReLU for each width, 2x2 max-pool after the indices in `pool_after`.

  Modules are named conv{i} and norm{i}, i = 0..len(widths)-1. The result has `compute_dtype`.
  `cpu_friendly`: the convolutions' CPU formulation (`layers.conv`).
  """
  for i, width in enumerate(widths):
    x = conv(width, 3, use_bias=True, name=f"conv{i}", compute_dtype=compute_dtype, cpu_friendly=cpu_friendly)(x)
    x = make_norm(norm, train, f"norm{i}", batch_norm_scale_init, compute_dtype)(x)
    x = nn.relu(x)
    if i in pool_after:
      x = max_pool_2x2(x)
  return x


class CifarVGG(nn.Module):
  """VGG for 32x32 inputs: the conv stack, 2x2 average pool, flatten, one dense layer ('classifier').

  Attributes:
    widths: output channels of each convolution (13 for VGG-16); a pruned network has smaller ones.
    num_classes: classifier outputs.
    norm: 'bounded' (BoundedScaleNorm) or 'batch' (flax BatchNorm).
    pool_after: conv indices followed by a 2x2 max-pool.
    batch_norm_scale_init: initial gamma of 'batch' norms (Network Slimming uses 0.5).
    compute_dtype: 'float32' or 'bfloat16': the dtype convolutions, dense layer and norm outputs compute
      in; parameters, batch statistics and the returned logits are float32 either way.
    cpu_friendly: trace the formulation XLA:CPU runs faster (small maps convolved as patches + matmul,
      `layers.cpu_friendly_conv`): same parameters and, to rounding, the same values. The trainer sets it
      on CPU (`models.for_platform`); the default is the plain formulation, whatever machine traces it.
  """

  widths: Sequence[int] = VGG16_WIDTHS
  num_classes: int = 10
  norm: NormKind = "bounded"
  pool_after: Sequence[int] = VGG16_POOL_AFTER
  batch_norm_scale_init: float = 1.0
  input_shape: Sequence[int] = (32, 32, 3)  # [height, width, channels] of one input (FLOP counts, checks).
  compute_dtype: str = "float32"
  cpu_friendly: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[batch, 32, 32, 3] images -> [batch, num_classes] float32 logits."""
    dt = self.compute_dtype
    x = conv_stack(x, self.widths, self.pool_after, self.norm, train, self.batch_norm_scale_init, dt,
                   self.cpu_friendly)
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return dense(self.num_classes, name="classifier", compute_dtype=dt)(x).astype(jnp.float32)


class ImageNetVGG(nn.Module):
  """torchvision-style VGG-BN for 224x224 inputs: conv stack with a pool after every stage, 7x7 map,
  flatten, dense 4096 -> ReLU -> dropout -> dense 4096 -> ReLU -> dropout -> dense classes.

  Dropout needs an rng named 'dropout' when ``train`` is True. `compute_dtype` and `cpu_friendly` as in
  `CifarVGG`.
  """

  widths: Sequence[int] = VGG16_WIDTHS
  num_classes: int = 1000
  norm: NormKind = "bounded"
  pool_after: Sequence[int] = (*VGG16_POOL_AFTER, 12)
  hidden: int = 4096
  dropout_rate: float = 0.5
  batch_norm_scale_init: float = 1.0
  input_shape: Sequence[int] = (224, 224, 3)  # [height, width, channels] of one input (FLOP counts, checks).
  compute_dtype: str = "float32"
  cpu_friendly: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[batch, 224, 224, 3] images -> [batch, num_classes] float32 logits."""
    dt = self.compute_dtype
    x = conv_stack(x, self.widths, self.pool_after, self.norm, train, self.batch_norm_scale_init, dt,
                   self.cpu_friendly)
    x = x.reshape(x.shape[0], -1)  # [batch, 7 * 7 * widths[-1]], channels fastest.
    for i in range(2):
      x = nn.relu(dense(self.hidden, name=f"fc{i}", compute_dtype=dt)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return dense(self.num_classes, name="classifier", compute_dtype=dt)(x).astype(jnp.float32)
