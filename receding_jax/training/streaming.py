"""The Grain input pipeline: local batches of a `splits.Split`, decoded and augmented by threads, no TensorFlow.

Each process produces *local* batches of ``global_batch // process_count`` examples from its own part of
the split; the training loop assembles them into global arrays. Guarantees:

- Training: one epoch = ``(examples // process_count) // local_batch`` steps on every process (the
  remainder is dropped). The order of epoch ``e`` is a permutation seeded by (config.seed, e), and an
  example's augmentation is seeded by (config.seed, e, its position in the split), so a run restarted at
  any epoch, or at any step of it (`skip_steps`, which skips without decoding), sees bit for bit the
  batches an uninterrupted run would have seen.
- Evaluation: every example of the split counts exactly once: batches are padded with zero examples whose
  ``mask`` is 0, and every process runs the same number of batches.

Batches are dicts of numpy arrays: ``image`` float32 [batch, H, W, C] (normalised), ``label`` int32
[batch], and in evaluation ``mask`` float32 [batch] (1 = real example).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from receding_jax.training import augment
from receding_jax.training.config import ConfigError
from receding_jax.training.splits import Split

Batch = dict[str, np.ndarray]
#: Threads that read, decode and augment examples (numpy and Pillow release the GIL for the heavy parts).
THREADS = min(16, 2 * (os.cpu_count() or 1))


def steps_per_epoch(split: Split, global_batch: int) -> int:
  """Training steps per epoch: the same on every process (the smallest shard decides)."""
  local_batch = global_batch // split.process_count
  if local_batch < 1:
    raise ConfigError(f"batch size {global_batch} is smaller than the number of processes ({split.process_count})")
  steps = (split.total_examples // split.process_count) // local_batch
  if steps < 1:
    raise ConfigError(f"batch size {global_batch} is larger than the training split ({split.total_examples})")
  return steps


def epoch_seed(seed: int, epoch: int) -> int:
  """The seed of epoch `epoch`'s order: a function of (seed, epoch) only, in [0, 2**31)."""
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)


def stack(examples: Sequence[dict[str, Any]]) -> Batch:
  """One batch from a list of examples with the same keys."""
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def _threaded(batches: grain.MapDataset) -> Iterator[Batch]:
  """Iterate `batches` (one element = one whole batch) in order, each made by one of THREADS threads.

  Grain's per-element bookkeeping costs tens of microseconds, as much as augmenting a CIFAR image, so the
  unit of work handed to Grain is a batch rather than an example."""
  return iter(batches.to_iter_dataset(grain.ReadOptions(num_threads=THREADS, prefetch_buffer_size=2 * THREADS)))


def _normalizer(preprocess: augment.Preprocessing) -> Callable[[Batch], Batch]:
  """Batch of uint8 pixels -> normalised float32 (one numpy pass per batch, not per example); padding
  examples (mask 0) are all zeros."""

  def finish(batch: Batch) -> Batch:
    image = preprocess.normalize(batch["image"])
    if "mask" in batch:
      image[batch["mask"] == 0] = 0.0
    return {**batch, "image": image}

  return finish


def train_batches(split: Split, config: ml_collections.ConfigDict, epoch: int, skip_steps: int = 0) -> Iterator[Batch]:
  """The local training batches of `epoch` (from step `skip_steps` on): shuffled and augmented as a
  function of (config.seed, epoch) only."""
  local_batch = config.optim.batch_size // split.process_count
  steps = steps_per_epoch(split, config.optim.batch_size)
  start, stop = min(skip_steps, steps) * local_batch, steps * local_batch
  preprocess, seed = augment.Preprocessing.from_config(config), config.seed
  finish = _normalizer(preprocess)

  def example(position: int, record: dict) -> dict[str, np.ndarray]:
    rng = augment.example_rng(seed, epoch, position)
    return {"image": preprocess.pixels(record["image"], rng), "label": np.int32(record["label"])}

  order = np.random.default_rng(epoch_seed(seed, epoch)).permutation(split.num_examples)[:stop]
  source = split.source

  def batch(step: int) -> Batch:
    indices = order[step * local_batch : (step + 1) * local_batch]
    return finish(stack([example(split.position(i), source[i]) for i in indices]))

  return _threaded(grain.MapDataset.range(start // local_batch, steps).map(batch))  # Skipped steps: never read.


def eval_batches(split: Split, config: ml_collections.ConfigDict) -> Iterator[Batch]:
  """Local evaluation batches covering the split's part once, padded (mask 0) so that every process runs
  ceil(ceil(total / processes) / local_batch) batches."""
  local_batch = max(1, config.optim.batch_size // split.process_count)
  largest_part = max(split.num_examples, math.ceil(split.total_examples / split.process_count))
  padded = math.ceil(largest_part / local_batch) * local_batch
  preprocess = augment.Preprocessing.from_config(config)
  finish = _normalizer(preprocess)
  zeros = {"image": np.zeros((preprocess.size, preprocess.size, preprocess.channels), np.uint8),
           "label": np.int32(0), "mask": np.float32(0)}

  def example(record: dict | None) -> dict[str, np.ndarray]:
    if record is None:
      return zeros
    return {"image": preprocess.pixels(record["image"], None), "label": np.int32(record["label"]),
            "mask": np.float32(1)}

  source, n = split.source, split.num_examples

  def batch(step: int) -> Batch:
    indices = range(step * local_batch, (step + 1) * local_batch)
    return finish(stack([example(source[i] if i < n else None) for i in indices]))

  return _threaded(grain.MapDataset.range(padded // local_batch).map(batch))
