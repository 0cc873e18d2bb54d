"""XLA:CPU compile options for training convolutional networks: ``jax.jit(step, compiler_options=...)``.

Why: XLA:CPU (jaxlib 0.10) hands some convolutions, the kernel gradients among them, to YNNPACK
(``__ynn_fusion``). For the CIFAR networks' shapes that path is slow and nearly single-threaded: a 3x3
kernel gradient on a [64, 32, 32, 16] map took 37 ms, about 8 GFLOP/s, and a ResNet-56 training step kept
1.3 of 2 cores busy. With YNNPACK kept to the reductions (the norms' statistics, where it is fastest) and
the convolutions left to XLA's own kernels, the ResNet-56 step ran 1.9x faster on 2 cores (2.14 -> 1.13 s,
residual boundaries on in both) and VGG-16's 2.7x (4.00 -> 1.47 s) (benchmarks/norm_speed.py; README,
"Bounded norm and the residual stream"). Dots are not affected.

The option is per compilation, so it changes only the functions jitted with it (the training loop's train
step). It is experimental in XLA: if this jaxlib does not accept it, or `XLA_FLAGS` already sets it (the
user's choice wins), no option is passed.
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp

#: The DebugOptions field (a list of LibraryFusionType names) that says what XLA:CPU gives YNNPACK.
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
#: YNNPACK keeps the reductions only: convolutions (LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION) go to XLA.
CPU_TRAINING_OPTIONS = {YNN_FUSION_OPTION: "LIBRARY_FUSION_TYPE_REDUCE"}


def training_compiler_options(platform: str) -> dict[str, str] | None:
  """The compiler options for a training step on `platform` ('cpu', 'gpu', 'tpu'): `CPU_TRAINING_OPTIONS`
  on CPU when this jaxlib accepts them and `XLA_FLAGS` does not set the option itself; else None."""
  if platform != "cpu" or YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
    return None
  return dict(CPU_TRAINING_OPTIONS) if _accepted_on_cpu() else None


#: Programs that run once per process (a state's init, the pruning check): XLA's backend optimisations
#: cost more compile time than they could save. A quickstart ResNet-20's init: 6-8 s -> ~1 s to compile.
ONE_SHOT_OPTIONS = {"xla_backend_optimization_level": 0}


def one_shot_compiler_options(platform: str) -> dict[str, int] | None:
  """The compiler options for a program that runs once on `platform`: `ONE_SHOT_OPTIONS` on CPU (unless
  `XLA_FLAGS` sets an optimisation level itself), else None."""
  if platform != "cpu" or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", ""):
    return None
  return dict(ONE_SHOT_OPTIONS)


@functools.cache
def _accepted_on_cpu() -> bool:
  """Whether XLA:CPU compiles a trivial function with `CPU_TRAINING_OPTIONS` (once per process, ~20 ms)."""
  try:
    probe = jax.jit(lambda x: x.sum(), compiler_options=CPU_TRAINING_OPTIONS)
    probe.lower(jax.ShapeDtypeStruct((2,), jnp.float32)).compile()
  except Exception as error:  # XLA raises its own runtime error type for an unknown option or value.
    warnings.warn(
        f"jaxlib {jax.__version__} refused {CPU_TRAINING_OPTIONS} ({str(error).splitlines()[0]}); CPU training "
        "steps compile with XLA's defaults, about 2x slower for the CIFAR networks", RuntimeWarning, stacklevel=3,
    )
    return False
  return True
