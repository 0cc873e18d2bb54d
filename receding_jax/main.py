"""Command line: ``python -m receding_jax.main --config=configs/NAME.py --workdir=DIR [--config.key=value]``.

Only parses flags, joins the processes of a multi-host run and hands over to `experiment.run`, which runs
the phases the config names (train, prune, finetune). A mistake the user can fix (an unknown or impossible
config key, a workdir in use or holding another config's run, missing data, a damaged checkpoint) ends the run
with one line, ``error: ...``, and exit status 2, before anything is written; Ctrl-C ends it with one line
saying how to resume (status 130). Any other error is a bug and shows its traceback.
Multi-host: on a Cloud TPU slice or under SLURM `jax.distributed.initialize()` finds its peers itself;
elsewhere pass --coordinator_address, --num_processes and --process_id on every process.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
_SKIP_DAMAGED = flags.DEFINE_boolean(
    "skip_damaged_checkpoints", False,
    "Resume from the newest readable checkpoint, moving damaged newer steps to <checkpoints>_damaged/. "
    "Without it a damaged checkpoint stops the run, naming the step.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
flags.mark_flags_as_required(["config", "workdir"])


def _multi_host_environment() -> bool:
  """True on a multi-worker TPU slice or a multi-task SLURM job, where initialize() needs no arguments."""
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "") or int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _user_errors() -> tuple[type[Exception], ...]:
  """The errors that mean "fix your input" and are reported in one line: `InputError` (a config, a
  checkpoint, the data), a workdir in use, a file in the way or missing. Anything else is a bug and keeps
  its traceback."""
  from receding_jax.errors import InputError
  from receding_jax.training.workdir_files import WorkdirLockedError

  return (InputError, WorkdirLockedError, FileExistsError, FileNotFoundError)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # Orbax and clu log every save at INFO; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  import jax  # After flag parsing, so that --help and bad flags are fast.

  from receding_jax.training import experiment
  from receding_jax.training.config import validate_config

  _deliver_interrupts_until_they_land()
  try:
    validate_config(_CONFIG.value)  # Before any process joins or any file is touched.
    if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _multi_host_environment():
      jax.distributed.initialize()
    experiment.run(_CONFIG.value, _WORKDIR.value, skip_damaged_checkpoints=_SKIP_DAMAGED.value)
  except _user_errors() as e:
    _exit_with_error(e)
  except KeyboardInterrupt:  # The workdir's lock and files were released on the way out.
    _exit_with_error("interrupted; rerun the same command to resume (finished epochs and phases are kept)", 130)


#: Seconds between repeats of a Ctrl-C that has not ended the run yet.
INTERRUPT_REPEAT_SECONDS = 5.0  # Long enough for the first one's unwinding (locks, files) to finish.


def _deliver_interrupts_until_they_land() -> None:
  """Ctrl-C raises KeyboardInterrupt wherever Python is at that moment; when that is a callback that native
  code runs (XLA's compile-time listeners, a C++ caller that reports and drops a Python exception), it is
  lost and the run goes on. So after the first SIGINT a daemon thread sends it again every
  INTERRUPT_REPEAT_SECONDS until one reaches `main`'s handler, which ends the process."""
  interrupted = threading.Event()

  def handler(signum, frame):
    interrupted.set()
    raise KeyboardInterrupt

  def repeat():
    interrupted.wait()
    while True:
      time.sleep(INTERRUPT_REPEAT_SECONDS)
      os.kill(os.getpid(), signal.SIGINT)

  signal.signal(signal.SIGINT, handler)
  sys.unraisablehook = quiet_lost_interrupts
  threading.Thread(target=repeat, name="repeat_interrupt", daemon=True).start()


def quiet_lost_interrupts(unraisable: Any, report: Callable[[Any], None] = sys.__unraisablehook__) -> None:
  """`sys.unraisablehook` that drops a KeyboardInterrupt raised where Python can only print it (a callback
  of the garbage collector or of native code: 'Exception ignored in ... Traceback ...'); the repeated
  SIGINT delivers it again. Every other unraisable exception is reported by `report` as usual."""
  if isinstance(unraisable.exc_value, KeyboardInterrupt):
    return
  report(unraisable)


def _exit_with_error(error: BaseException | str, status: int = 2) -> None:
  """Prints ``error: ...`` as the last line and leaves at once with `status`. `os._exit`, not `sys.exit`:
  reads that a failed checkpoint restore left running in orbax's threads would otherwise report their
  own failure (a multi-line ValueError) after this line, at interpreter shutdown. Locks and files were
  already released by the `with` blocks the error passed through."""
  sys.stdout.flush()
  sys.stderr.flush()
  print(f"error: {error}", file=sys.stderr, flush=True)
  os._exit(status)


def run() -> None:
  """Checks ``--config.KEY`` overrides against the known keys first (one line, like a bad key in a file)."""
  from receding_jax.training.config import ConfigError, check_override_flags

  try:
    check_override_flags(sys.argv[1:])
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run()
