"""Shrinking while training (config.shrink): the loop removes receded channels mid-run with exact bookkeeping,
says so, records the cost, and a run killed after a shrink resumes (on 8 devices) to the uninterrupted result.
8 devices against 1: a shrunk state laid out over 8 devices trains its next 6 steps like on 1 (whole runs are
not compared: from step 18 on, SGD amplifies the summation order's rounding; test_distributed_training
compares 6 steps without a shrink the same way)."""

import contextlib
import io
import itertools
import json
import pathlib
import signal
import time

import jax
import numpy as np
import pytest
from multidevice import run_with_cpu_devices
from test_train import QUICKSTART, TINY, assert_trees_close, final_params, load_config, run_main

from receding_jax import compare, compile_clock
from receding_jax.errors import InputError
from receding_jax.pruning import criteria
from receding_jax.training import checkpointing, loop, plots, shrinking
from receding_jax.training.pruned_checkpoint import format_report, prune_checkpoint

# The shrink: at the end of epoch 2 of 4, every channel at or below importance 0.5 (many, this early),
# within 30% of the prunable channels; then one check per epoch.
SHRINK_FLAGS = ["--config.optim.num_epochs=4", "--config.checkpoint.keep_last=5", "--config.shrink.enabled=True",
                "--config.shrink.threshold=0.5", "--config.shrink.patience=1", "--config.shrink.start_epoch=2",
                "--config.shrink.every_epochs=1", "--config.shrink.max_ratio=0.3"]
STEPS = 18  # Per epoch.
QUICKSTART_SHRINK = QUICKSTART.with_name("quickstart_shrink.py")


def tiny_config(shrink: bool):
  c = load_config(QUICKSTART)
  c.model.width_multiplier, c.data.steps_per_dispatch, c.phases = 0.25, 6, ("train",)
  c.optim.num_epochs, c.checkpoint.keep_last = 4, 5
  if shrink:
    c.shrink.enabled, c.shrink.threshold, c.shrink.patience = True, 0.5, 1
    c.shrink.start_epoch, c.shrink.every_epochs, c.shrink.max_ratio = 2, 1, 0.3
  return c


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(wide workdir, shrinking workdir, shrinking run's console, {run: XLA compilations by function}) of the
  same tiny quickstart."""
  root = tmp_path_factory.mktemp("shrinking")
  console, compiles = io.StringIO(), {}
  with compile_clock.Clock() as clock:
    loop.train_and_evaluate(tiny_config(False), str(root / "wide"))
  compiles["wide"] = clock.as_dict()["compile_counts"]
  with contextlib.redirect_stdout(console), compile_clock.Clock() as clock:
    loop.train_and_evaluate(tiny_config(True), str(root / "shrunk"))
  compiles["shrunk"] = clock.as_dict()["compile_counts"]
  return root / "wide", root / "shrunk", console.getvalue(), compiles


def step_state(workdir: pathlib.Path, step: int):
  manager = checkpointing.make_manager(workdir / "checkpoints", create=False)
  state, spec = checkpointing.restore(manager, step)
  manager.close()
  return state, spec


def flat(tree) -> dict[tuple[str, ...], np.ndarray]:
  """{dict-key path: array} of every leaf (other path entries, e.g. tuple indices, left out)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {tuple(str(k.key) for k in p if hasattr(k, "key")): np.asarray(v) for p, v in leaves}


def kept_channels(wide: dict, narrow: dict) -> list[np.ndarray]:
  """Per shrunk norm: which of its wide channels survive, found by value (each logit is its own float)."""
  masks = []
  for path, logits in wide.items():
    if path[-1] == "scale_logit" and narrow[path].shape != logits.shape:
      keep = np.isin(logits, narrow[path])
      assert keep.sum() == narrow[path].size and np.array_equal(logits[keep], narrow[path]), path
      masks.append(keep)
  return masks


def slicing(wide: np.ndarray, narrow: np.ndarray, masks: list[np.ndarray]):
  """[(axis, mask)] that slices `wide` into exactly `narrow`, or None."""
  axes = [a for a in range(wide.ndim) if wide.shape[a] != narrow.shape[a]]
  options = [[m for m in masks if m.size == wide.shape[a] and m.sum() == narrow.shape[a]] for a in axes]
  for combo in itertools.product(*options):
    sliced = wide
    for axis, mask in zip(axes, combo, strict=True):
      sliced = np.compress(mask, sliced, axis=axis)
    if np.array_equal(sliced, narrow):
      return list(zip(axes, combo, strict=True))
  return None


def apply(cut, array: np.ndarray) -> np.ndarray:
  for axis, mask in cut:
    array = np.compress(mask, array, axis=axis)
  return array


def test_a_shrink_keeps_params_statistics_and_momentum_of_the_surviving_channels_exactly(runs):
  wide_dir, shrunk_dir, *_ = runs
  wide, _ = step_state(wide_dir, 2 * STEPS)
  narrow, spec = step_state(shrunk_dir, 2 * STEPS)  # Saved right after the shrink at the end of epoch 2.
  assert spec["shrunk"] and spec["pruned"] and int(narrow["step"]) == int(wide["step"]) == 2 * STEPS
  wide_params, narrow_params = flat(wide["params"]), flat(narrow["params"])
  masks = kept_channels(wide_params, narrow_params)
  assert masks and sum(int((~m).sum()) for m in masks) == int(narrow["shrink"]["removed"]) > 0
  cuts = {}
  for path, value in wide_params.items():
    cuts[path] = slicing(value, narrow_params[path], masks)
    assert cuts[path] is not None, f"{path}: the narrow parameter is no slice of the wide one"
  for path, value in flat(wide["batch_stats"]).items():
    assert slicing(value, flat(narrow["batch_stats"])[path], masks) is not None, path
  wide_opt, narrow_opt = flat(wide["opt_state"]), flat(narrow["opt_state"])
  assert wide_opt.keys() == narrow_opt.keys()
  compared = 0
  for path, value in wide_opt.items():
    param = next((p for p in cuts if path[-len(p):] == p), None)
    if param is None or value.shape != wide_params[param].shape:  # A step count: carried as it is.
      np.testing.assert_array_equal(narrow_opt[path], value)
      continue
    np.testing.assert_array_equal(narrow_opt[path], apply(cuts[param], value), err_msg=str(path))
    compared += int(np.count_nonzero(apply(cuts[param], value)))
  assert compared > 1000  # The momentum was really there, and compared.


def test_the_console_and_records_show_each_shrink_and_the_falling_cost(runs):
  _, shrunk_dir, console, compiles = runs
  epochs = {}
  for line in (shrunk_dir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "epoch" in record:
      epochs[record["epoch"]] = record
  shrinks = [e for e in epochs.values() if e.get("shrink_removed_channels")]
  assert shrinks and shrinks[0]["epoch"] == 2
  removed = shrinks[0]["shrink_removed_channels"]
  assert f"shrink after epoch 2: removed {removed} channels" in console
  # Each shrink costs one compile of the narrow train step (and of its evaluation), nothing more.
  assert compiles["wide"]["train_chunk"] == 1
  assert compiles["shrunk"]["train_chunk"] == 1 + len(shrinks) == 1 + console.count("shrink after epoch")
  assert epochs[3]["params"] == shrinks[0]["shrink_params_after"] < epochs[1]["params"]
  assert epochs[4]["macs"] <= epochs[3]["macs"] == shrinks[0]["shrink_macs_after"] < epochs[1]["macs"]
  assert all(e["epoch_seconds"] > 0 for e in epochs.values())
  book = final_params(shrunk_dir)["shrink"]
  assert int(book["removed"]) <= np.floor(0.3 * int(book["prunable"]))
  assert "validation_accuracy" in shrinks[0] and "shrink_before_validation_accuracy" in shrinks[0]


def test_a_run_killed_after_a_shrink_on_8_devices_resumes_to_the_uninterrupted_result(runs, tmp_path):
  wide_dir, *_ = runs
  whole = run_main(tmp_path / "whole", *TINY, *SHRINK_FLAGS, devices=8, wait=False)  # One run per core.
  proc = run_main(tmp_path / "killed", *TINY, *SHRINK_FLAGS, devices=8, wait=False)
  checkpoints, deadline = tmp_path / "killed" / "checkpoints", time.time() + 400
  while time.time() < deadline and not (checkpoints / str(2 * STEPS)).exists():  # Saved after the shrink.
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) < 4 * STEPS
  out = run_main(tmp_path / "killed", *TINY, *SHRINK_FLAGS, devices=8).stdout
  assert "resuming from step" in out and "8 cpu device(s)" in out
  assert whole.wait(timeout=600) == 0, whole.stdout.read()
  got, reference = final_params(tmp_path / "killed"), final_params(tmp_path / "whole")
  assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, reference)
  assert sum(np.size(x) for x in jax.tree.leaves(got["params"])) < sum(
      np.size(x) for x in jax.tree.leaves(final_params(wide_dir)["params"]))  # It did shrink, on 8 devices.
  assert_trees_close(got, reference, rtol=1e-6, atol=1e-7)


def test_compare_puts_the_shrinking_run_beside_the_wide_one_with_its_lower_mac_epochs(runs):
  wide_dir, shrunk_dir, *_ = runs
  wide, shrunk = (plots.read_epochs(d) for d in (wide_dir, shrunk_dir))
  assert plots.mac_epochs(wide) == 4 * wide[0]["macs"]  # The same network every epoch.
  assert plots.mac_epochs(shrunk) == sum(e["macs"] for e in shrunk) < plots.mac_epochs(wide)
  table = compare.cost_table({"train-then-prune": [str(wide_dir)], "shrink": [str(shrunk_dir)]})
  row = next(line for line in table.splitlines() if line.startswith("| shrink |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[4] == f"{plots.mac_epochs(shrunk) / 1e6:.2f}"
  assert cells[5] == f"{plots.mac_epochs(wide) / plots.mac_epochs(shrunk):.2f}x" and float(cells[5][:-1]) > 1
  assert int(cells[6]) == sum(e.get("shrink_removed_channels", 0) for e in shrunk) > 0


def test_pruning_a_shrunk_checkpoint_counts_the_unshrunk_networks_channels(runs, tmp_path):
  _, shrunk_dir, *_ = runs
  book = final_params(shrunk_dir)["shrink"]
  total, removed = int(book["prunable"]), int(book["removed"])
  report = prune_checkpoint(shrunk_dir / "checkpoints", tmp_path / "p50", ratio=0.5, min_channels=1)
  assert report["shrunk_while_training"]["removed"] == removed
  gone = removed + sum(report["widths_before"]) - sum(report["widths_after"])
  assert gone == criteria.removal_count(0.5, total)  # What 50% removes from the unshrunk network.
  assert report["removed_fraction"] == pytest.approx(gone / total) and report["criterion"]["ratio"] == 0.5
  assert "shrunk" not in checkpointing.read_step(tmp_path / "p50")[1]  # Pruned: pruning it again is refused.
  kept = total - gone
  assert f"| prunable channels (unshrunk) | {total:,} | {kept:,} | {kept / total:.3f} |" in format_report(report)
  with pytest.raises(InputError, match=f"already removed {removed}"):
    prune_checkpoint(shrunk_dir / "checkpoints", tmp_path / "p01", ratio=0.01)
  assert not (tmp_path / "p01").exists() or not any((tmp_path / "p01").iterdir())


def test_checks_follow_the_config_and_never_come_after_the_last_epoch():
  assert [e for e in range(1, 5) if shrinking.is_check(tiny_config(True), e)] == [2, 3]
  c = load_config(QUICKSTART_SHRINK)  # Every 2 epochs from epoch 4, 15 epochs.
  assert [e for e in range(1, 16) if shrinking.is_check(c, e)] == [4, 6, 8, 10, 12, 14]
  c.shrink.enabled = False
  assert not any(shrinking.is_check(c, e) for e in range(1, 16))


SHRUNK_EIGHT_VS_ONE = """
import importlib.util, sys
import jax, numpy as np
from receding_jax.importances import neuron_importances
from receding_jax.training import data, loop, model_specs, shrinking, steps
from receding_jax.training.config import model_spec
module = importlib.util.spec_from_file_location("q", sys.argv[1]); q = importlib.util.module_from_spec(module)
module.loader.exec_module(q)
config = q.get_config()
config.model.width_multiplier, config.data.steps_per_dispatch = 0.25, 6
config.shrink.enabled, config.shrink.threshold, config.shrink.patience, config.shrink.max_ratio = True, 0.3, 1, 0.3
spec = model_spec(config)
one_device = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
flat = lambda tree: np.concatenate([np.ravel(v) for v in jax.tree.leaves(tree)])
shards = data.load_splits(config, ("train", "validation"))
# Importances spread over (0, 1), the same on both meshes: some below the threshold.
spread = lambda path, x: (np.random.default_rng(len(str(path))).normal(0.0, 2.0, x.shape).astype(x.dtype)
                          if "scale_logit" in str(path) else x)
out = []
for mesh in (steps.make_mesh(), one_device):
  feed = data.train_feed(config, shards["train"], mesh, "device")
  feeds = {"validation": data.eval_feed(config, shards["validation"], mesh, "device", "validation")}
  build = lambda s: steps.make_trainer(config, model_specs.build_model(s), feed.steps, mesh, prepare=feed.prepare,
                                       prepare_eval=feeds["validation"].prepare)
  state = build(spec).init()
  state = {**state, "params": jax.device_put(jax.tree_util.tree_map_with_path(spread, jax.device_get(state["params"])),
                                             state["step"].sharding)}
  variables = jax.device_get({k: state[k] for k in ("params", "batch_stats")})
  run = loop._Run(spec, build(spec), state, shrinking.new_book(spec, variables, False))
  record = loop._shrink(config, build, run, neuron_importances(variables), {"epoch": 1}, feeds)
  assert len(jax.tree.leaves(run.state["params"])[0].sharding.device_set) == mesh.devices.size
  variables_now = lambda: flat(jax.device_get({k: run.state[k] for k in ("params", "batch_stats")}))
  start = variables_now()
  for chunk in feed.chunks(0, 0):
    run.state, _ = run.trainer.train(run.state, chunk)
    if int(run.state["step"]) == 6:
      break
  out.append((record["shrink_removed_channels"], start, variables_now()))
(removed8, start8, end8), (removed1, start1, end1) = out
assert removed8 == removed1 > 0 and np.array_equal(start8, start1)
moved = np.linalg.norm(end1 - start1)
print(removed1, moved, np.linalg.norm(end8 - end1) / moved)
"""


def test_a_shrunk_state_laid_out_over_8_devices_trains_like_on_one():
  out = run_with_cpu_devices(SHRUNK_EIGHT_VS_ONE.replace("sys.argv[1]", repr(str(QUICKSTART))))
  removed, moved, relative_difference = out.strip().splitlines()[-1].split()
  assert int(removed) > 0 and float(moved) > 1.0
  assert float(relative_difference) < 1e-3  # As test_distributed_training's 6 steps without a shrink.
