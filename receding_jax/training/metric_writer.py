"""TensorBoard event files of a run, written with tensorboardX: no TensorFlow (clu's writers import it).

`open_writer(workdir, active)` gives what the loop logs through: `write_scalars`, `write_histograms` and
`close`. Each call writes one event and flushes it at once (the loop logs once an epoch), so a killed run
keeps everything it logged. Only the active process (process 0) writes; the others get a writer that
writes nothing. A URI workdir (``gs://``) is written through `etils.epath`, like every other run file:
the events file is uploaded whole at each flush.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath
from tensorboardX import record_writer, summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from receding_jax.training import workdir as wd

HISTOGRAM_BINS = 64  # Uniform over each array's [min, max]; TensorBoard re-bins for display anyway.


class _EpathEventFile:
  """An events file behind a URI: kept in memory, uploaded whole at each flush."""

  def __init__(self, path: str):
    self._path = epath.Path(path)
    self._data = io.BytesIO()

  def write(self, data: bytes) -> None:
    self._data.write(data)

  def flush(self) -> None:
    self._path.write_bytes(self._data.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathEventFiles:
  """tensorboardX's writer factory for a URI scheme, through epath."""

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


class MetricWriter:
  """Scalars and histograms per step into one TensorBoard events file; writes nothing without one."""

  def __init__(self, events: EventsWriter | None):
    self._events = events

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One scalar per name (TensorBoard's scalars dashboard)."""
    self._write(step, [v for name, x in scalars.items() for v in summary.scalar(name, float(x)).value])

  def write_histograms(self, step: int, arrays: Mapping[str, Any]) -> None:
    """A histogram of each array's values (empty arrays are skipped: TensorBoard has no empty histogram)."""
    values = [v for name, a in arrays.items() if np.size(a)
              for v in summary.histogram(name, np.asarray(a, np.float64).ravel(), HISTOGRAM_BINS).value]
    self._write(step, values)

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if self._events is None or not values:
      return
    self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                             summary=summary_pb2.Summary(value=values)))
    self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def open_writer(workdir: wd.PathLike, active: bool) -> MetricWriter:
  """A writer of a new events file in `workdir` (local or ``gs://``); one that writes nothing unless `active`
  (pass ``jax.process_index() == 0``)."""
  if not active:
    return MetricWriter(None)
  directory = wd.path(workdir)
  if not wd.is_local(directory):
    record_writer.register_writer_factory(os.fspath(directory).split("://")[0], _EpathEventFiles())
  directory.mkdir(parents=True, exist_ok=True)
  return MetricWriter(EventsWriter(os.fspath(directory / "events")))
