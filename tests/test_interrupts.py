"""Interrupted runs: Ctrl-C ends in one line and frees the workdir; a killed run resumes to the same parameters
and a live run's workdir is refused to a second run (split from test_train to balance pytest workers)."""

import signal
import socket
import subprocess
import sys
import time
import types

import pytest
from test_train import QUICKSTART, TINY, assert_trees_close, final_params, load_config, run_main

from receding_jax import main
from receding_jax.training import experiment
from receding_jax.training.workdir_files import WorkdirLockedError


def test_ctrl_c_ends_a_run_in_one_line_saying_how_to_resume_and_frees_the_workdir(tmp_path):
  proc = run_main(tmp_path / "run", *TINY, "--config.optim.num_epochs=50", wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and not list((tmp_path / "run").glob("metrics.jsonl")):  # Training has started.
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, out[-3000:]
  assert out.strip().splitlines()[-1] == ("error: interrupted; rerun the same command to resume (finished epochs "
                                          "and phases are kept)")
  assert "Traceback" not in out and not (tmp_path / "run" / "lock").exists()


def test_a_live_run_holds_its_workdir_and_resume_after_kill_ends_with_the_same_parameters(tmp_path):
  flags = [*TINY, "--config.optim.num_epochs=5"]
  whole_run = run_main(tmp_path / "whole", *flags, wait=False)  # Meanwhile: one run per core.
  proc = run_main(tmp_path / "killed", *flags, wait=False)
  lock = tmp_path / "killed" / "lock"
  deadline = time.time() + 300
  while time.time() < deadline and not (lock.exists() and lock.read_text()):
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  # A second run on the live workdir is refused, naming the holder, before it touches anything.
  same = load_config(QUICKSTART)  # The live run's config (TINY): another one would be refused for that.
  same.model.width_multiplier, same.data.steps_per_dispatch, same.phases = 0.25, 6, ("train",)
  same.optim.num_epochs = 5
  with pytest.raises(WorkdirLockedError, match=rf"in use by process {proc.pid} on host {socket.gethostname()}"):
    experiment.run(same, str(tmp_path / "killed"))
  checkpoints = tmp_path / "killed" / "checkpoints"
  while time.time() < deadline and not (checkpoints.exists() and any(p.name.isdigit() for p in checkpoints.iterdir())):
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 5 * 18
  assert lock.exists()  # Left by the killed run: it must not block the restart.
  run_main(tmp_path / "killed", *flags)
  assert not lock.exists()
  assert whole_run.wait(timeout=600) == 0, whole_run.stdout.read()
  whole, resumed = final_params(tmp_path / "whole"), final_params(tmp_path / "killed")
  assert int(resumed["step"]) == 5 * 18
  assert_trees_close(whole, resumed, rtol=1e-6, atol=1e-7)


def test_a_ctrl_c_lost_in_a_callback_is_dropped_quietly_and_other_unraisable_errors_still_print():
  seen = []
  lost = types.SimpleNamespace(exc_value=KeyboardInterrupt(), exc_type=KeyboardInterrupt)
  main.quiet_lost_interrupts(lost, report=seen.append)  # The repeated SIGINT delivers it again.
  other = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), exc_type=RuntimeError)
  main.quiet_lost_interrupts(other, report=seen.append)
  assert seen == [other]
  # Raised in a garbage-collector callback, where Python can only print it: nothing is printed.
  printed = subprocess.run([sys.executable, "-c", GC_CALLBACK_INTERRUPT], capture_output=True, text=True, timeout=120)
  assert printed.returncode == 0 and printed.stdout.strip() == "still running", printed.stderr
  assert "Traceback" not in printed.stderr and "KeyboardInterrupt" not in printed.stderr


GC_CALLBACK_INTERRUPT = """
import gc, sys
from receding_jax import main
sys.unraisablehook = main.quiet_lost_interrupts
def callback(phase, info):
  raise KeyboardInterrupt
gc.callbacks.append(callback)
gc.collect()
gc.callbacks.remove(callback)
print("still running")
"""
