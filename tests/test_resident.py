"""Device-resident data: epoch order independent of processes and devices, chunking, on-device augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multidevice import run_with_cpu_devices

from receding_jax.training import data, resident
from receding_jax.training.config import default_config


@pytest.mark.parametrize("steps,skip,target", [(18, 0, 100), (781, 0, 100), (781, 300, 100), (97, 5, 10), (5, 4, 2)])
def test_chunks_cover_the_rest_of_the_epoch_once_with_few_shapes(steps, skip, target):
  lengths = resident.chunk_lengths(steps, skip, target)
  assert sum(lengths) == steps - skip and all(1 <= n <= target for n in lengths)
  assert len(set(lengths[1:-1])) <= 1  # One shape in the middle: one compilation for most chunks.
  assert len(lengths) <= (steps - skip) // max(1, min(steps, target) // 2) + 2


def examples_of(rows: np.ndarray, process_count: int, rows_per_process: int) -> np.ndarray:
  """Inverse of the layout: which example of the split sits at each global row."""
  return (rows % rows_per_process) * process_count + rows // rows_per_process


@pytest.mark.parametrize("processes", [2, 3])
def test_an_epoch_is_the_same_examples_in_the_same_order_whatever_the_process_count(processes):
  total, steps, batch = 103, 6, 16
  key = jax.random.key(7)
  one = np.asarray(resident.epoch_rows(key, 4, total, steps, batch, 1, total))
  rows = resident.rows_per_process(total, processes, 2)
  many = np.asarray(resident.epoch_rows(key, 4, total, steps, batch, processes, rows))
  np.testing.assert_array_equal(examples_of(many, processes, rows), one)
  assert len(np.unique(one)) == steps * batch and one.max() < total  # Each example at most once.
  # A process holds rows [p R, (p + 1) R): every row used belongs to a real example of its shard.
  assert np.all(many % rows < np.array([len(range(p, total, processes)) for p in range(processes)])[many // rows])
  other = np.asarray(resident.epoch_rows(key, 5, total, steps, batch, 1, total))
  assert not np.array_equal(one, other)


def test_random_crop_and_flip_gives_crops_of_the_zero_padded_image():
  rng = np.random.default_rng(0)
  images = rng.integers(1, 256, (32, 6, 6, 2), dtype=np.uint8)  # No zero pixels: padding is visible.
  out = np.asarray(resident.random_crop_and_flip(jnp.asarray(images), jax.random.key(3), pad=2))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  found = []
  for i in range(len(images)):
    matches = [(dy, dx, flip) for dy in range(5) for dx in range(5) for flip in (False, True)
               if np.array_equal((lambda c: c[:, ::-1] if flip else c)(padded[i, dy:dy + 6, dx:dx + 6]), out[i])]
    assert matches, f"image {i} is not a (flipped) crop of its padded image"
    found.append(matches[0])
  assert len({(dy, dx) for dy, dx, _ in found}) > 5 and 0 < sum(f for *_, f in found) < len(found)


def test_evaluation_layout_holds_every_example_once_with_a_mask():
  mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  images = np.arange(45, dtype=np.uint8).reshape(45, 1, 1, 1)
  laid = resident.place_eval(images, np.arange(45), 45, 16, mesh)
  assert laid["image"].shape == (3, 16, 1, 1, 1) and float(laid["mask"].sum()) == 45
  real = np.asarray(laid["label"])[np.asarray(laid["mask"]) == 1]
  np.testing.assert_array_equal(np.sort(real), np.arange(45))


EIGHT_DEVICE_LAYOUT = """
import jax, numpy as np
from receding_jax.training import data, resident
from receding_jax.training.config import default_config
total, steps, batch = 50, 3, 16
images = np.random.default_rng(0).integers(0, 256, (total, 4, 4, 3), dtype=np.uint8)
out = []
for devices in (jax.devices(), jax.devices()[:1]):
  mesh = jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)
  arrays = resident.place_train(images, np.arange(total), total, mesh)
  assert len(arrays["image"].sharding.device_set) == len(devices)
  laid = resident.lay_out_epoch(arrays, jax.random.key(1), 2, total=total, steps=steps, batch=batch,
                                process_count=1, rows=arrays["label"].shape[0], mesh=mesh)
  assert len(laid["image"].sharding.device_set) == len(devices)
  out.append(jax.device_get(laid))
np.testing.assert_array_equal(out[0]["image"], out[1]["image"])
np.testing.assert_array_equal(out[0]["image"], images[out[0]["label"]])
print("ok", out[0]["label"].shape)
"""


def test_eight_devices_lay_out_the_same_epoch_as_one():
  assert run_with_cpu_devices(EIGHT_DEVICE_LAYOUT).split()[:1] == ["ok"]


def digits_config(**data):
  c = default_config()
  c.dataset.name, c.dataset.image_size, c.dataset.augment = "digits", 8, "none"
  c.dataset.mean, c.dataset.std = (0.3,), (0.4,)
  for k, v in data.items():
    c.data[k] = v
  return c


def test_placement_is_the_device_when_the_splits_fit_and_a_forced_misfit_names_both_sizes():
  c = digits_config()
  shards = data.load_splits(c, ("train", "test"))
  once = sum(data.split_megabytes(s) for s in shards.values())
  assert once == pytest.approx(1797 * 64 / 2**20, rel=1e-6)  # 8x8x1 uint8 digits, train + test.
  # The training split counts twice: each epoch is laid out on the devices as a permuted copy of it.
  size = data.device_megabytes(shards)
  assert size == pytest.approx((1797 + 1500) * 64 / 2**20, rel=1e-6)
  assert data.choose_placement(c, shards) == "device"
  c.data.device_budget_mb = (once + size) / 2  # Holds the splits once, not with the epoch's copy.
  assert data.choose_placement(c, shards) == "streaming"
  c.data.device_budget_mb = size / 2
  assert data.choose_placement(c, shards) == "streaming"
  c.data.placement = "device"
  with pytest.raises(ValueError, match=rf"take {size:.1f} MB .* more than data.device_budget_mb = {size / 2:g} MB"):
    data.choose_placement(c, shards)
  c.data.device_budget_mb, c.dataset.augment = 1e6, "imagenet"
  with pytest.raises(ValueError, match="augmentation 'imagenet' runs on the host only"):
    data.choose_placement(c, shards)
