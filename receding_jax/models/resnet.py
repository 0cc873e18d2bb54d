"""ResNets: the CIFAR family with basic blocks and option-A shortcuts, and ImageNet ResNet-50.

Only the channels inside a residual block are prunable (docs/method.md section 6), so every block's inner
widths are explicit attributes and the residual stream keeps its width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from receding_jax.models.layers import NormKind, conv, dense, make_norm, residual_boundary


def option_a_shortcut(x: jax.Array, out_channels: int, stride: int) -> jax.Array:
  """Parameter-free shortcut: subsample by `stride`, zero-pad channels equally on both sides."""
  if stride != 1:
    x = x[:, ::stride, ::stride, :]
  extra = out_channels - x.shape[-1]
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


class BasicBlock(nn.Module):
  """conv3x3(inner) -> norm1 -> ReLU -> conv3x3(out) -> norm2, plus option-A shortcut, then ReLU.

  Computes in `compute_dtype` ('float32' or 'bfloat16'; see `layers.make_norm` for the norms);
  `cpu_friendly` as in `CifarResNet`.
  """

  inner: int
  out: int
  stride: int
  norm: NormKind
  batch_norm_scale_init: float = 1.0
  compute_dtype: str = "float32"
  cpu_friendly: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dt, cpu = self.compute_dtype, self.cpu_friendly
    y = conv(self.inner, 3, self.stride, name="conv1", compute_dtype=dt, cpu_friendly=cpu)(x)
    y = nn.relu(make_norm(self.norm, train, "norm1", self.batch_norm_scale_init, dt)(y))
    y = conv(self.out, 3, name="conv2", compute_dtype=dt, cpu_friendly=cpu)(y)
    y = make_norm(self.norm, train, "norm2", self.batch_norm_scale_init, dt)(y)
    y = nn.relu(y + option_a_shortcut(x, self.out, self.stride).astype(y.dtype))
    return residual_boundary(y, train and cpu)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32x32 inputs: stem conv3x3 + norm, 3 stages of n basic blocks, mean-pool, dense.

  Follows the reference: no ReLU after the stem norm. Modules: stem_conv, stem_norm,
  stage{s}_block{b}/{conv1,norm1,conv2,norm2}, classifier.

  Attributes:
    blocks_per_stage: n (9 for ResNet-56, 3 for ResNet-20, 18 for ResNet-110).
    stage_widths: residual-stream width of each stage.
    inner_widths: conv1 output width of every block, stage-major (None: the stage width); pruning
      narrows these.
    compute_dtype: 'float32' or 'bfloat16': the dtype convolutions, dense layer and norm outputs compute
      in; parameters, batch statistics and the returned logits are float32 either way.
    cpu_friendly: trace the formulation XLA:CPU runs faster (small maps convolved as patches + matmul, and
      in training a fusion boundary after each block: `layers.cpu_friendly_conv`, `layers.residual_boundary`):
      same parameters and, to rounding, the same values and gradients. The trainer sets it on CPU
      (`models.for_platform`); the default is the plain formulation, whatever machine traces it.
  """

  blocks_per_stage: int = 9
  num_classes: int = 10
  norm: NormKind = "bounded"
  stage_widths: Sequence[int] = (16, 32, 64)
  inner_widths: Sequence[int] | None = None
  batch_norm_scale_init: float = 1.0
  input_shape: Sequence[int] = (32, 32, 3)  # [height, width, channels] of one input (FLOP counts, checks).
  compute_dtype: str = "float32"
  cpu_friendly: bool = False

  @property
  def widths(self) -> tuple[int, ...]:
    """The prunable widths: one inner width per block."""
    if self.inner_widths is not None:
      return tuple(self.inner_widths)
    return tuple(w for w in self.stage_widths for _ in range(self.blocks_per_stage))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[batch, 32, 32, 3] images -> [batch, num_classes] float32 logits."""
    inner, dt, cpu = iter(self.widths), self.compute_dtype, self.cpu_friendly
    x = conv(self.stage_widths[0], 3, name="stem_conv", compute_dtype=dt, cpu_friendly=cpu)(x)
    x = make_norm(self.norm, train, "stem_norm", self.batch_norm_scale_init, dt)(x)
    for s, width in enumerate(self.stage_widths):
      for b in range(self.blocks_per_stage):
        stride = 2 if s > 0 and b == 0 else 1
        block = BasicBlock(next(inner), width, stride, self.norm, self.batch_norm_scale_init, dt, cpu,
                           name=f"stage{s}_block{b}")
        x = block(x, train)
    logits = dense(self.num_classes, name="classifier", compute_dtype=dt)(x.mean(axis=(1, 2)))
    return logits.astype(jnp.float32)


class Bottleneck(nn.Module):
  """conv1x1(inner1)-norm1-ReLU-conv3x3/stride(inner2)-norm2-ReLU-conv1x1(out)-norm3, + shortcut, ReLU.

  The shortcut is a strided conv1x1 + norm ('proj_conv', 'proj_norm') when the shape changes
  (torchvision's ResNet v1.5: the stride sits on the 3x3 convolution). Computes in `compute_dtype`;
  `cpu_friendly` as in `CifarResNet`.
  """

  inner1: int
  inner2: int
  out: int
  stride: int
  norm: NormKind
  batch_norm_scale_init: float = 1.0
  compute_dtype: str = "float32"
  cpu_friendly: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    dt, cpu = self.compute_dtype, self.cpu_friendly

    def norm(name):
      return make_norm(self.norm, train, name, self.batch_norm_scale_init, dt)

    def conv_(features, kernel, stride=1, *, name):
      return conv(features, kernel, stride, name=name, compute_dtype=dt, cpu_friendly=cpu)

    y = nn.relu(norm("norm1")(conv_(self.inner1, 1, name="conv1")(x)))
    y = nn.relu(norm("norm2")(conv_(self.inner2, 3, self.stride, name="conv2")(y)))
    y = norm("norm3")(conv_(self.out, 1, name="conv3")(y))
    if self.stride != 1 or x.shape[-1] != self.out:
      x = norm("proj_norm")(conv_(self.out, 1, self.stride, name="proj_conv")(x))
    return residual_boundary(nn.relu(y + x.astype(y.dtype)), train and cpu)


class ResNet(nn.Module):
  """ImageNet ResNet with bottleneck blocks (ResNet-50 by default), torchvision layout, 224x224 inputs.

  Modules: stem_conv (7x7/2), stem_norm, 3x3/2 max-pool, stage{s}_block{b}, classifier.

  Attributes:
    stage_sizes: blocks per stage ((3, 4, 6, 3) for ResNet-50).
    stage_widths: inner width of each stage before pruning; the block output is 4x that.
    inner_widths: (inner1, inner2) of every block, flattened stage-major (None: stage widths).
    compute_dtype: 'float32' or 'bfloat16' (as in `CifarResNet`); the logits are float32 either way.
    cpu_friendly: the formulation XLA:CPU runs faster, as in `CifarResNet`.
  """

  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  num_classes: int = 1000
  norm: NormKind = "bounded"
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  inner_widths: Sequence[int] | None = None
  expansion: int = 4
  batch_norm_scale_init: float = 1.0
  input_shape: Sequence[int] = (224, 224, 3)  # [height, width, channels] of one input (FLOP counts, checks).
  compute_dtype: str = "float32"
  cpu_friendly: bool = False
  #: Channel groups (named by their first norm) that the paper does not prune: it prunes a ResNet's
  #: block-inner channels only, and the stem, though no residual joins it, is outside every block.
  PAPER_UNPRUNED: ClassVar[tuple[str, ...]] = ("stem_norm",)

  @property
  def widths(self) -> tuple[int, ...]:
    """The prunable widths: (inner1, inner2) of every block, flattened."""
    if self.inner_widths is not None:
      return tuple(self.inner_widths)
    return tuple(w for w, n in zip(self.stage_widths, self.stage_sizes, strict=True) for _ in range(2 * n))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[batch, 224, 224, 3] images -> [batch, num_classes] float32 logits."""
    inner, dt, cpu = iter(self.widths), self.compute_dtype, self.cpu_friendly
    x = conv(self.stage_widths[0], 7, 2, name="stem_conv", compute_dtype=dt, cpu_friendly=cpu)(x)
    x = nn.relu(make_norm(self.norm, train, "stem_norm", self.batch_norm_scale_init, dt)(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for s, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths, strict=True)):
      for b in range(size):
        stride = 2 if s > 0 and b == 0 else 1
        x = Bottleneck(
            next(inner), next(inner), width * self.expansion, stride, self.norm, self.batch_norm_scale_init, dt,
            cpu, name=f"stage{s}_block{b}",
        )(x, train)
    return dense(self.num_classes, name="classifier", compute_dtype=dt)(x.mean(axis=(1, 2))).astype(jnp.float32)
