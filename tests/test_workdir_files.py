"""The workdir lock: held by one live process, re-entrant within it, released on exit or death; on gs:// too."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from fake_gcs import run_on_fake_gcs

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


ON_GCS = """
import json, os, socket, subprocess
from receding_jax.training import workdir as wd, workdir_files
from receding_jax.training.workdir_files import WorkdirLockedError, _boot_id

root = "gs://bucket/run"
lock = wd.lock_path(root)
with workdir_files.hold(root):
  assert json.loads(lock.read_text())["pid"] == os.getpid()
  with workdir_files.hold(root):  # Re-entrant.
    pass
  assert lock.exists()
assert not lock.exists()

def refused(holder, match):
  wd.write_text(lock, json.dumps({"since": 0, **holder}))
  try:
    with workdir_files.hold(root):
      raise AssertionError(f"{holder} did not keep the workdir")
  except WorkdirLockedError as e:
    assert match in str(e), e
  assert json.loads(lock.read_text())["pid"] == holder["pid"]  # Left as it was.

def taken_over(holder):
  wd.write_text(lock, json.dumps({"since": 0, **holder}))
  with workdir_files.hold(root):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  assert not lock.exists()

here, boot = socket.gethostname(), _boot_id()
dead = subprocess.Popen(["true"])
dead.wait()
refused({"pid": 1, "host": "elsewhere"}, f"delete {lock}")
refused({"pid": os.getppid(), "host": here, "boot": boot}, f"in use by process {os.getppid()} on host {here}")
taken_over({"pid": dead.pid, "host": here, "boot": boot})
taken_over({"pid": os.getppid(), "host": here, "boot": "an earlier boot"})
print("ok")
"""


def test_a_gs_workdir_is_locked_by_the_contents_of_its_lock_file(tmp_path):
  assert run_on_fake_gcs(ON_GCS, cwd=tmp_path).stdout.split()[-1] == "ok"
  assert os.listdir(tmp_path) == []
