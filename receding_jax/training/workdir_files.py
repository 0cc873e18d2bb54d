"""A run's workdir apart from its checkpoints: the lock, config.json, and the JSON/text files it reports in.

The one owner of these files. Every write is atomic (a temporary file renamed over the target, so a kill
never leaves half a file) and happens on process 0 only; the other processes of a multi-host run learn
what process 0 decided through `agree`.

The lock (``WORKDIR/lock``) keeps two runs out of one workdir: the holder keeps an exclusive `flock` on
it and writes its process id and host into it. The kernel drops a `flock` when its holder dies, so a
lock left by a killed run never blocks the restart. On a filesystem without `flock` (some network and
FUSE mounts) the lock falls back to its contents: a holder on this host that is no longer alive is stale.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from receding_jax.training.config import differing_keys

LOCK_NAME = "lock"
CONFIG_NAME = "config.json"
_held: dict[str, int] = {}  # Workdirs this process holds -> nesting depth (a run holds its own workdir once).


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


def is_writer() -> bool:
  """True on the process that writes reports and deletes files (process 0)."""
  return jax.process_index() == 0


def agree(value: int) -> int:
  """Process 0's `value` on every process (a no-op with one process): how all agree on a decision."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def sync(name: str) -> None:
  """Waits until every process got here (a no-op with one process): after process 0 changed files."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def read_json(path: str) -> Any:
  """The JSON value at `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_text(path: str, text: str) -> None:
  """Atomically writes `text` to `path` on process 0 (a no-op elsewhere)."""
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, value: Any) -> None:
  """Atomically writes `value` as indented JSON on process 0."""
  write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def check_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Records the config in ``workdir/config.json``, or refuses a workdir that holds another config's run."""
  path = os.path.join(workdir, CONFIG_NAME)
  current = json.loads(config.to_json_best_effort())
  saved = read_json(path)
  if saved is not None and saved != current:
    raise ValueError(f"workdir {workdir} holds a run of another config (differs in "
                     f"{differing_keys(saved, current)}); use a new workdir")
  if saved is None:
    write_json(path, current)


def same_config(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """True when ``workdir/config.json`` records exactly `config`."""
  return read_json(os.path.join(workdir, CONFIG_NAME)) == json.loads(config.to_json_best_effort())


def _holder(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


def _describe(holder: dict[str, Any]) -> str:
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
  return f"process {holder.get('pid', '?')} on host {holder.get('host', '?')} (since {since})"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _stale_without_flock(path: str) -> bool:
  """Without `flock`: is the holder written in the lock file gone (or none)? Only decidable on its host."""
  holder = _holder(path)
  if not holder:
    return True
  if holder.get("host") != socket.gethostname():
    raise WorkdirLockedError(f"{os.path.dirname(path)} is locked by {_describe(holder)}; this filesystem has no "
                             f"flock, so a holder on another host cannot be checked: if no run uses it, delete {path}")
  return not _pid_alive(int(holder.get("pid", -1)))


def _acquire(workdir: str) -> int:
  """An open descriptor holding the flock on ``workdir/lock``; WorkdirLockedError if a live run holds it."""
  path = os.path.join(workdir, LOCK_NAME)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirLockedError(f"workdir {workdir} is in use by {_describe(_holder(path))}; wait until it "
                               "ends or use another workdir") from None
    except OSError as e:
      try:
        stale = e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) and _stale_without_flock(path)
      except WorkdirLockedError:
        os.close(fd)
        raise
      if not stale:
        os.close(fd)
        raise WorkdirLockedError(f"workdir {workdir} is in use by {_describe(_holder(path))}") from None
    try:  # The file we locked must still be the one at `path` (a releasing holder unlinks it).
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
  os.fsync(fd)
  return fd


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds `workdir` (created if needed) for the duration; nested holds by the same process are free.

  Process 0 takes the lock; every process raises WorkdirLockedError if it could not.
  """
  workdir = os.path.abspath(workdir)
  if workdir in _held:
    _held[workdir] += 1
    try:
      yield
    finally:
      _held[workdir] -= 1
    return
  fd, error = None, None
  if is_writer():
    os.makedirs(workdir, exist_ok=True)
    try:
      fd = _acquire(workdir)
    except WorkdirLockedError as e:
      error = e
  if not agree(error is None):
    raise error or WorkdirLockedError(f"process 0 could not lock workdir {workdir} (see its output)")
  _held[workdir] = 1
  try:
    yield
  finally:
    del _held[workdir]
    if fd is not None:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(workdir, LOCK_NAME))
      os.close(fd)
