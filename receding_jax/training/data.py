"""The loop's data, one interface over two placements: chunks of batches on the devices.

``device``: the splits' uint8 images live on the accelerators (`resident`), many steps per dispatch.
``streaming``: batches are decoded and augmented on the host by Grain (`streaming`), one step per dispatch.
``config.data.placement = "auto"`` picks ``device`` when every split the run reads fits in
``config.data.device_budget_mb`` of uint8 images and its augmentation runs on the devices ('cifar',
'none' at the model's image size), else ``streaming``. Both keep the same guarantees: the order and the
augmentation of an epoch are functions of (seed, epoch), a resumed run sees the batches an uninterrupted
one would, and evaluation counts every example once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping

import jax
import ml_collections
import numpy as np

from receding_jax.training import resident, splits, streaming
from receding_jax.training.config import ConfigError
from receding_jax.training.steps import Batch, Prepare, chunk_sharding, ready


@dataclasses.dataclass(frozen=True)
class Feed:
  """One split's chunks ([k, batch, ...] arrays on the devices) and how a step's batch is prepared."""

  placement: str  # "device" or "streaming".
  steps: int  # Training: steps per epoch. Evaluation: batches.
  chunks: Callable[..., Iterator[Batch]]  # Training: (epoch, skip_steps). Evaluation: ().
  prepare: Prepare


def load_splits(config: ml_collections.ConfigDict, roles: tuple[str, ...]) -> dict[str, splits.Split]:
  """This process's shard of each of `roles`."""
  return {r: splits.load_split(config, r, jax.process_index(), jax.process_count()) for r in roles}


def split_megabytes(split: splits.Split) -> float:
  """The uint8 size of a whole split (every process's shard), in MB."""
  return splits.nbytes_estimate(split) * split.total_examples / max(split.num_examples, 1) / 2**20


def device_megabytes(shards: Mapping[str, splits.Split]) -> float:
  """MB the device placement holds: every split's uint8 images, and the training split a second time
  (each epoch is laid out as a permuted copy of it, `resident.lay_out_epoch`)."""
  return sum(split_megabytes(s) for s in shards.values()) + (split_megabytes(shards["train"]) if "train" in shards
                                                               else 0.0)


def choose_placement(config: ml_collections.ConfigDict, shards: Mapping[str, splits.Split]) -> str:
  """'device' or 'streaming' for `shards` (see the module doc); ValueError, naming both sizes, when
  'device' is asked for and cannot be done."""
  asked = config.data.placement
  size = device_megabytes(shards)
  budget = config.data.device_budget_mb
  if asked == "streaming":
    return asked
  why_not = None
  if config.dataset.augment not in resident.AUGMENTATIONS:
    why_not = f"its augmentation {config.dataset.augment!r} runs on the host only (device: {resident.AUGMENTATIONS})"
  elif size > budget:
    why_not = (f"its splits take {size:.1f} MB of uint8 images (the training split twice: each epoch is laid out "
               f"as a copy), more than data.device_budget_mb = {budget:g} MB")
  if why_not and asked == "device":
    raise ConfigError(f"data.placement = 'device' cannot hold this dataset: {why_not}")
  return "streaming" if why_not else "device"


def _check_image_size(images: np.ndarray, config: ml_collections.ConfigDict, role: str) -> np.ndarray:
  size, channels = config.dataset.image_size, len(config.dataset.mean)
  if images.shape[1:] != (size, size, channels):
    raise ConfigError(f"device-resident data needs {role} images of {size}x{size}x{channels} "
                     f"(dataset.image_size), got {images.shape[1:]}; use data.placement = 'streaming'")
  return images


def train_feed(config: ml_collections.ConfigDict, split: splits.Split, mesh: jax.sharding.Mesh,
               placement: str) -> Feed:
  """The training split's feed."""
  steps = streaming.steps_per_epoch(split, config.optim.batch_size)
  if placement == "device":
    images, labels = splits.decoded_arrays(split)
    arrays = resident.place_train(_check_image_size(images, config, "train"), labels, split.total_examples, mesh)
    chunks = lambda epoch, skip: resident.train_chunks(arrays, config, mesh, split.total_examples, steps, epoch, skip)
    return Feed(placement, steps, chunks, resident.make_prepare(config, train=True))

  def streamed(epoch: int, skip: int) -> Iterator[Batch]:
    for local in streaming.train_batches(split, config, epoch, skip):
      yield as_chunk(local, mesh)

  return Feed(placement, steps, streamed, ready)


def eval_feed(config: ml_collections.ConfigDict, split: splits.Split, mesh: jax.sharding.Mesh, placement: str,
              role: str) -> Feed:
  """An evaluation split's feed (padded batches with a mask)."""
  if placement == "device":
    images, labels = splits.decoded_arrays(split)
    arrays = resident.place_eval(_check_image_size(images, config, role), labels, split.total_examples,
                                 config.optim.batch_size, mesh)
    return Feed(placement, int(arrays["label"].shape[0]), lambda: iter([arrays]),
                resident.make_prepare(config, train=False))

  def streamed() -> Iterator[Batch]:
    for local in streaming.eval_batches(split, config):
      yield as_chunk(local, mesh)

  return Feed(placement, -1, streamed, ready)


def as_chunk(local: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> Batch:
  """Every process's local batch -> one global chunk of one step, [1, global batch, ...]."""
  sharding = chunk_sharding(mesh)
  n = jax.process_count()
  return {k: jax.make_array_from_process_local_data(
      sharding, np.asarray(v)[None], (1, np.shape(v)[0] * n, *np.shape(v)[1:])) for k, v in local.items()}
