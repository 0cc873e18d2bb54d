"""The workdir lock: held by one live process, re-entrant within it, released on exit or death."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from receding_jax.training import workdir_files
from receding_jax.training.workdir_files import WorkdirLockedError

HOLD_FOREVER = """
import sys, time
from receding_jax.training import workdir_files
with workdir_files.hold(sys.argv[1]):
  print("held", flush=True)
  time.sleep(600)
"""


def test_a_held_workdir_is_refused_naming_the_holder_and_freed_when_the_holder_dies(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD_FOREVER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(WorkdirLockedError, match=rf"in use by process {holder.pid} on host {socket.gethostname()}"):
      with workdir_files.hold(str(tmp_path)):
        pass
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / "lock").exists()  # A killed holder leaves its file; the kernel dropped its flock.
  with workdir_files.hold(str(tmp_path)):
    assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    with workdir_files.hold(str(tmp_path)):  # Re-entrant: the loop holds a workdir its pipeline holds.
      pass
    assert (tmp_path / "lock").exists()
  assert not (tmp_path / "lock").exists()


def test_without_flock_a_lock_is_stale_only_when_its_holder_on_this_host_is_gone(tmp_path):
  lock = tmp_path / "lock"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  for pid, host, stale in [(dead.pid, socket.gethostname(), True), (os.getpid(), socket.gethostname(), False)]:
    lock.write_text(json.dumps({"pid": pid, "host": host, "since": time.time()}))
    assert workdir_files._stale_without_flock(str(lock)) is stale
  lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": time.time()}))
  with pytest.raises(WorkdirLockedError, match=rf"host elsewhere.*delete {lock}"):
    workdir_files._stale_without_flock(str(lock))


def test_writes_are_atomic_and_leave_no_temporary_file(tmp_path):
  path = tmp_path / "sub" / "results.json"
  workdir_files.write_json(str(path), {"a": 1})
  workdir_files.write_json(str(path), {"a": 2})
  assert json.loads(path.read_text()) == {"a": 2} and os.listdir(path.parent) == ["results.json"]
