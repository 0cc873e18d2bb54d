"""The model a checkpoint's JSON spec describes: a zoo model or a user's factory, narrowed if pruned.

A spec is the zoo's (`models.SPEC_KEYS`: name, num_classes, norm, compute_dtype, overrides) or names a
factory, ``{"factory": "my_package.nets:make_net", "factory_kwargs": {...}, "input_shape": [32, 32, 3]}``
(the factory returns a Linen module). A pruned checkpoint's spec adds ``"pruned"``: the narrowed layers'
width attributes by module path (`pruning.rebuild`), so it reloads without pickle and without the original.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from receding_jax import pruning
from receding_jax.errors import InputError
from receding_jax.models import model_from_spec

EXTRA_KEYS = ("factory", "factory_kwargs", "input_shape", "pruned", "shrunk")


def import_factory(text: str) -> Any:
  """The callable named 'package.module:attribute'; ValueError in one line if it cannot be imported."""
  module_name, _, attribute = str(text).partition(":")
  if not module_name or not attribute:
    raise InputError(f"a model factory is named 'module:function', got {text!r}")
  try:
    factory = getattr(importlib.import_module(module_name), attribute)
  except (ImportError, AttributeError) as e:
    raise InputError(f"cannot import the model factory {text!r}: {e}") from None
  if not callable(factory):
    raise InputError(f"the model factory {text!r} is not callable")
  return factory


def base_model(spec: Mapping[str, Any]) -> nn.Module:
  """The unpruned model of `spec` (zoo or factory)."""
  if "factory" in spec:
    model = import_factory(spec["factory"])(**dict(spec.get("factory_kwargs", {})))
    if not isinstance(model, nn.Module):
      raise InputError(f"the model factory {spec['factory']!r} returned {type(model).__name__}, not a Linen module")
    return model
  return model_from_spec({k: v for k, v in spec.items() if k not in EXTRA_KEYS})


def build_model(spec: Mapping[str, Any]) -> nn.Module:
  """The model of `spec`: `base_model`, narrowed by its ``pruned`` widths if it has them."""
  model = base_model(spec)
  return pruning.narrow_linen(model, spec["pruned"]) if spec.get("pruned") else model


def example_inputs(spec: Mapping[str, Any]) -> jax.ShapeDtypeStruct | None:
  """The input spec pruning traces with: the spec's ``input_shape`` (batch 1); None means the model's own."""
  if "input_shape" in spec:
    return jax.ShapeDtypeStruct((1, *spec["input_shape"]), jnp.float32)
  return None
