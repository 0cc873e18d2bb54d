"""Per-convolution profile behind the README's explanation of the CPU training step.

    python benchmarks/conv_profile.py

For the 3x3 convolutions of the CIFAR models (batch 64, NHWC) it times, with XLA, the forward pass, the
input gradient and the kernel gradient, and on 2x2/4x4 maps the patches + matmul formulation used by
`cpu_friendly_conv`; then the kernel gradient and forward + both gradients again, compiled with the
training step's options (`cpu_compilation.CPU_TRAINING_OPTIONS`: convolutions kept from YNNPACK); with
PyTorch installed, also PyTorch's forward + both gradients of the same layer.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from receding_jax.cpu_compilation import CPU_TRAINING_OPTIONS
from receding_jax.models import layers

SHAPES = [(32, 16), (16, 32), (8, 64), (32, 64), (16, 128), (8, 256), (4, 512), (2, 512)]
NHWC = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
PAD = ((1, 1), (1, 1))


def median_ms(fn, *args, repeats: int = 5) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def native(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), PAD, dimension_numbers=NHWC)


def patches(x, k):
  kh, kw, cin, cout = k.shape
  p = jax.lax.conv_general_dilated_patches(x, (kh, kw), (1, 1), PAD, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return p @ k.transpose(2, 0, 1, 3).reshape(cin * kh * kw, cout)


def fwd_and_grads(conv, dy, compiler_options=None):
  """Jitted gradients of <conv(x, k), dy> with respect to x and k (forward included)."""
  return jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) * dy), argnums=(0, 1)), compiler_options=compiler_options)


def torch_ms(size: int, channels: int) -> float | None:
  try:
    import torch
  except ImportError:
    return None
  x = torch.randn(64, channels, size, size, requires_grad=True)
  conv = torch.nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

  def step():
    conv(x).sum().backward()

  step()
  times = []
  for _ in range(5):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def main() -> None:
  assert layers.SMALL_MAP_POSITIONS == 4
  print("| map | channels | XLA fwd | XLA grad x | XLA grad kernel | patches fwd+grads | XLA fwd+grads "
        "| grad kernel, training options | fwd+grads, training options | torch fwd+grads |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for size, channels in SHAPES:
    x = jax.random.normal(jax.random.key(0), (64, size, size, channels))
    k = 0.05 * jax.random.normal(jax.random.key(1), (3, 3, channels, channels))
    dy = jax.random.normal(jax.random.key(2), native(x, k).shape)
    fwd = median_ms(jax.jit(native), x, k)
    grad_x = median_ms(jax.jit(lambda x, k, dy: jax.vjp(native, x, k)[1](dy)[0]), x, k, dy)
    kernel_gradient = lambda x, k, dy: jax.vjp(native, x, k)[1](dy)[1]
    grad_k = median_ms(jax.jit(kernel_gradient), x, k, dy)
    grad_k_options = median_ms(jax.jit(kernel_gradient, compiler_options=CPU_TRAINING_OPTIONS), x, k, dy)
    full_options = median_ms(fwd_and_grads(native, dy, CPU_TRAINING_OPTIONS), x, k)

    full = median_ms(fwd_and_grads(native, dy), x, k)
    via_patches = f"{median_ms(fwd_and_grads(patches, dy), x, k):.1f}" if size <= 4 else ""
    reference = torch_ms(size, channels)
    ref = f"{reference:.1f}" if reference is not None else "n/a"
    cells = [f"{size}x{size}", channels, f"{fwd:.1f}", f"{grad_x:.1f}", f"{grad_k:.1f}", via_patches,
             f"{full:.1f}", f"{grad_k_options:.1f}", f"{full_options:.1f}", ref]
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


if __name__ == "__main__":
  main()
