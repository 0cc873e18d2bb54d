"""TensorBoard events through tensorboardX: read back by TensorBoard itself, without TensorFlow, on gs:// too."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from fake_gcs import run_on_fake_gcs

from receding_jax.training.metric_writer import open_writer

IMPORTANCES = [0.0, 0.25, 0.5, 1.0]
NO_TENSORFLOW = 'import sys\nsys.modules["tensorflow"] = None  # Any `import tensorflow` raises ImportError.\n'

READ = NO_TENSORFLOW + """
import json
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

events = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "histograms": 0})
events.Reload()
tags = events.Tags()
histogram = lambda e: [e.step, e.histogram_value.num, e.histogram_value.min, e.histogram_value.max,
                       e.histogram_value.sum, sum(e.histogram_value.bucket)]
print(json.dumps({"scalars": {t: [[e.step, e.value] for e in events.Scalars(t)] for t in tags["scalars"]},
                  "histograms": {t: [histogram(e) for e in events.Histograms(t)] for t in tags["histograms"]}}))
"""


def python(code: str, *args: str) -> str:
  """stdout of `code` run in a fresh interpreter on CPU (TensorBoard reads there: no 20 s TensorFlow import)."""
  result = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def check_logged(directory) -> None:
  """What `LOG` wrote, as TensorBoard's EventAccumulator reads it: two steps of scalars and one histogram."""
  assert len([f for f in os.listdir(directory) if f.startswith("events.out.tfevents.")]) == 1
  events = json.loads(python(READ, str(directory)).splitlines()[-1])
  assert events["scalars"] == {"train_loss": [[1, 2.5], [2, 0.5]], "epoch": [[1, 1.0], [2, 2.0]]}
  assert events["histograms"].keys() == {"importances/all"}  # The empty one is skipped.
  ((step, num, low, high, total, counted),) = events["histograms"]["importances/all"]
  assert (step, num, counted) == (2, len(IMPORTANCES), len(IMPORTANCES))
  assert (low, high, total) == pytest.approx((0.0, 1.0, sum(IMPORTANCES)))


LOG = f"""
import sys
import numpy as np
from receding_jax.training.metric_writer import open_writer

with open_writer(sys.argv[1], active=True) as writer:
  writer.write_scalars(1, {{"train_loss": 2.5, "epoch": 1}})
  writer.write_scalars(2, {{"train_loss": np.float32(0.5), "epoch": 2}})
  writer.write_histograms(2, {{"importances/all": np.asarray({IMPORTANCES}), "empty": np.zeros(0)}})
"""


def test_scalars_and_histograms_are_read_back_by_tensorboard(tmp_path):
  exec(LOG.replace("sys.argv[1]", repr(str(tmp_path / "run"))), {})
  check_logged(tmp_path / "run")


def test_an_inactive_writer_writes_nothing(tmp_path):
  writer = open_writer(tmp_path / "run", active=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_histograms(1, {"h": np.ones(3)})
  writer.close()
  assert not (tmp_path / "run").exists()


def test_the_writer_needs_no_tensorflow(tmp_path):
  python(NO_TENSORFLOW + LOG + 'assert sys.modules["tensorflow"] is None and "clu" not in sys.modules\n',
         str(tmp_path))
  check_logged(tmp_path)


def test_events_of_a_gs_workdir_are_written_through_epath(tmp_path):
  copy_back = """
from etils import epath
(events,) = epath.Path("gs://bucket/run").glob("events.out.tfevents.*")
epath.Path(sys.argv[2]).mkdir()
(epath.Path(sys.argv[2]) / events.name).write_bytes(events.read_bytes())
"""
  run_on_fake_gcs(LOG + copy_back, "gs://bucket/run", str(tmp_path / "copy"))
  check_logged(tmp_path / "copy")
