"""Resuming at the edges: a checkpoint that does not fit is not called damaged, and a kill between an epoch's
log line and its checkpoint never leaves a checkpoint the log does not know."""

import json

import jax
import numpy as np
import optax
import pytest
from test_train import QUICKSTART, load_config

from receding_jax.training import checkpointing, experiment, loop, plots
from receding_jax.training import workdir as wd


def saved_state(directory, step=3):
  """A small training-like state (params and SGD-momentum state) saved as `step`; returns it."""
  params = {"conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)}, "dense": {"bias": np.zeros(5, np.float32)}}
  state = {"params": params, "opt_state": optax.sgd(0.1, momentum=0.9).init(params), "step": np.int64(step)}
  manager = checkpointing.make_manager(directory)
  checkpointing.save(manager, step, state, {"name": "toy"})
  manager.close()
  return state


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def test_a_checkpoint_of_another_optimiser_is_a_mismatch_named_where_not_damage(tmp_path):
  state = saved_state(tmp_path / "checkpoints")
  other = {**state, "opt_state": optax.adam(0.1).init(state["params"])}  # As after an optimiser change.
  manager = checkpointing.make_manager(tmp_path / "checkpoints", create=False)
  with pytest.raises(checkpointing.CheckpointMismatchError) as error:
    checkpointing.restore(manager, target=abstract(other))
  message = str(error.value)
  assert "opt_state/0/count" in message and "opt_state/0/trace/conv/kernel" in message
  assert "damaged" not in message and "skip" not in message
  # Told to skip damaged steps, resuming still refuses, and moves nothing aside.
  with pytest.raises(checkpointing.CheckpointMismatchError):
    loop.resume(lambda: checkpointing.make_manager(tmp_path / "checkpoints"), abstract(other), skip_damaged=True)
  assert manager.all_steps() == [3] and not (tmp_path / "checkpoints_damaged").exists()
  # A target that fits restores; one of another shape names the leaf and both shapes.
  restored, spec = checkpointing.restore(manager, target=abstract(state))
  assert spec == {"name": "toy"} and int(restored["step"]) == 3
  wider = jax.tree.map(lambda x: x, state)
  wider["params"]["dense"]["bias"] = np.zeros(7, np.float32)
  with pytest.raises(checkpointing.CheckpointMismatchError, match=r"params/dense/bias saved \(5,\), expected \(7,\)"):
    checkpointing.restore(manager, target=abstract(wider))


def test_only_missing_or_corrupt_files_count_as_damage(tmp_path):
  saved_state(tmp_path / "checkpoints")
  step_dir = tmp_path / "checkpoints" / "3"
  (step_dir / "model" / "metadata").write_text("{not json")  # The model spec's JSON, garbled.
  manager = checkpointing.make_manager(tmp_path / "checkpoints", create=False)
  with pytest.raises(checkpointing.DamagedCheckpointError, match="is damaged: a truncated or corrupt file"):
    checkpointing.restore(manager)
  # What a store says about access or a transient failure is not damage: a skip would discard a good step.
  outside = ['PERMISSION_DENIED: Error reading "params.a/.zarray" in OCDBT database at gs://b/run/',
             'UNAVAILABLE: Error reading local file "/ckpt/3/state/d/x": try again']
  assert not any(checkpointing.is_damage(ValueError(text)) for text in outside)
  assert not checkpointing.is_damage(PermissionError("denied"))
  assert checkpointing.is_damage(ValueError('DATA_LOSS: Error decoding local file "/c/3/state/manifest.ocdbt"'))


def tiny_config(num_epochs=2):
  c = load_config(QUICKSTART)
  c.model.width_multiplier, c.data.steps_per_dispatch, c.phases = 0.25, 6, ("train",)
  c.optim.num_epochs = num_epochs
  return c


def run_killed_at_the_last_save(config, workdir, monkeypatch, after_saving: bool):
  """Trains `config`, killed (KeyboardInterrupt) at the last epoch's save: just before or just after it."""
  real_save, final = checkpointing.save, config.optim.num_epochs * 18

  def save_then_die(manager, step, *args, **kwargs):
    if step == final and not after_saving:
      raise KeyboardInterrupt
    real_save(manager, step, *args, **kwargs)
    if step == final:
      raise KeyboardInterrupt

  monkeypatch.setattr(checkpointing, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    loop.train_and_evaluate(config, str(workdir))
  monkeypatch.undo()


@pytest.mark.parametrize("after_saving", [True, False])
def test_a_kill_at_the_last_save_leaves_no_unlogged_checkpoint_and_the_last_epoch_is_pruned(
    tmp_path, monkeypatch, after_saving):
  config = tiny_config()
  run_killed_at_the_last_save(config, tmp_path, monkeypatch, after_saving)
  manager = checkpointing.make_manager(wd.checkpoint_dir(tmp_path), create=False)
  assert set(manager.all_steps()) <= {e["step"] for e in plots.read_epochs(tmp_path)}  # Every checkpoint logged.
  summary = loop.train_and_evaluate(config, str(tmp_path))  # Finishes (or finds finished) the run.
  trained = experiment.trained_network(config, str(tmp_path))
  assert summary["step"] == trained["step"] == 2 * 18 and trained["epoch"] == 2
  assert [e["epoch"] for e in plots.read_epochs(tmp_path)] == [1, 2]


def test_a_run_killed_between_saving_and_logging_by_an_older_version_logs_its_final_checkpoint(tmp_path):
  config = tiny_config()
  loop.train_and_evaluate(config, str(tmp_path))
  lines = wd.metrics_path(tmp_path).read_text().splitlines()
  wd.metrics_path(tmp_path).write_text("\n".join(lines[:-1]) + "\n")  # Saved, never logged.
  summary = loop.train_and_evaluate(config, str(tmp_path))
  last = json.loads(wd.metrics_path(tmp_path).read_text().splitlines()[-1])
  assert summary["step"] == last["step"] == 2 * 18 and last["epoch"] == 2 and "test_accuracy" in last
  assert experiment.trained_network(config, str(tmp_path))["step"] == 2 * 18
