"""Device-resident data: a split's uint8 images placed on the devices once, batches cut and augmented there.

For splits that fit in accelerator memory (the digits, CIFAR): no per-step host work or transfer. The
training split lives as one global array [rows, H, W, C], sharded along the mesh's data axis over the
devices of every process. Process p contributes its shard (examples p, p + P, p + 2P, ... of the split,
`splits.load_split`) as rows [p R, (p + 1) R), padded to R rows; so example i sits at row
(i mod P) R + i div P, and the order of an epoch, a permutation of the split's examples seeded by
(seed, epoch), is the same whatever the number of devices or processes. At the start of an epoch one
gather lays the epoch out as [steps, batch, H, W, C]; a chunk of k steps is a slice of it, and each step's
augmentation (zero-pad, random crop, flip, as the streamed 'cifar' augmentation) runs inside the train
scan from a key of (seed, global step).

Evaluation splits are laid out once as [batches, batch] with a mask (0 on padding), every example once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from receding_jax.training.augment import CIFAR_PAD
from receding_jax.training.steps import DATA_AXIS, Batch, chunk_sharding, data_key

#: Augmentations the device-resident path computes (others stream from the host).
AUGMENTATIONS = ("cifar", "none")


def rows_per_process(total: int, process_count: int, local_devices: int) -> int:
  """Rows each process holds of a `total`-example split: its largest shard, rounded up to a multiple of
  its devices."""
  return math.ceil(math.ceil(total / process_count) / local_devices) * local_devices


def place_train(images: np.ndarray, labels: np.ndarray, total: int, mesh: jax.sharding.Mesh) -> Batch:
  """This process's shard ([n, H, W, C] uint8, [n]) as its rows of the global training arrays."""
  pc = jax.process_count()
  rows = rows_per_process(total, pc, jax.local_device_count())
  pad = rows - len(labels)
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)]).astype(np.int32)
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return {
      "image": jax.make_array_from_process_local_data(sharding, images, (pc * rows, *images.shape[1:])),
      "label": jax.make_array_from_process_local_data(sharding, labels, (pc * rows,)),
  }


def place_eval(images: np.ndarray, labels: np.ndarray, total: int, global_batch: int,
               mesh: jax.sharding.Mesh) -> Batch:
  """This process's shard of an evaluation split as its columns of [batches, global_batch] arrays with a
  'mask' (1 = real example); every process holds the same number of batches."""
  pc = jax.process_count()
  local_batch = global_batch // pc
  batches = max(1, math.ceil(math.ceil(total / pc) / local_batch))
  pad = batches * local_batch - len(labels)
  mask = np.concatenate([np.ones(len(labels), np.float32), np.zeros(pad, np.float32)])
  images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
  labels = np.concatenate([labels, np.zeros(pad, labels.dtype)]).astype(np.int32)
  local = {"image": images, "label": labels, "mask": mask}
  sharding = chunk_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(
      sharding, v.reshape(batches, local_batch, *v.shape[1:]), (batches, global_batch, *v.shape[1:]))
      for k, v in local.items()}


def epoch_rows(key: jax.Array, epoch: jax.Array, total: int, steps: int, batch: int, process_count: int,
               rows: int) -> jax.Array:
  """int32 [steps, batch]: the global rows of epoch `epoch`'s batches, a permutation of the examples
  seeded by (key, epoch) (the remainder of the epoch dropped), mapped to where each example lives."""
  order = jax.random.permutation(jax.random.fold_in(key, epoch), total)[: steps * batch]
  return ((order % process_count) * rows + order // process_count).reshape(steps, batch).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("total", "steps", "batch", "process_count", "rows", "mesh"))
def lay_out_epoch(arrays: Batch, key: jax.Array, epoch: jax.Array, *, total: int, steps: int, batch: int,
                  process_count: int, rows: int, mesh: jax.sharding.Mesh) -> Batch:
  """The epoch's batches in order: {'image' [steps, batch, H, W, C] uint8, 'label' [steps, batch]}."""
  where = epoch_rows(key, epoch, total, steps, batch, process_count, rows)
  out = {k: jnp.take(v, where, axis=0) for k, v in arrays.items()}
  return jax.lax.with_sharding_constraint(out, chunk_sharding(mesh))


@functools.partial(jax.jit, static_argnames=("length",))
def take_steps(epoch_arrays: Batch, start: jax.Array, length: int) -> Batch:
  """Steps [start, start + length) of an epoch laid out by `lay_out_epoch`."""
  return jax.tree.map(lambda v: jax.lax.dynamic_slice_in_dim(v, start, length, axis=0), epoch_arrays)


def chunk_lengths(steps: int, skip: int, target: int) -> list[int]:
  """Lengths of the chunks covering steps [skip, steps): whole multiples of a chunk length that divides
  `steps` where one near `target` does (one compiled shape per run), else `target` and a remainder."""
  divisors = [d for d in range(1, min(steps, target) + 1) if steps % d == 0]
  length = divisors[-1] if divisors[-1] * 2 > min(steps, target) else min(steps, target)
  first = min(steps, (skip // length + 1) * length) - skip
  lengths = [first] if first else []
  done = skip + first
  while done < steps:
    lengths.append(min(length, steps - done))
    done += lengths[-1]
  return lengths


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 pixels -> float32 (x / 255 - mean) / std, per channel."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop_and_flip(images: jax.Array, key: jax.Array, pad: int = CIFAR_PAD) -> jax.Array:
  """[B, H, W, C] uint8: each image zero-padded by `pad`, cropped back to H x W at a random offset and
  flipped left-right with probability 1/2 (the 'cifar' augmentation)."""
  b, h, w, c = images.shape
  offset_key, flip_key = jax.random.split(key)
  offsets = jax.random.randint(offset_key, (b, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(flip_key, 0.5, (b,))
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, c)))(padded, offsets)
  return jnp.where(flips[:, None, None, None], crop[:, :, ::-1], crop)


def make_prepare(config: ml_collections.ConfigDict, train: bool):
  """`prepare(batch, key)` for device-resident uint8 batches: augmentation (train, 'cifar') + normalising.
  The same settings give the same function, so the steps jitted around it are found again (`make_trainer`)."""
  d = config.dataset
  return _prepare(tuple(d.mean), tuple(d.std), d.augment, train)


@functools.cache
def _prepare(mean: tuple[float, ...], std: tuple[float, ...], augment: str, train: bool):
  def prepare(batch: Batch, key: jax.Array | None) -> dict[str, jax.Array]:
    images = batch["image"]
    if train and augment == "cifar":
      images = random_crop_and_flip(images, key)
    return {"image": normalize(images, mean, std), "label": batch["label"]}

  return prepare


def steps_per_dispatch(config: ml_collections.ConfigDict) -> int:
  """config.data.steps_per_dispatch, or where it is 0: 1 on CPUs, 100 on accelerators."""
  if config.data.steps_per_dispatch:
    return config.data.steps_per_dispatch
  return 1 if jax.devices()[0].platform == "cpu" else 100


def train_chunks(arrays: Batch, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, total: int,
                 steps: int, epoch: int, skip: int) -> Iterator[Batch]:
  """The chunks of `epoch` from step `skip` on (see `chunk_lengths`), each [k, batch, ...] on the devices."""
  pc = jax.process_count()
  laid = lay_out_epoch(
      arrays, jax.random.fold_in(data_key(config.seed), 1), jnp.int32(epoch), total=total, steps=steps,
      batch=config.optim.batch_size, process_count=pc, rows=arrays["label"].shape[0] // pc, mesh=mesh)
  start = skip
  for length in chunk_lengths(steps, skip, steps_per_dispatch(config)):
    yield take_steps(laid, jnp.int32(start), length)
    start += length
