"""The model zoo: Flax Linen networks parametrised by explicit per-layer widths, norm chosen by name.

A pruned network is the same class built with narrower widths, so checkpoints of pruned models restore
into `get_model(name, ..., widths=...)` / `inner_widths=...` without any other change. Every model
computes in its `compute_dtype` ('float32' or 'bfloat16'), with float32 parameters, batch statistics
and logits either way. Every model traces the plain formulation unless its `cpu_friendly` attribute asks
for the one XLA:CPU runs faster; the trainer decides that from the devices it runs on (`for_platform`),
never the machine that traces the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn

from receding_jax.errors import InputError
from receding_jax.models.layers import COMPUTE_DTYPES, NORM_KINDS, check_compute_dtype, check_norm_kind
from receding_jax.models.resnet import BasicBlock, Bottleneck, CifarResNet, ResNet
from receding_jax.models.vgg import VGG16_WIDTHS, CifarVGG, ImageNetVGG


def _scaled(widths, multiplier: float) -> tuple[int, ...]:
  return tuple(max(1, round(w * multiplier)) for w in widths)


def _cifar_vgg16(num_classes, norm, width_multiplier=1.0, **kw):
  kw.setdefault("widths", _scaled(VGG16_WIDTHS, width_multiplier))
  return CifarVGG(num_classes=num_classes, norm=norm, **kw)


def _vgg16(num_classes, norm, width_multiplier=1.0, **kw):
  kw.setdefault("widths", _scaled(VGG16_WIDTHS, width_multiplier))
  return ImageNetVGG(num_classes=num_classes, norm=norm, **kw)


def _cifar_resnet(depth: int) -> Callable[..., nn.Module]:
  def build(num_classes, norm, width_multiplier=1.0, **kw):
    kw.setdefault("stage_widths", _scaled((16, 32, 64), width_multiplier))
    return CifarResNet(blocks_per_stage=(depth - 2) // 6, num_classes=num_classes, norm=norm, **kw)

  return build


def _resnet50(num_classes, norm, width_multiplier=1.0, **kw):
  kw.setdefault("stage_widths", _scaled((64, 128, 256, 512), width_multiplier))
  return ResNet(num_classes=num_classes, norm=norm, **kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "cifar_vgg16": _cifar_vgg16,
    "cifar_resnet20": _cifar_resnet(20),
    "cifar_resnet56": _cifar_resnet(56),
    "cifar_resnet110": _cifar_resnet(110),
    "resnet50": _resnet50,
    "vgg16": _vgg16,
}


def get_model(
    name: str, num_classes: int, norm: str = "bounded", compute_dtype: str = "float32", **overrides: Any
) -> nn.Module:
  """Builds a zoo model by name.

  Args:
    name: one of MODELS ('cifar_vgg16', 'cifar_resnet20/56/110', 'resnet50', 'vgg16').
    num_classes: classifier outputs.
    norm: 'bounded' (BoundedScaleNorm) or 'batch' (flax BatchNorm).
    compute_dtype: 'float32' or 'bfloat16' (mixed precision: bf16 convolutions, dense layers and
      activations; float32 parameters, batch statistics and logits).
    **overrides: model attributes (e.g. ``widths`` for VGG, ``inner_widths``/``stage_widths`` for
      ResNets, ``batch_norm_scale_init``), or ``width_multiplier`` to scale the default widths.
  """
  if name not in MODELS:
    raise InputError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
  check_norm_kind(norm)
  check_compute_dtype(compute_dtype)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise InputError(f"num_classes must be a positive int, got {num_classes!r}")
  try:
    return MODELS[name](num_classes, norm, compute_dtype=compute_dtype, **overrides)
  except TypeError as e:
    raise InputError(f"bad overrides {sorted(overrides)} for model {name!r}: {e}") from None


#: Keys of a model spec; all but 'name' and 'num_classes' may be missing ('compute_dtype' then 'float32').
SPEC_KEYS = ("name", "num_classes", "norm", "compute_dtype", "overrides")


def model_from_spec(spec: dict[str, Any]) -> nn.Module:
  """Rebuilds a model from a JSON-able spec {'name', 'num_classes', 'norm', 'compute_dtype', 'overrides'}
  (JSON lists in the overrides become tuples, so the model equals the one the spec was written from).
  Specs written before mixed precision have no 'compute_dtype' and rebuild float32 models."""
  unknown = sorted(set(spec) - set(SPEC_KEYS))
  if unknown or "name" not in spec or "num_classes" not in spec:
    raise InputError(f"a model spec needs 'name' and 'num_classes' (and may have 'norm', 'compute_dtype', "
                     f"'overrides'); got {spec}")
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("overrides", {}).items()}
  return get_model(spec["name"], spec["num_classes"], spec.get("norm", "bounded"),
                   spec.get("compute_dtype", "float32"), **overrides)


def for_platform(model: nn.Module, platform: str) -> nn.Module:
  """`model` in the formulation that runs fastest on `platform` (a device's ``platform``: 'cpu', 'gpu',
  'tpu'): zoo models (and pruned ones) get ``cpu_friendly`` True on 'cpu' and False elsewhere; a model
  without that attribute is returned as it is. Values and parameters are the same either way."""
  if not isinstance(getattr(model, "cpu_friendly", None), bool):
    return model
  wanted = platform == "cpu"
  return model if model.cpu_friendly == wanted else model.clone(cpu_friendly=wanted)


__all__ = [
    "COMPUTE_DTYPES",
    "MODELS",
    "NORM_KINDS",
    "SPEC_KEYS",
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "CifarVGG",
    "ImageNetVGG",
    "ResNet",
    "for_platform",
    "get_model",
    "model_from_spec",
]
