"""The training system: quickstart end to end, config checks, resume after kill, 8 devices, 2 processes, NaN."""

import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from receding_jax.models import model_from_spec
from receding_jax.training import checkpointing, loop, steps, workdir_files
from receding_jax.training import optimizer as recipe
from receding_jax.training.config import default_config, model_spec, validate_config
from receding_jax.training.paper_configs import paper_config

REPO = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.py"
# A smaller quickstart for the equality tests: 4/8/16 channels, 18 steps an epoch.
TINY = ["--config.model.width_multiplier=0.25", "--config.data.steps_per_dispatch=6", "--config.phases=('train',)"]


def load_config(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_main(workdir, *flags, devices=1, check=True, extra_env=None, wait=True, config=QUICKSTART):
  """Runs `python -m receding_jax.main` on `config` (default the quickstart) in a fresh interpreter."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **(extra_env or {})}
  env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  cmd = [sys.executable, "-m", "receding_jax.main", f"--config={config}", f"--workdir={workdir}", *flags]
  if not wait:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  if check and result.returncode != 0:
    raise AssertionError(f"main failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-5000:]}")
  return result


def final_params(workdir):
  state, _ = checkpointing.restore(checkpointing.make_manager(pathlib.Path(workdir) / "checkpoints", create=False))
  return state


def assert_trees_close(a, b, rtol, atol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("quickstart")
  summary = loop.train_and_evaluate(load_config(QUICKSTART), str(workdir))
  return workdir, summary


def test_quickstart_trains_end_to_end_beats_chance_and_recedes(quickstart_run):
  workdir, summary = quickstart_run
  config = load_config(QUICKSTART)
  assert summary["epoch"] == config.optim.num_epochs
  # 300 of the 1,500 training digits are held out; the 297 test digits are only reported.
  assert summary["validation_count"] == 300 and summary["test_count"] == 297
  assert summary["validation_accuracy"] > 0.6 and summary["test_accuracy"] > 0.6  # 10 classes: chance is 0.1.
  assert summary["importance_fraction_below_0.05"] > 0.2  # The penalty made channels recede.
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [x["epoch"] for x in lines] == list(range(1, config.optim.num_epochs + 1))
  assert sum(lines[-1]["importance_histogram"]) == lines[-1]["importance_count"]
  assert lines[0]["learning_rate"] == pytest.approx(config.optim.learning_rate) and lines[-1]["learning_rate"] < 1e-3
  assert list(workdir.glob("events.out.tfevents.*"))
  state = final_params(workdir)
  assert int(state["step"]) == summary["step"] == config.optim.num_epochs * (1200 // 64)
  # Every epoch is evaluated on validation, only the last on test; the kept best is validation's best.
  assert all("validation_accuracy" in x for x in lines) and ["test_accuracy" in x for x in lines[-1:]] == [True]
  assert not any("test_accuracy" in x for x in lines[:-1])
  # Ties are common with 300 digits, and which of equal epochs is kept must not matter: a kept step has
  # the highest validation accuracy of the run.
  accuracy = {x["step"]: x["validation_accuracy"] for x in lines}
  kept = checkpointing.make_manager(workdir / "checkpoints", create=False).all_steps()
  assert max(accuracy[s] for s in kept) == max(accuracy.values())
  # The checkpoint's model spec rebuilds the model, and its eval accuracy is the one reported.
  _, spec = checkpointing.restore(checkpointing.make_manager(workdir / "checkpoints", create=False))
  assert spec == json.loads(json.dumps(model_spec(config)))


def test_a_workdir_holding_another_configs_run_is_refused_untouched(quickstart_run):
  workdir, _ = quickstart_run
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  other = load_config(QUICKSTART)
  other.optim.learning_rate = 0.07
  with pytest.raises(ValueError, match=r"another config.*optim"):
    loop.train_and_evaluate(other, str(workdir))
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_a_workdir_recorded_with_a_since_retired_or_since_added_key_still_resumes(tmp_path):
  config = load_config(QUICKSTART)
  workdir_files.check_config(tmp_path, config)  # Records config.json.
  recorded = json.loads((tmp_path / "config.json").read_text())
  recorded["dataset"]["shuffle_buffer"] = 50_000  # What a run recorded before the key was retired.
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  workdir_files.check_config(tmp_path, config)  # Accepted: the key no longer exists.
  del recorded["dataset"]["archive"], recorded["model"]["compute_dtype"]  # Recorded before these keys existed.
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  workdir_files.check_config(tmp_path, config)  # Accepted: they meant their defaults.
  config.model.compute_dtype = "bfloat16"  # Not the default: another network than the one recorded.
  with pytest.raises(ValueError, match=r"model\.compute_dtype: 'float32' \(recorded\) vs 'bfloat16' \(now\)"):
    workdir_files.check_config(tmp_path, config)
  config.model.compute_dtype = "float32"
  recorded["dataset"]["validation_seed"] += 1  # A key that does exist still counts.
  (tmp_path / "config.json").write_text(json.dumps(recorded))
  with pytest.raises(ValueError, match=r"another config.*dataset"):
    workdir_files.check_config(tmp_path, config)


def test_rerunning_a_finished_run_changes_nothing_and_reports_its_result(quickstart_run):
  workdir, summary = quickstart_run
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  again = loop.train_and_evaluate(load_config(QUICKSTART), str(workdir))
  assert again["test_accuracy"] == summary["test_accuracy"] and again["step"] == summary["step"]
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_config_errors_name_the_bad_key_or_value():
  c = default_config()
  c.optim.learning_rte = 0.1
  with pytest.raises(ValueError, match="learning_rte"):
    validate_config(c)
  for key, value, match in [
      ("penalty.kind", "l2", "'l2'"),
      ("optim.batch_size", 0, "batch_size"),
      ("optim.decay_fractions", (0.75, 0.5), "decay_fractions"),
      ("model.name", "resnet7", "resnet7"),
      ("penalty.strength", -1.0, "-1.0"),
      ("dataset.name", "mnist", "mnist"),
      ("dataset.augment", "mixup", "mixup"),
      ("dataset.validation_examples", -5, "-5"),
      ("checkpoint.keep_best", 1, "the test split is never used to choose"),  # No validation split.
  ]:
    c = default_config()
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
      validate_config(c)
  c = default_config()
  c.penalty.kind = "l1"  # On bounded norms: L1 belongs to BatchNorm scales.
  with pytest.raises(ValueError, match="'batch'"):
    validate_config(c)


def test_command_line_refuses_unknown_keys_and_bad_values_in_one_line_before_creating_the_workdir(tmp_path):
  for flag, line in [
      ("--config.optim.batchsize=32", "error: unknown config keys ['optim.batchsize'] (did you mean "
                                      "'optim.batch_size'?)"),
      ("--config.penalty.kind=l1", "error: config.penalty.kind = 'l1': acts on 'batch' norms"),
  ]:
    result = run_main(tmp_path / "run", flag, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_command_line_reports_missing_data_and_a_workdir_without_training_in_one_line_before_writing(tmp_path):
  folder_config = REPO / "configs" / "cifar10_folder.py"
  for config, flags, line in [
      (folder_config, [f"--config.dataset.folder={tmp_path / 'nowhere'}"],
       f"error: dataset.folder = '{tmp_path / 'nowhere'}' has no images of the split(s) ['train', 'test']"),
      (folder_config, [f"--config.dataset.archive={tmp_path / 'nowhere.tar.gz'}"],
       f"error: dataset.archive = '{tmp_path / 'nowhere.tar.gz'}' is not a file: set it to the dataset's .tar.gz "
       "with --config.dataset.archive=PATH"),
      (QUICKSTART, ["--config.phases=('prune',)"], f"error: workdir {tmp_path / 'run'} holds no trained run"),
  ]:
    result = run_main(tmp_path / "run", *flags, check=False, config=config)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(line), result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_optimizer_follows_the_recipe():
  """Bounded norms: 10x lr, no decay; conv/dense: coupled decay; the penalty goes through momentum."""
  c = default_config()
  c.optim.learning_rate, c.optim.weight_decay, c.penalty.strength, c.penalty.shift = 0.1, 0.01, 0.5, 0.0
  params = {"conv0": {"kernel": np.full((2,), 2.0, np.float32)}, "norm0": {"scale_logit": np.zeros(2, np.float32)}}
  grads = jax.tree.map(np.ones_like, params)
  tx = recipe.make_optimizer(c, steps_per_epoch=10)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Nesterov SGD on a first step: update = -lr * (1 + momentum) * g.
  np.testing.assert_allclose(updates["conv0"]["kernel"], -0.1 * 1.9 * (1 + 0.01 * 2.0), rtol=1e-6)
  penalty_grad = 0.5 * 0.5 * 0.5 * np.log(2.0)  # strength * -s (1 - s) log s at s = 1/2.
  np.testing.assert_allclose(updates["norm0"]["scale_logit"], -1.0 * 1.9 * (1 + penalty_grad), rtol=1e-6)
  schedule = recipe.learning_rate_schedule(c, steps_per_epoch=10)
  total = c.optim.num_epochs * 10
  assert [float(schedule(s)) for s in (0, total // 2 - 1, total // 2, total * 3 // 4)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.001])


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
  c = load_config(QUICKSTART)
  c.model.width_multiplier, c.optim.learning_rate, c.data.steps_per_dispatch = 0.25, 1e30, 5
  spec = model_spec(c)
  trainer = steps.make_trainer(c, model_from_spec(spec), steps_per_epoch=23)
  good = trainer.init()
  manager = checkpointing.make_manager(tmp_path / "checkpoints")
  checkpointing.save(manager, 0, good, spec)
  with pytest.raises(FloatingPointError, match=r"(nan|inf) at step \d+.*checkpoint \(step 0\)"):
    loop.train_and_evaluate(c, str(tmp_path))
  assert manager.all_steps() == [0] or checkpointing.make_manager(tmp_path / "checkpoints").all_steps() == [0]
  kept = final_params(tmp_path)
  assert_trees_close(kept["params"], jax.device_get(good["params"]), rtol=0, atol=0)
  assert optax.tree_utils.tree_norm(kept["params"]) > 0


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.py")), ids=lambda p: p.stem)
def test_every_shipped_config_is_valid_and_builds_its_model(path):
  config = load_config(path)
  validate_config(config)
  model = model_from_spec(model_spec(config))
  assert model.num_classes == config.dataset.num_classes


def test_a_short_run_on_the_shared_cifar10_folder_learns(tmp_path, cifar10_folder):
  c = load_config(REPO / "configs" / "cifar10_folder.py")
  c.dataset.folder = str(cifar10_folder)
  c.dataset.train_split = "test"  # 10,000 real images (1,000 held out for validation): one quick epoch.
  c.dataset.validation_examples = 1000
  c.model.name, c.model.width_multiplier = "cifar_resnet20", 0.25
  c.optim.num_epochs, c.optim.learning_rate, c.optim.decay_factor = 1, 0.05, 1.0
  c.penalty.relative_to_paper = False  # 78 steps: the paper-equivalent push would be ~1,700x the strength.
  summary = loop.train_and_evaluate(c, str(tmp_path))
  assert summary["validation_count"] == 1000 and summary["test_count"] == 10000
  # Ten classes: chance is 0.1 (+- 0.01 on 1,000 images); one epoch of 70 steps gets to about 0.2.
  assert summary["validation_accuracy"] > 0.15 and summary["test_accuracy"] > 0.15


def test_strength_relative_to_the_paper_keeps_the_integrated_push():
  """docs/method.md section 8: 15 epochs at batch 128 have ~21x less learning-rate sum than the paper's run."""
  c = paper_config_for_test(relative=True)
  c.optim.batch_size, c.optim.num_epochs = 128, 15
  steps = 50_000 // 128
  paper_sum = 0.1 * (160 * 781) * (0.5 + 0.25 * 0.1 + 0.25 * 0.01)  # lr 0.1, /10 at 50% and 75%.
  assert recipe.learning_rate_sum(c, steps) == pytest.approx(0.1 * 15 * steps * (0.5 + 0.025 + 0.0025), rel=1e-3)
  strength = recipe.effective_penalty_strength(c, steps)
  assert strength == pytest.approx(1e-3 * paper_sum / recipe.learning_rate_sum(c, steps), rel=1e-6)
  assert 20 < strength / 1e-3 < 22
  paper = paper_config_for_test(relative=True)  # The paper's own schedule: no change.
  assert recipe.effective_penalty_strength(paper, 781) == pytest.approx(1e-3, rel=1e-3)
  assert recipe.effective_penalty_strength(paper_config_for_test(relative=False), 1) == 1e-3


def paper_config_for_test(relative: bool):
  c = paper_config("cifar10", "cifar_vgg16", "rni")
  c.penalty.relative_to_paper = relative
  return c


def file_hashes(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_a_damaged_checkpoint_stops_in_one_line_and_changes_nothing_unless_told_to_skip_it(
    quickstart_run, tmp_path, capsys):
  source, _ = quickstart_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  steps = checkpointing.make_manager(workdir / "checkpoints", create=False).all_steps()
  newest, older = steps[-1], steps[-2]
  manifest = workdir / "checkpoints" / str(newest) / "state" / "manifest.ocdbt"
  manifest.write_bytes(manifest.read_bytes()[:10])  # Truncated, as by a full disk.
  before = file_hashes(workdir)
  result = run_main(workdir, check=False)
  last = result.stderr.strip().splitlines()[-1]
  assert result.returncode == 2, result.stderr[-3000:]
  assert last.startswith(f"error: checkpoint step {newest} in {workdir / 'checkpoints'} is damaged: a truncated or "
                         f"corrupt file ({manifest}: "), last
  assert "--skip_damaged_checkpoints" in last
  assert file_hashes(workdir) == before
  # Asked to (--skip_damaged_checkpoints), resuming takes the newest readable step and moves the damaged
  # one aside, so that training can save that step again.
  state, manager = loop.resume(lambda: checkpointing.make_manager(workdir / "checkpoints"), None, skip_damaged=True)
  assert int(state["step"]) == older and manager.all_steps() == steps[:-1]
  assert f"skipping damaged checkpoint step {newest}" in capsys.readouterr().out
  assert [p.name.split("_")[0] for p in (workdir / "checkpoints_damaged").iterdir()] == [str(newest)]
  assert all((workdir / "checkpoints" / str(s)).exists() for s in steps[:-1])


def test_batch_norm_baselines_start_gamma_at_one_half_as_the_official_code():
  for dataset in ("cifar10", "cifar100"):
    for name in ("cifar_vgg16", "cifar_resnet56"):
      for method in ("l1", "ucs", "polarization"):
        assert paper_config(dataset, name, method).model.batch_norm_scale_init == 0.5, (dataset, name, method)
  c = paper_config("cifar10", "cifar_resnet56", "ucs")  # The init reaches the model (one compile: ResNet-20).
  c.model.name, c.model.width_multiplier = "cifar_resnet20", 0.25
  model = model_from_spec(model_spec(c))
  variables = jax.jit(model.init, static_argnames="train")(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                                                           train=False)
  scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
            if getattr(path[-1], "key", None) == "scale"]
  assert len(scales) == 19 and all(np.all(np.asarray(s) == 0.5) for s in scales)
