"""What an exported model expects as input, and the training pipeline's normalisation folded in front of it.

The training pipeline (`training.augment.Preprocessing`, `training.resident.normalize`) feeds a model
``(pixels / 255 - mean) / std`` of uint8 pixels, per channel, with ``config.dataset.mean``/``std`` given
on [0, 1] pixels. An export records that (`Normalisation`, in ``export_report.json``); with
``include_preprocessing`` the exported function takes the uint8 images the dataset stores and normalises
them itself, exactly so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from receding_jax.errors import InputError

#: How the training pipeline turns stored pixels into model inputs.
RAW_INPUT = "uint8 pixels in [0, 255], per channel: (pixels / 255 - mean) / std"


@dataclasses.dataclass(frozen=True)
class Normalisation:
  """Per-channel mean and std on [0, 1] pixels (as ``config.dataset``), and where they came from."""

  mean: tuple[float, ...]
  std: tuple[float, ...]
  source: str = "given"

  def __post_init__(self):
    mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
    if not mean or len(mean) != len(std) or not all(s > 0 for s in std):
      raise InputError(f"normalisation needs one positive std per mean, got mean {mean} std {std}")
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "std", std)

  def check_channels(self, channels: int) -> None:
    """Raises InputError unless there is one mean (broadcast) or one per input channel."""
    if len(self.mean) not in (1, channels):
      raise InputError(f"normalisation mean {self.mean} has {len(self.mean)} values; the model's input has "
                       f"{channels} channels")

  def normalize(self, pixels: Any) -> jax.Array:
    """float32 (pixels / 255 - mean) / std of uint8 `pixels` [..., C], as `training.resident.normalize`."""
    x = jnp.asarray(pixels).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)

  def report(self) -> dict[str, Any]:
    return {"mean": list(self.mean), "std": list(self.std), "source": self.source}


def with_preprocessing(infer: Callable[[jax.Array], jax.Array], normalisation: Normalisation) -> Callable:
  """uint8 images -> outputs: `infer` of the images normalised as in training."""
  def preprocessed(pixels):
    return infer(normalisation.normalize(pixels))
  return preprocessed


def random_images(count: int, shape: Sequence[int], seed: int) -> np.ndarray:
  """uint8 [count, *shape] uniform random pixels: the verification inputs of an export with preprocessing."""
  return np.random.default_rng(seed).integers(0, 256, size=(count, *shape), dtype=np.uint8)


def describe(input_shape: Sequence[int], num_classes: int, normalisation: Normalisation | None,
             included: bool) -> dict[str, Any]:
  """The report's ``preprocessing`` entry: what the exported files take and what they expect done to it."""
  return {
      "input_shape": list(input_shape), "input_dtype": "uint8" if included else "float32",
      "num_classes": int(num_classes), "included": included,
      "normalisation": normalisation.report() if normalisation else "unknown",
      "raw_input": RAW_INPUT if normalisation else "unknown",
      "expects": _expects(normalisation, included),
  }


def _expects(normalisation: Normalisation | None, included: bool) -> str:
  """One line: what to feed the exported files."""
  if normalisation is None:
    return "float32 inputs normalised as in training (mean and std unknown)"
  values = f"mean {list(normalisation.mean)}, std {list(normalisation.std)}"
  if included:
    return f"raw uint8 pixels [0, 255]; the files normalise them ({values})"
  return f"float32 (pixels / 255 - mean) / std, {values}"
