"""Random access to a tfds split stored as TFRecord (tfds' default format), without TensorFlow.

The project's one reader of the TFRecord framing and of ``tf.train.Example``. tf.data can only stream a
TFRecord file; this module indexes it instead, so that its splits are read like ArrayRecord ones
(`splits`): by position, in any order, from any thread, the same records in the same order.

- Framing (TensorFlow's ``record_writer.cc``): each record is a uint64 length (little endian), the masked
  crc32c of those 8 bytes (uint32), the data, and the masked crc32c of the data (uint32).
- `load` indexes a split by reading only the 12-byte headers of its records and seeking past the data,
  checking every length's CRC, the file's size and tfds' count of the shard's examples: a truncated or
  corrupt file stops the run before training, naming the file and the byte.
- The data's CRC is checked on each read with the C crc32c of ``google_crc32c`` (the ``[train]`` extra
  installs it; 5 us per 110 KB). Without it the data is not checked: crc32c in pure Python runs at 5-8
  MB/s holding the GIL (about 20 ms per ImageNet JPEG, several times its decoding).
- Which files and records make up a split, slices such as ``'train[10:25]'`` included, comes from tfds'
  own metadata (``file_instructions``); an example is parsed by tfds' copy of the ``tf.train.Example``
  protocol buffer (``tensorflow_datasets.proto.tf_example_pb2``). Images stay encoded.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from etils import epath
from google.protobuf.message import DecodeError

from receding_jax.errors import InputError

try:  # A C crc32c checks the data of each record at no noticeable cost.
  import google_crc32c

  _fast_crc32c = google_crc32c.value if google_crc32c.implementation == "c" else None
except ImportError:
  _fast_crc32c = None

HEADER_BYTES = 12  # uint64 length + uint32 masked crc32c of it.
FOOTER_BYTES = 4  # uint32 masked crc32c of the data.
#: Files indexed at once (reading headers waits on storage, not on Python).
INDEX_THREADS = 16


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli's polynomial, reflected.
    table.append(crc)
  return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, in pure Python: for the 8-byte lengths."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc(crc: int) -> int:
  """The masked form TFRecord stores (a CRC of data holding CRCs is otherwise weak)."""
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _corrupt(path: str, offset: int, why: str) -> ValueError:
  return ValueError(f"TFRecord file {path} is corrupt at byte {offset}: {why}; download or prepare the "
                    "dataset again")


def _index_file(path: str, count: int, whole: bool) -> tuple[np.ndarray, np.ndarray]:
  """(offsets of the data, lengths) int64 [count] of the file's first `count` records, from their headers;
  with `whole`, the file must end right after them."""
  offsets, lengths = [], []
  position = 0
  with epath.Path(path).open("rb") as f:
    size = f.seek(0, 2)
    for i in range(count):
      f.seek(position)
      header = f.read(HEADER_BYTES)
      if len(header) < HEADER_BYTES:
        raise _corrupt(path, position, f"the file ends after {i} records, tfds counts at least {count}")
      length, length_crc = struct.unpack("<QI", header)
      if masked_crc(crc32c(header[:8])) != length_crc:
        raise _corrupt(path, position, "the record's length fails its CRC")
      offsets.append(position + HEADER_BYTES)
      lengths.append(length)
      position += HEADER_BYTES + length + FOOTER_BYTES
      if position > size:
        raise _corrupt(path, offsets[-1], f"the file is truncated ({size} bytes, the record needs {position})")
  if whole and position != size:
    raise _corrupt(path, position, f"{size - position} bytes follow the {count} records that tfds counts")
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


def _read_bytes(path: str, offset: int, size: int) -> bytes:
  """Up to `size` bytes at `offset`, opening the file for this read alone: safe from any number of threads,
  and no handle held per file (ImageNet has 1,024 training files)."""
  if "://" in path:  # gs:// and other remote storage, through epath.
    with epath.Path(path).open("rb") as f:
      f.seek(offset)
      return f.read(size)
  fd = os.open(path, os.O_RDONLY)  # A local file: one pread, a tenth of the cost of an epath open.
  try:
    return os.pread(fd, size, offset)
  finally:
    os.close(fd)


def _read(path: str, offset: int, length: int) -> bytes:
  """The data of the record at `offset`, its CRC checked where a C crc32c is importable."""
  data = _read_bytes(path, offset, length + FOOTER_BYTES)
  if len(data) < length + FOOTER_BYTES:
    raise _corrupt(path, offset, "the file is truncated")
  if _fast_crc32c is not None:
    (stored,) = struct.unpack("<I", data[length:])
    if masked_crc(_fast_crc32c(data[:length])) != stored:
      raise _corrupt(path, offset, "the record's data fails its CRC")
  return data[:length]


def parse_example(data: bytes) -> dict[str, list[Any]]:
  """A serialized tf.train.Example as {feature name: its values (bytes, int or float)}."""
  from tensorflow_datasets.proto import tf_example_pb2

  parsed = {}
  for name, feature in tf_example_pb2.Example.FromString(data).features.feature.items():
    kind = feature.WhichOneof("kind")  # bytes_list, float_list, int64_list, or None where empty.
    parsed[name] = list(getattr(feature, kind).value) if kind else []
  return parsed


@dataclasses.dataclass(frozen=True, eq=False)
class TFRecordSource:
  """A split's records by position: ``len``, ``[i]`` -> {'image': encoded bytes, 'label': int}."""

  files: tuple[str, ...]
  file_ids: np.ndarray  # int32 [n]: which of `files` holds record i.
  offsets: np.ndarray  # int64 [n]: where its data starts.
  lengths: np.ndarray  # int64 [n]: its data's length.

  def __len__(self) -> int:
    return len(self.offsets)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path, offset = self.files[self.file_ids[index]], int(self.offsets[index])
    data = _read(path, offset, int(self.lengths[index]))
    try:
      example = parse_example(data)
      return {"image": example["image"][0], "label": int(example["label"][0])}
    except (DecodeError, KeyError, IndexError) as e:  # Not an Example, or one without image or label.
      raise InputError(f"TFRecord file {path}: the record at byte {offset} is not a tfds example with an "
                       f"'image' and a 'label' ({type(e).__name__}: {e})") from None


def load(builder: Any, split: str) -> TFRecordSource:
  """The records of `split` (e.g. 'train', 'train[10:25]') of a tfds builder prepared as TFRecord, indexed:
  a ValueError naming the file and byte where a file is corrupt, and the way out for other formats."""
  import tensorflow_datasets as tfds

  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise InputError(f"tfds dataset {builder.name!r} is stored as {builder.info.file_format.value}, which "
                     f"is read neither by tfds.data_source nor here: re-prepare it as ArrayRecord: "
                     f"tfds build {builder.name} --file_format=array_record")
  instructions = builder.info.splits[split].file_instructions

  def index(instruction: Any) -> tuple[np.ndarray, np.ndarray]:
    total = instruction.examples_in_shard
    take = total - instruction.skip if instruction.take < 0 else instruction.take  # -1: to the shard's end.
    offsets, lengths = _index_file(instruction.filename, instruction.skip + take, instruction.skip + take == total)
    return offsets[instruction.skip :], lengths[instruction.skip :]

  with ThreadPoolExecutor(max(1, min(INDEX_THREADS, len(instructions)))) as pool:
    parts = list(pool.map(index, instructions))
  files = tuple(instruction.filename for instruction in instructions)
  file_ids = np.concatenate([np.full(len(o), i, np.int32) for i, (o, _) in enumerate(parts)] or [np.zeros(0, np.int32)])
  offsets = np.concatenate([o for o, _ in parts] or [np.zeros(0, np.int64)])
  lengths = np.concatenate([n for _, n in parts] or [np.zeros(0, np.int64)])
  return TFRecordSource(files, file_ids, offsets, lengths)
