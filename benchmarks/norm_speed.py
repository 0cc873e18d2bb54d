"""The bounded norm's speed: `run.py`'s ``norm`` section (closed-form backward against autodiff, Flax, PyTorch).

Rows of two kinds, each timed round-robin (one call of every variant per round, so the machine's drift hits
all alike; ratios are medians of the per-round ratios):
  - norm + ReLU forward and backward (gradient wrt the input and the norm's parameters, running statistics
    updated) on ResNet-56's activation shapes: `BoundedScaleNorm` with the closed-form backward, the same
    module differentiated by autodiff (``closed_form_backward=False``), `flax.linen.BatchNorm`, an elementwise pass
    relu(x * a + b) with its gradient (x, a, b), and PyTorch's BatchNorm2d + ReLU (NCHW) when installed;
  - the CIFAR training step (ResNet-56, VGG-16): as before issue 16 (autodiff backward, no residual
    boundaries, XLA's default compile options), with the closed-form backward only, with it and
    `layers.residual_boundary`, as now (both + `cpu_compilation`'s options: convolutions kept from
    YNNPACK), with the norms' statistics removed (`scale_only`: what any norm formulation could still
    save), with flax BatchNorm (the L1/UCS models), and PyTorch's.
The paths are selected by `norm_training_function`, `residual_boundaries` and `compiler_options`, which
swap what the modules and the trainer call while a step is compiled: benchmark-only switches, not library
options.
"""

from __future__ import annotations

import contextlib
import pathlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

from receding_jax import norm

#: ResNet-56's activation shapes (NHWC) at batch 64: 19, 18 and 18 norms of each.
ACTIVATION_SHAPES = ((64, 32, 32, 16), (64, 16, 16, 32), (64, 8, 8, 64))


@contextlib.contextmanager
def swapped(owner: object, attribute: str, value: object) -> Iterator[None]:
  """While open, ``owner.attribute`` is `value`: the benchmark-only switches below. Modules read these
  attributes when a step is traced, and a function keeps the path it was traced with: trace (call) each
  step inside, as a jitted function of its own (the steps here are fresh lambdas)."""
  default = getattr(owner, attribute)
  setattr(owner, attribute, value)
  try:
    yield
  finally:
    setattr(owner, attribute, default)


def norm_training_function(replacement: Callable) -> contextlib.AbstractContextManager:
  """While open, `BoundedScaleNorm` trains through `replacement` (signature of `norm.bounded_norm_train`)."""
  return swapped(norm, "training_function", lambda closed_form: replacement)


def autodiff_backward() -> contextlib.AbstractContextManager:
  """The ``closed_form_backward=False`` path: autodiff of the two-pass formula."""
  return norm_training_function(norm.bounded_norm_train_autodiff)


def closed_form_backward() -> contextlib.AbstractContextManager:
  """The default path (``closed_form_backward=True``): the custom VJP."""
  return norm_training_function(norm.bounded_norm_train)


def scale_only(x, logit, bias, feature_axes, epsilon, dtype=None, axis_name=None, axis_index_groups=None):
  """Not a norm: y = x * sigmoid(logit) (+ bias), no statistics. Timing floor of what any norm can save."""
  del epsilon, axis_name, axis_index_groups
  scale = norm.per_channel(norm.bounded_scale(logit), x.shape, feature_axes)
  y = x * scale if bias is None else x * scale + norm.per_channel(bias, x.shape, feature_axes)
  stats = jnp.zeros(logit.shape, jnp.float32)
  return y.astype(dtype or y.dtype), stats, stats + 1.0


def interleaved_seconds(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
  """Seconds of each call, round-robin over `fns` for `rounds` rounds after one warm-up call each.

  PyTorch's functions (names starting with 'torch') run after the others, in rounds of their own: its
  OpenMP threads keep spinning after a call and slowed the JAX call that followed (PyTorch's step also
  ran 20% slower right after JAX's), so interleaving them measured the interference, not either one."""
  torch_fns = {name: fn for name, fn in fns.items() if name.startswith("torch")}
  times = _round_robin({name: fn for name, fn in fns.items() if name not in torch_fns}, rounds)
  return {**times, **_round_robin(torch_fns, rounds)}


def _round_robin(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def median_ratio(a: list[float], b: list[float]) -> float:
  """Median over rounds of a / b (both timed in the same round)."""
  return statistics.median(x / y for x, y in zip(a, b, strict=True))


def median_over_median(a: list[float], b: list[float]) -> float:
  """median(a) / median(b): for times not taken in the same rounds (PyTorch's)."""
  return statistics.median(a) / statistics.median(b)


def module_step(module: nn.Module, x: jax.Array, cotangent: jax.Array) -> Callable[[], object]:
  """A jitted call of module + ReLU in training mode, pulled back: (d params, dx, updated statistics)."""
  variables = module.init(jax.random.key(0), x)
  params, stats = variables["params"], variables["batch_stats"]

  def forward(params, x):
    y, updates = module.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
    return jax.nn.relu(y), updates

  def step(params, x):
    _, pull_back, updates = jax.vjp(forward, params, x, has_aux=True)
    return pull_back(cotangent), updates

  jitted = jax.jit(step)
  jitted(params, x)  # Traced now, so `autodiff_backward` around this call selects the path.
  return lambda: jitted(params, x)


def elementwise_step(x: jax.Array, cotangent: jax.Array) -> Callable[[], object]:
  """relu(x * a + b) with per-channel a, b, pulled back to (da, db, dx): the memory traffic floor."""
  a, b = jnp.full(x.shape[-1], 1.5), jnp.full(x.shape[-1], 0.1)
  step = jax.jit(lambda a, b, x: jax.vjp(lambda a, b, x: jax.nn.relu(x * a + b), a, b, x)[1](cotangent))
  return lambda: step(a, b, x)


def torch_norm_step(shape_nhwc: tuple[int, ...]) -> Callable[[], object] | None:
  """PyTorch's BatchNorm2d + ReLU forward and backward on the same activation in NCHW, on the GPU when
  torch sees one (synchronised, so the time is the work's), else on the CPU; None without torch."""
  try:
    import torch
  except ImportError:
    return None
  device = "cuda" if torch.cuda.is_available() else "cpu"
  n, h, w, c = shape_nhwc
  bn = torch.nn.BatchNorm2d(c).to(device).train()
  x = torch.randn(n, c, h, w, device=device, requires_grad=True)
  cotangent = torch.randn(n, c, h, w, device=device)

  def step():
    x.grad = None
    bn.zero_grad(set_to_none=True)
    torch.relu(bn(x)).backward(cotangent)
    if device == "cuda":
      torch.cuda.synchronize()
    return 0.0

  return step


def norm_rows(quick: bool) -> list[dict]:
  """Norm + ReLU forward and backward per activation shape, milliseconds and ratios (see module doc)."""
  rows = []
  for shape in ACTIVATION_SHAPES:
    keys = jax.random.split(jax.random.key(1), 2)
    x = 2.0 + jax.random.normal(keys[0], shape)
    cotangent = jax.random.normal(keys[1], shape)
    bounded = norm.BoundedScaleNorm(use_running_average=False)
    with closed_form_backward():
      fns = {"closed_form": module_step(bounded, x, cotangent)}
    with autodiff_backward():
      fns["autodiff"] = module_step(bounded, x, cotangent)
    fns["flax_batchnorm"] = module_step(nn.BatchNorm(use_running_average=False, momentum=0.9), x, cotangent)
    fns["elementwise"] = elementwise_step(x, cotangent)
    torch_step = torch_norm_step(shape)
    if torch_step is not None:
      fns["torch_batchnorm"] = torch_step
    times = interleaved_seconds(fns, rounds=10 if quick else 30)
    row = {"shape": "x".join(map(str, shape))}
    row.update({f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()})
    row["autodiff_over_closed_form"] = median_ratio(times["autodiff"], times["closed_form"])
    row["closed_form_over_flax"] = median_ratio(times["closed_form"], times["flax_batchnorm"])
    row["closed_form_over_elementwise"] = median_ratio(times["closed_form"], times["elementwise"])
    if torch_step is not None:
      row["closed_form_over_torch"] = median_over_median(times["closed_form"], times["torch_batchnorm"])
    rows.append(row)
  return rows


def training_step_rows(quick: bool, batch: int = 64) -> list[dict]:
  """The CIFAR training step as it was before issue 16 (autodiff norm, no residual boundaries, XLA's default
  compile options), with only the closed-form backward, with the residual boundaries too, as it is now
  (also `cpu_compilation`'s options), with the norms' statistics removed, with flax BatchNorm (the L1/UCS
  models), and PyTorch's; interleaved."""
  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from run import cifar_trainer, step_runner

  closed, autodiff = norm.bounded_norm_train, norm.bounded_norm_train_autodiff
  variants = {  # name: (norm training function, residual boundaries, compile options, (penalty, model norm))
      "before": (autodiff, False, False, ("rni", "bounded")),
      "closed_form": (closed, False, False, ("rni", "bounded")),
      "boundaries": (closed, True, False, ("rni", "bounded")),
      "default": (closed, True, True, ("rni", "bounded")),
      "no_statistics": (scale_only, True, True, ("rni", "bounded")),
      "flax_batchnorm": (closed, True, True, ("l1", "batch")),
  }
  rows = []
  for name in ("cifar_resnet56", "cifar_vgg16"):
    fns = {}
    for key, (function, boundaries, options, (penalty, model_norm)) in variants.items():
      with norm_training_function(function), residual_boundaries(boundaries), compiler_options(options):
        fns[key] = first_call_done(step_runner(cifar_trainer(name, batch, penalty, norm=model_norm))[0])
    try:
      from torch_reference import make_train_step

      fns["torch"] = make_train_step(name, batch)
    except ImportError:
      pass
    times = interleaved_seconds(fns, rounds=3 if quick else 9)
    row = {"model": name, "batch": batch}
    row.update({f"{key}_step_ms": 1e3 * statistics.median(t) for key, t in times.items()})
    row["speedup"] = median_ratio(times["before"], times["default"])
    row["speedup_closed_form_only"] = median_ratio(times["before"], times["closed_form"])
    row["speedup_closed_form_and_boundaries"] = median_ratio(times["before"], times["boundaries"])
    row["default_over_no_statistics"] = median_ratio(times["default"], times["no_statistics"])
    row["default_over_flax_batchnorm"] = median_ratio(times["default"], times["flax_batchnorm"])
    if "torch" in times:
      row["default_over_torch"] = median_over_median(times["default"], times["torch"])
    rows.append(row)
  return rows


def compiler_options(enabled: bool) -> contextlib.AbstractContextManager:
  """While open and not `enabled`, trainers compile their step with XLA's default options (no
  `cpu_compilation.training_compiler_options`), as before issue 16."""
  from receding_jax import cpu_compilation

  default = cpu_compilation.training_compiler_options
  return swapped(cpu_compilation, "training_compiler_options", default if enabled else lambda platform: None)


def residual_boundaries(enabled: bool) -> contextlib.AbstractContextManager:
  """While open and not `enabled`, ResNet blocks skip `layers.residual_boundary` (the step as it was
  before it)."""
  from receding_jax.models import resnet

  return swapped(resnet, "residual_boundary", resnet.residual_boundary if enabled else lambda x, train: x)


def first_call_done(run: Callable[[], object]) -> Callable[[], object]:
  """`run` after one call, so that its compilation (and the norm path it traced) happens here."""
  jax.block_until_ready(run())
  return run


def bench_norm(quick: bool) -> list[dict]:
  """The ``norm`` section: per-shape norm rows, then the training-step rows."""
  return norm_rows(quick) + training_step_rows(quick)


if __name__ == "__main__":
  for result in bench_norm(quick="--quick" in sys.argv):
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()})
    sys.stdout.flush()
