"""The experiment pipeline: train -> prune -> fine-tune on the quickstart data, results, resumption, bad input."""

import json

import pytest
from test_train import QUICKSTART, load_config

from receding_jax import experiment
from receding_jax.compare import main
from receding_jax.config import validate_config


def small_pipeline_config():
  c = load_config(QUICKSTART)
  c.model.width_multiplier = 0.25
  c.optim.num_epochs, c.finetune.num_epochs = 3, 2
  c.prune.ratios = (0.5,)
  return c


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipeline")
  return workdir, experiment.run(small_pipeline_config(), str(workdir))


def is_png(path) -> bool:
  return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_pipeline_writes_results_and_does_not_redo_finished_phases(pipeline_run):
  tmp_path, results = pipeline_run
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["ratios"].keys() == {"0.5"}
  entry = saved["ratios"]["0.5"]
  report = entry["pruned"]["report"]
  assert report["params_after"] < report["params_before"] and report["flops_after"] < report["flops_before"]
  # Every network is evaluated on the held-out validation digits (choices) and the test digits (reported).
  assert entry["pruned"]["validation_count"] == 300 and entry["pruned"]["test_count"] == 297
  assert 0 <= entry["pruned"]["test_accuracy"] <= 1
  assert entry["finetuned"]["epoch"] == 2 and entry["finetuned"]["test_accuracy"] > 0.5
  assert saved["trained"]["test_accuracy"] == results["trained"]["test_accuracy"]
  assert saved["trained"].keys() >= {"validation_accuracy", "test_accuracy", "train_seconds"}
  table = (tmp_path / "results.md").read_text()
  tuned = entry["finetuned"]
  assert "| 50% |" in table
  assert f"{100 * tuned['test_accuracy']:.2f} ({100 * tuned['validation_accuracy']:.2f})" in table
  # The fine-tuned model is the pruned architecture, not the original.
  spec = json.loads((tmp_path / "pruned_0.5" / "finetune" / "config.json").read_text())
  assert spec["penalty"]["kind"] == "none" and spec["optim"]["num_epochs"] == 2
  for name in ("importances.png", "importances_per_epoch.png", "accuracy_vs_ratio.png"):
    assert is_png(tmp_path / "plots" / name), name
  phase_files = [p for p in tmp_path.rglob("*") if "pruned_0.5" in str(p) or "checkpoints" in str(p)]
  before = {p: p.stat().st_mtime_ns for p in phase_files}
  again = experiment.run(small_pipeline_config(), str(tmp_path))
  assert again["ratios"]["0.5"]["pruned"]["test_accuracy"] == entry["pruned"]["test_accuracy"]
  assert again["ratios"]["0.5"]["finetuned"]["test_accuracy"] == entry["finetuned"]["test_accuracy"]
  assert {p: p.stat().st_mtime_ns for p in phase_files} == before


@pytest.mark.parametrize("key, value, match", [
    ("phases", ("train", "distill"), "distill"),
    ("phases", ("prune", "train"), "phases"),
    ("prune.ratios", (0.5, 1.0), "1.0"),
    ("prune.scope", "layerwise", "layerwise"),
])
def test_bad_pipeline_configs_are_refused_before_any_work(tmp_path, key, value, match):
  c = small_pipeline_config()
  node = c
  *parents, name = key.split(".")
  for p in parents:
    node = node[p]
  node[name] = value
  with pytest.raises(ValueError, match=match):
    validate_config(c)
  with pytest.raises(ValueError, match=match):
    experiment.run(c, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_compare_builds_one_table_and_figures_from_several_workdirs(pipeline_run, tmp_path):
  workdir, results = pipeline_run
  main(["--workdirs", f"{workdir},{workdir}", "--labels", "rni,again", "--output_dir", str(tmp_path / "cmp")])
  table = (tmp_path / "cmp" / "comparison.md").read_text()
  finetuned = f"{100 * results['ratios']['0.5']['finetuned']['test_accuracy']:.2f}"
  assert table.count(finetuned) == 2 and "| rni | 1 | 50% | test |" in table and "| again | 1 | 50% | test |" in table
  assert "| rni | 1 | 50% | validation |" in table
  assert is_png(tmp_path / "cmp" / "importances.png") and is_png(tmp_path / "cmp" / "accuracy_vs_ratio.png")
  with pytest.raises(FileNotFoundError, match=r"nothing"):
    main(["--workdirs", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "cmp2")])
  assert not (tmp_path / "cmp2").exists()


def fake_seed_run(workdir, seed, test_accuracy):
  """A workdir as the pipeline leaves it, with chosen accuracies (the aggregation is what is tested)."""
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"seed": seed, "optim": {"num_epochs": 3}}))
  histogram = [0] * 100
  histogram[0], histogram[99] = 3, 1
  (workdir / "metrics.jsonl").write_text(json.dumps({
      "epoch": 3, "importance_histogram": histogram, "importance_fraction_below_0.05": 0.75,
      "importance_fraction_above_0.5": 0.25}) + "\n")
  stage = {"test_accuracy": test_accuracy}
  (workdir / "results.json").write_text(json.dumps(
      {"trained": stage, "ratios": {"0.5": {"pruned": stage, "finetuned": stage}}}))


def test_seeds_of_one_config_aggregate_to_mean_and_std(tmp_path):
  dirs = [tmp_path / f"s{seed}" for seed in range(3)]
  for seed, (d, acc) in enumerate(zip(dirs, (0.90, 0.92, 0.97), strict=True)):
    fake_seed_run(d, seed, acc)
  main(["--workdirs", ",".join(map(str, dirs)), "--labels", "rni,rni,rni", "--output_dir", str(tmp_path / "cmp")])
  table = (tmp_path / "cmp" / "comparison.md").read_text()
  # Mean 93.00, sample std sqrt(((-3)^2 + (-1)^2 + 4^2) / 2) = sqrt(13) = 3.61 (in %).
  assert "| rni | 3 | 50% | test | 93.00 ± 3.61 | 93.00 ± 3.61 | 93.00 ± 3.61 | 75.00 ± 0.00 | 25.00 ± 0.00 |" in table
  assert is_png(tmp_path / "cmp" / "accuracy_vs_ratio.png")
  # Runs that differ in more than the seed are not seeds of one config.
  other = tmp_path / "other"
  fake_seed_run(other, 5, 0.5)
  (other / "config.json").write_text(json.dumps({"seed": 5, "optim": {"num_epochs": 4}}))
  with pytest.raises(ValueError, match=r"differ in \['optim'\]"):
    main(["--workdirs", f"{dirs[0]},{other}", "--labels", "rni,rni", "--output_dir", str(tmp_path / "cmp3")])
  assert not (tmp_path / "cmp3").exists()
