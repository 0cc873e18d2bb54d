"""The training stack needs no TensorFlow: not installed by the train/test extras, never imported by a run."""

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]
TENSORFLOW = re.compile(r"^(tensorflow|tensorflow-cpu|tensorflow-gpu|tf-nightly|tensorflow-intel)$")


def _normalise(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def reachable_requirements(distribution: str, extras: set[str]) -> dict[str, list[str]]:
  """{package: the chain that requires it} over the installed dependency graph of `distribution[extras]`
  (markers evaluated for this interpreter)."""
  seen: dict[str, list[str]] = {}
  todo = [(distribution, frozenset(extras), [distribution])]
  while todo:
    name, wanted, chain = todo.pop()
    try:
      requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
      continue
    for text in requires:
      req = Requirement(text)
      if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
        continue
      key = _normalise(req.name)
      if key in seen and not req.extras:
        continue
      seen.setdefault(key, [*chain, req.name])
      todo.append((req.name, frozenset(req.extras), [*chain, req.name]))
  return seen


def test_the_train_and_test_extras_bring_no_tensorflow():
  reachable = reachable_requirements("receding-jax", {"test", "train"})
  assert "grain" in reachable and "orbax-checkpoint" in reachable  # The graph was really walked.
  bad = {k: v for k, v in reachable.items() if TENSORFLOW.match(k)}
  assert not bad, f"TensorFlow is required through {bad}"
  # ... and only the optional export extra brings it.
  assert any(TENSORFLOW.match(k) for k in reachable_requirements("receding-jax", {"export"}))
  if os.environ.get("CI"):  # A fresh CI machine installed only the test extra: TensorFlow is absent.
    assert importlib.util.find_spec("tensorflow") is None


BLOCKED_RUN = """
import runpy, sys
sys.modules["tensorflow"] = None  # Any `import tensorflow` now raises ImportError.
sys.argv = ["receding_jax.main", *sys.argv[1:]]
runpy.run_module("receding_jax.main", run_name="__main__")
"""


@pytest.mark.parametrize("placement", ["device", "streaming"])
def test_a_quickstart_epoch_runs_with_tensorflow_unimportable(tmp_path, placement):
  cmd = [sys.executable, "-c", BLOCKED_RUN, f"--config={REPO / 'configs' / 'quickstart.py'}",
         f"--workdir={tmp_path}", "--config.model.width_multiplier=0.25", "--config.optim.num_epochs=1",
         "--config.phases=('train',)", f"--config.data.placement={placement}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"data {placement}" in result.stdout
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  metrics = [line for line in lines if "epoch" in line]  # The rest are the phases' timings.
  assert len(metrics) == 1 and 0.0 <= metrics[0]["test_accuracy"] <= 1.0
  assert [line["phase"] for line in lines if "phase" in line] == ["train", "evaluate trained"]
  assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard events were written"
