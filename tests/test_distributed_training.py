"""Training on several devices and processes: 8 CPU devices against one on the same batches, two processes
on loopback against one process (split from test_train so that test files balance over pytest workers)."""

import json
import os
import socket
import subprocess
import sys

import pytest
from test_train import QUICKSTART, REPO, TINY, assert_trees_close, file_hashes, final_params, run_main

from receding_jax.training import experiment

EIGHT_DEVICES_VS_ONE = """
import importlib.util, sys
import jax, numpy as np
from receding_jax.training import data, steps
from receding_jax.training.config import model_spec
from receding_jax.models import model_from_spec
spec = importlib.util.spec_from_file_location("q", sys.argv[1]); q = importlib.util.module_from_spec(spec)
spec.loader.exec_module(q)
config = q.get_config()
config.model.width_multiplier, config.data.steps_per_dispatch = 0.25, 6
model = model_from_spec(model_spec(config))
one_device = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
flat = lambda tree: np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])
for placement in ("device", "streaming"):
  train_split = data.load_splits(config, ("train",))["train"]
  out = []
  for mesh in (steps.make_mesh(), one_device):
    feed = data.train_feed(config, train_split, mesh, placement)
    trainer = steps.make_trainer(config, model, feed.steps, mesh, prepare=feed.prepare)
    state = trainer.init()
    for chunk in feed.chunks(0, 0):  # Six steps: six streamed chunks, or one device-resident chunk.
      assert len(chunk["image"].sharding.device_set) == len(mesh.devices.flat)
      state, _ = trainer.train(state, chunk)
      if int(state["step"]) == 6:
        break
    out.append(flat(jax.device_get({k: state[k] for k in ("params", "batch_stats")})))
  init = jax.device_get(trainer.init())
  moved = np.linalg.norm(out[1] - flat({k: init[k] for k in ("params", "batch_stats")}))
  print(placement, moved, np.linalg.norm(out[0] - out[1]) / moved)
"""


@pytest.mark.parametrize("placement", ["device", "streaming"])
def test_eight_devices_train_like_one_on_the_same_batches(eight_devices_vs_one, placement):
  moved, relative_difference = eight_devices_vs_one[placement]
  assert moved > 1.0  # Six steps change the parameters and statistics a lot (L2 norm of the change) ...
  # ... and 8 devices (global-batch statistics) make the same change as 1, up to float rounding and what
  # rounding does at ReLU kinks. Not exactly: a 6e-8 difference in the state once moved a step's update
  # by 2e-5 on one device (an activation crossing zero flips its gradient), on a trajectory that depends
  # on the CPU. So the whole change is compared, in L2, relative to its size. Measured: rounding 1e-7, a
  # kink crossing 5e-5; per-device statistics (8 of the 64 examples each) move one step's gradient by 0.2.
  assert relative_difference < 1e-3


@pytest.fixture(scope="module")
def eight_devices_vs_one():
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"}
  result = subprocess.run([sys.executable, "-c", EIGHT_DEVICES_VS_ONE, str(QUICKSTART)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-5000:]
  return {line.split()[0]: tuple(float(v) for v in line.split()[1:]) for line in result.stdout.splitlines()}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_two_processes(workdir, *flags) -> list[str]:
  port = _free_port()
  procs = [
      run_main(workdir, *flags, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}", wait=False)
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs
  return outputs


def test_two_processes_on_loopback_train_like_one_process_and_agree_on_the_phases(tmp_path):
  flags = [*TINY[:-1], "--config.optim.num_epochs=1", "--config.optim.batch_size=256",  # 5 steps.
           "--config.phases=('train', 'prune')", "--config.prune.ratios=(0.5,)"]
  outputs = run_two_processes(tmp_path / "two", *flags)
  assert "2 process(es)" in outputs[0]
  # Both processes ran every phase to the same results; process 0 alone wrote them, atomically.
  results = json.loads((tmp_path / "two" / "results.json").read_text())
  table = experiment.results_table(results)
  assert all(table in out for out in outputs)
  assert results["ratios"]["0.5"]["pruned"]["report"]["source_step"] == results["trained"]["step"]
  assert not list((tmp_path / "two").rglob("*.tmp*")) and not (tmp_path / "two" / "lock").exists()
  before = file_hashes(tmp_path / "two")
  again = run_two_processes(tmp_path / "two", *flags)  # Both agree that the run is finished.
  assert all("holds a finished run" in out and table in out for out in again)
  assert file_hashes(tmp_path / "two") == before
  # The device-resident epoch is a function of (seed, epoch) over the whole split, so one process with
  # two devices trains on the same global batches as two processes with one device each.
  assert "data device" in outputs[0]
  run_main(tmp_path / "one", *flags[:-2], "--config.phases=('train',)", devices=2)
  got, reference = final_params(tmp_path / "two")["params"], final_params(tmp_path / "one")["params"]
  assert_trees_close(got, reference, rtol=1e-4, atol=1e-6)
