"""Building blocks shared by the model zoo: initialisers and the norm chosen by name."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from receding_jax.norm import BoundedScaleNorm

NormKind = Literal["bounded", "batch"]
NORM_KINDS = ("bounded", "batch")
#: Dtypes the convolutions and dense layers may compute in (by name, as in model specs); parameters,
#: norm statistics and logits stay float32 either way.
COMPUTE_DTYPES = ("float32", "bfloat16")

def flat_normal(variance: Callable[[tuple[int, ...]], float]) -> nn.initializers.Initializer:
  """Normal(0, variance(shape)) drawn as one flat vector and reshaped: the values of
  ``jax.random.normal(key, shape) * sqrt(variance)`` (with jax's partitionable threefry, the default, the
  random bits of element i depend only on its flat index; the float maths after them may round apart in
  the last bit, as XLA compiles the two programs differently), but it compiles an order of magnitude faster on
  XLA:CPU, which optimises the counter arithmetic of an N-D draw slowly and once per distinct shape
  (18 pruned-width 3x3 kernels: 17-29 s against 2.7 s; a pruned quickstart ResNet-20's init: 17-30 s)."""

  def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    shape = tuple(shape)
    scale = jnp.sqrt(jnp.array(variance(shape), dtype))
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape) * scale

  return init


#: Conv kernels ~ Normal(0, sqrt(2 / (k * k * out_channels))) (He, fan-out), docs/method.md section 4: the values
#: of ``nn.initializers.variance_scaling(2.0, "fan_out", "normal")``, drawn flat (`flat_normal`).
conv_kernel_init = flat_normal(lambda shape: 2.0 / (math.prod(shape[:-2]) * shape[-1]))
#: Dense kernels ~ Normal(0, 0.01) (the values of ``nn.initializers.normal(0.01)``), biases 0.
dense_kernel_init = flat_normal(lambda shape: 0.01**2)


def check_norm_kind(norm: str) -> None:
  """Raises ValueError naming `norm` unless it is one of NORM_KINDS."""
  if norm not in NORM_KINDS:
    raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")


def check_compute_dtype(compute_dtype: str) -> None:
  """Raises ValueError naming `compute_dtype` unless it is one of COMPUTE_DTYPES."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")


def compute_dtype_of(compute_dtype: str) -> jnp.dtype:
  """The jnp dtype named by `compute_dtype` ('float32' or 'bfloat16'); ValueError for any other name."""
  check_compute_dtype(compute_dtype)
  return jnp.dtype(compute_dtype)


def make_norm(
    norm: NormKind, train: bool, name: str, batch_norm_scale_init: float = 1.0, compute_dtype: str = "float32"
) -> nn.Module:
  """The norm layer by kind: 'bounded' = BoundedScaleNorm, 'batch' = flax BatchNorm (gamma init given).

  Both use PyTorch's momentum 0.1 (Flax 0.9) and epsilon 1e-5, so either trains like the reference. Both
  reduce the batch statistics in float32 (also from bfloat16 inputs), keep float32 parameters and running
  statistics, and return activations in `compute_dtype`.
  """
  check_norm_kind(norm)
  dtype = compute_dtype_of(compute_dtype)
  if norm == "bounded":
    return BoundedScaleNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name
    )
  return nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      scale_init=nn.initializers.constant(batch_norm_scale_init),
      dtype=dtype,
      param_dtype=jnp.float32,
      force_float32_reductions=True,
      name=name,
  )


def residual_boundary(x: jax.Array, enabled: bool) -> jax.Array:
  """`x` (a residual block's output) unchanged; when `enabled`, also a boundary XLA does not fuse across.

  Why: the backward of the next convolution transposes `x` for its kernel gradient, and XLA:CPU fuses
  into that transpose the elementwise chain that produced `x` (norm, add, ReLU, block after block back to
  the stage's first convolution), recomputing the whole residual stream once per layer. In ResNet-56's CPU
  step those transposes took about 45% of the time (profile in the README). An identity gather ends the
  chain (XLA keeps it as a separate copy of `x`); its custom VJP passes the gradient straight through, so
  values and gradients are exactly those without it. The zoo models enable it in training when their
  `cpu_friendly` attribute is set (the trainer sets it on CPU, where the problem was measured), never from
  the machine that traces them.
  """
  if not enabled:
    return x
  return _identity_gather(x)


@jax.custom_vjp
def _identity_gather(x: jax.Array) -> jax.Array:
  return jnp.take(x, jnp.arange(x.shape[-1]), axis=-1, mode="clip")


def _identity_gather_forward(x: jax.Array) -> tuple[jax.Array, None]:
  return _identity_gather(x), None


def _identity_gather_backward(_, cotangent: jax.Array) -> tuple[jax.Array]:
  return (cotangent,)


_identity_gather.defvjp(_identity_gather_forward, _identity_gather_backward)


#: Feature maps with at most this many positions (H x W) are convolved as patches + matmul on CPU.
#: Measured at batch 64, 3x3, fwd / fwd+bwd ms (benchmarks in the README): 2x2x512 native 447 / 942,
#: patches 23 / 75; 4x4x512 native 31 / 89, patches 70 / 429. So only maps up to 2x2 take patches.
SMALL_MAP_POSITIONS = 4


def _is_plain_nhwc_conv(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count) -> bool:
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  trivial = all(d is None or all(v == 1 for v in d) for d in (lhs_dilation, rhs_dilation))
  return lhs.ndim == 4 and feature_group_count == 1 and trivial and dimension_numbers == nhwc


def cpu_friendly_conv(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
    feature_group_count=1, precision=None, **kwargs,
):
  """`jax.lax.conv_general_dilated`, except for small feature maps, where it computes the same
  convolution as image patches times the kernel matrix: the CPU formulation (`conv`'s ``cpu_friendly``).

  XLA:CPU runs a 3x3 convolution on a 2x2 map at ~2 GFLOP/s (VGG-16's last block on CIFAR: ~0.5 s
  forward at batch 64), while patches + matmul runs at matmul speed. The parameters are untouched
  (kernel [kh, kw, in, out]), so checkpoints stay those of `flax.linen.Conv`; for larger maps the
  native convolution runs. Which formulation is traced depends on the shapes only, not on the machine.
  """
  positions = lhs.shape[1] * lhs.shape[2] if lhs.ndim == 4 else None
  if (
      positions is None
      or positions > SMALL_MAP_POSITIONS
      or rhs.shape[0] * rhs.shape[1] == 1
      or kwargs
      or not _is_plain_nhwc_conv(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
  ):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision, **kwargs,
    )
  kh, kw, cin, cout = rhs.shape
  patches = jax.lax.conv_general_dilated_patches(
      lhs, (kh, kw), window_strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision
  )  # [N, H', W', cin * kh * kw], features ordered (cin, kh, kw).
  kernel = rhs.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)
  return jax.lax.dot_general(patches, kernel, (((3,), (0,)), ((), ())), precision=precision)


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    use_bias: bool = False,
    name: str | None = None,
    compute_dtype: str = "float32",
    cpu_friendly: bool = False,
) -> nn.Conv:
  """A square convolution with PyTorch-style symmetric padding k // 2 and the method's init (a plain
  `flax.linen.Conv`; with `cpu_friendly`, small maps take `cpu_friendly_conv`'s patches + matmul path,
  which XLA:CPU runs faster; the parameters are the same either way).

  Inputs and the float32 kernel are cast to `compute_dtype`, which the output has.
  """
  pad = kernel // 2
  return nn.Conv(
      features,
      (kernel, kernel),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=use_bias,
      kernel_init=conv_kernel_init,
      conv_general_dilated=cpu_friendly_conv if cpu_friendly else None,
      dtype=compute_dtype_of(compute_dtype),
      param_dtype=jnp.float32,
      name=name,
  )


def dense(features: int, name: str | None = None, compute_dtype: str = "float32") -> nn.Dense:
  """A dense layer with Normal(0, 0.01) float32 kernel and zero bias, computing in `compute_dtype`."""
  return nn.Dense(
      features, kernel_init=dense_kernel_init, dtype=compute_dtype_of(compute_dtype), param_dtype=jnp.float32,
      name=name,
  )


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on [batch, H, W, C], written as reshape + max.

  Same values as `nn.max_pool(x, (2, 2), (2, 2))` (H and W even), but its gradient avoids XLA's
  select-and-scatter, which is several times slower on CPU.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
