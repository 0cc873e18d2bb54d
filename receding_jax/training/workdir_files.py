"""Who may use a workdir, and how the processes of a run agree on it: the lock, `agree`, `sync`, `check_config`.

Files are named, read and written by `receding_jax.training.workdir`; this module decides when. Only process
0 writes; the other processes of a multi-host run learn what process 0 decided through `agree`.

The lock (``WORKDIR/lock``) keeps two runs out of one workdir. Process 0 takes it and writes its process id,
host and boot id into it:
- On a local (or mounted) filesystem the holder also keeps an exclusive `flock` on it. The kernel drops a
  `flock` when its holder dies, so a lock left by a killed run never blocks the restart.
- On a URI workdir (``gs://``, no `flock` there), and on a filesystem without `flock` (some network and
  FUSE mounts), the contents decide: a holder on this host that is no longer alive, or that ran before the
  last reboot, is stale and taken over; a holder on another host cannot be checked, so the run stops and
  names the file to delete. Taking such a lock is check-then-write, not atomic: two runs started on one
  ``gs://`` workdir within the same second may both get in (the one that wrote last keeps the file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pathlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from receding_jax.training import workdir as wd
from receding_jax.training.config import ConfigError, describe_differences, trained_network_identity
from receding_jax.training.workdir import PathLike, is_writer, write_text

_held: dict[str, int] = {}  # Workdirs this process holds -> nesting depth (a run holds its own workdir once).


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


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


def check_config(workdir: PathLike, config: ml_collections.ConfigDict, *, record: bool = True) -> None:
  """Refuses (ConfigError, naming each differing key and both values) a workdir whose ``config.json``
  trained another network: keys of later phases (`PHASE_KEYS`: new ratios, other phases), keys since
  retired and keys that only say how to run do not count. Records the config there when there is none and
  `record`; without `record` (phases that only use a trained run) a workdir without one is refused."""
  saved = wd.read_config(workdir)
  current = json.loads(config.to_json_best_effort())
  if saved is None:
    if not record:
      raise ConfigError(f"workdir {workdir} holds no trained run (no {wd.config_path(workdir).name}); "
                        f"config.phases = {tuple(config.phases)} needs one: add 'train'")
    wd.write_config(workdir, current)
    return
  before, now = trained_network_identity(saved), trained_network_identity(current)
  if before != now:
    raise ConfigError(f"workdir {workdir} holds a run of another config: {describe_differences(before, now)}; "
                      "use a new workdir (keys of later phases, config.phases, prune.* and finetune.*, may differ)")


def _boot_id() -> str:
  """This machine's boot id (Linux), '' where unknown: a pid from another boot means nothing."""
  try:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  except OSError:
    return ""


def _owner() -> dict[str, Any]:
  return {"pid": os.getpid(), "host": socket.gethostname(), "boot": _boot_id(), "since": time.time()}


def _holder(lock: PathLike) -> dict[str, Any]:
  try:
    holder = wd.read_json(lock)
  except (OSError, ValueError):
    return {}
  return holder if isinstance(holder, dict) else {}


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


def _stale_without_flock(lock: PathLike) -> bool:
  """Without `flock`: is the holder written in the lock file gone (or none)? Only decidable on its host."""
  holder = _holder(lock)
  if not holder:
    return True
  if holder.get("host") != socket.gethostname():
    raise WorkdirLockedError(f"{wd.path(lock).parent} is locked by {_describe(holder)}; this filesystem has no "
                             f"flock, so a holder on another host cannot be checked: if no run uses it, delete {lock}")
  if holder.get("boot") and holder["boot"] != _boot_id():
    return True
  return not _pid_alive(int(holder.get("pid", -1)))


def _flock(workdir: epath.Path) -> Callable[[], None]:
  """Holds the flock on the local ``workdir/lock`` (see the module doc); returns the release."""
  lock = wd.lock_path(workdir)
  name = os.fspath(lock)
  while True:
    fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirLockedError(f"workdir {workdir} is in use by {_describe(_holder(lock))}; wait until it "
                               "ends or use another workdir") from None
    except OSError as e:
      try:
        stale = e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS) and _stale_without_flock(lock)
      except WorkdirLockedError:
        os.close(fd)
        raise
      if not stale:
        os.close(fd)
        raise WorkdirLockedError(f"workdir {workdir} is in use by {_describe(_holder(lock))}") from None
    try:  # The file we locked must still be the one at `lock` (a releasing holder unlinks it).
      same = os.fstat(fd).st_ino == os.stat(name).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps(_owner()).encode())
  os.fsync(fd)

  def release() -> None:
    lock.unlink(missing_ok=True)
    os.close(fd)

  return release


def _lock_by_contents(workdir: epath.Path) -> Callable[[], None]:
  """Holds ``workdir/lock`` of a URI workdir by its contents alone (see the module doc); returns the release."""
  lock = wd.lock_path(workdir)
  if lock.exists() and not _stale_without_flock(lock):
    raise WorkdirLockedError(f"workdir {workdir} is in use by {_describe(_holder(lock))}; wait until it "
                             "ends or use another workdir")
  owner = _owner()
  write_text(lock, json.dumps(owner))
  if _holder(lock) != owner:  # Another run wrote it meanwhile: it keeps the workdir.
    raise WorkdirLockedError(f"workdir {workdir} was just taken by {_describe(_holder(lock))}")

  def release() -> None:
    if _holder(lock) == owner:
      lock.unlink(missing_ok=True)

  return release


@contextlib.contextmanager
def hold(workdir: PathLike) -> Iterator[None]:
  """Holds `workdir` (created if needed) for the duration; nested holds by the same process are free.

  Process 0 takes the lock; every process raises WorkdirLockedError if it could not.
  """
  root = wd.path(workdir)
  key = os.fspath(root)
  if key in _held:
    _held[key] += 1
    try:
      yield
    finally:
      _held[key] -= 1
    return
  release, error = None, None
  if is_writer():
    root.mkdir(parents=True, exist_ok=True)
    try:
      release = _flock(root) if wd.is_local(root) else _lock_by_contents(root)
    except WorkdirLockedError as e:
      error = e
  if not agree(error is None):
    raise error or WorkdirLockedError(f"process 0 could not lock workdir {root} (see its output)")
  _held[key] = 1
  try:
    yield
  finally:
    del _held[key]
    if release is not None:
      release()
