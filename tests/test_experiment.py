"""The experiment pipeline: train -> prune -> fine-tune on the quickstart data, results, resumption, bad input."""

import collections
import contextlib
import hashlib
import io
import json
import shutil
import time

import pytest
from test_train import QUICKSTART, load_config

from receding_jax import compile_clock
from receding_jax.compare import main
from receding_jax.training import checkpointing, console, experiment, loop, plots
from receding_jax.training.config import ConfigError, validate_config


def small_pipeline_config():
  c = load_config(QUICKSTART)
  c.model.width_multiplier = 0.25
  c.optim.num_epochs, c.finetune.num_epochs = 3, 2
  c.prune.ratios = (0.5,)
  return c


#: The jitted functions of a run, by the name compile_clock reports them under.
RUN_FUNCTIONS = ("init_state", "start_state", "train_chunk", "eval_chunk")
PIPELINE_COMPILES = collections.Counter()  # What the module's pipeline run compiled, by function.
PIPELINE_OUTPUT = io.StringIO()  # What it printed.


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipeline")
  before = compile_clock.compile_counts()
  with contextlib.redirect_stdout(PIPELINE_OUTPUT):
    results = experiment.run(small_pipeline_config(), str(workdir))
  PIPELINE_COMPILES.update(compile_clock.compile_counts() - before)
  return workdir, results


def test_each_function_compiles_once_per_network_and_a_second_run_compiles_nothing(pipeline_run, tmp_path):
  _, results = pipeline_run
  assert results["ratios"]["0.5"]["finetuned"]["epoch"] == 2  # The counts are of a whole pipeline.
  counts = PIPELINE_COMPILES
  # One network trained from an init, one pruned network started from its sliced variables: init runs
  # (and compiles) once, the pruned network is never initialised; the train step compiles once per
  # network; evaluation once per network (validation and test have the same shape: 5 batches of 64).
  assert counts["init_state"] <= 1 and counts["start_state"] <= 1, counts
  assert 1 <= counts["train_chunk"] <= 2 and 1 <= counts["eval_chunk"] <= 2, counts
  # The same experiment again in this process (a new workdir): every step is found compiled.
  before = compile_clock.compile_counts()
  experiment.run(small_pipeline_config(), str(tmp_path / "again"))
  again = compile_clock.compile_counts() - before
  assert {name: again[name] for name in RUN_FUNCTIONS} == dict.fromkeys(RUN_FUNCTIONS, 0), again


def test_every_phase_reports_its_compile_and_run_time(pipeline_run):
  workdir, results = pipeline_run
  phases = {p["phase"]: p for p in results["phases"]}
  assert list(phases) == ["train", "evaluate trained", "prune 0.5", "evaluate pruned 0.5", "fine-tune 0.5"]
  for record in phases.values():
    assert 0 <= record["compile_seconds"] <= record["seconds"] + 1e-6, record
    assert abs(record["compile_seconds"] + record["run_seconds"] - record["seconds"]) < 1e-6, record
  assert phases["train"]["compiles"] >= 2 and phases["train"]["compile_seconds"] > 0  # At least train + eval.
  assert set(phases["prune 0.5"]["parts"]) == {"read", "analysis", "slicing", "check", "count", "save"}
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["phase"] for r in lines if "phase" in r] == list(phases)
  epochs = [r for r in lines if "epoch" in r]
  assert all(0 <= e["compile_seconds"] <= e["epoch_seconds"] for e in epochs)


def is_png(path) -> bool:
  return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_pipeline_writes_results_and_does_not_redo_finished_phases(pipeline_run):
  tmp_path, results = pipeline_run
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["ratios"].keys() == {"0.5"}
  entry = saved["ratios"]["0.5"]
  report = entry["pruned"]["report"]
  assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
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
  assert not list(tmp_path.rglob("*.tmp*")) and not (tmp_path / "lock").exists()


def test_rerunning_a_finished_pipeline_returns_its_recorded_results_and_touches_no_file(pipeline_run):
  workdir, results = pipeline_run
  before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()}
  start = time.perf_counter()
  again = experiment.run(small_pipeline_config(), str(workdir))
  assert time.perf_counter() - start < 5  # Reads two JSON files; no model, data or checkpoint is opened.
  assert again == json.loads((workdir / "results.json").read_text())
  assert again["trained"]["train_seconds"] == results["trained"]["train_seconds"]
  assert again["ratios"]["0.5"]["finetuned"]["finetune_seconds"] == results["ratios"]["0.5"]["finetuned"][
      "finetune_seconds"]
  assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in workdir.rglob("*") if p.is_file()} == before


def test_the_best_checkpoint_on_validation_is_the_one_pruned(pipeline_run):
  workdir, results = pipeline_run
  trained = results["trained"]
  assert trained["source"] == "best"
  epochs = [e for x in (workdir / "metrics.jsonl").read_text().splitlines() if "epoch" in (e := json.loads(x))]
  kept = checkpointing.make_manager(workdir / "checkpoints", create=False).all_steps()
  accuracy = {e["step"]: e["validation_accuracy"] for e in epochs}
  best = max(accuracy[s] for s in kept)
  assert trained["validation_accuracy"] == best == max(accuracy.values())
  assert trained["step"] == max(s for s in kept if accuracy[s] == best)  # Ties: the later step.
  assert results["ratios"]["0.5"]["pruned"]["report"]["source_step"] == trained["step"]
  if trained["step"] != epochs[-1]["step"]:  # Its test accuracy was measured on that checkpoint.
    assert json.loads((workdir / "best_eval.json").read_text())["test_accuracy"] == trained["test_accuracy"]
  assert f"epoch {trained['epoch']} (step {trained['step']})" in (workdir / "results.md").read_text()


def file_hashes(root) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


def test_a_finished_run_extended_with_a_ratio_trains_nothing_and_fine_tunes_only_the_new_one(pipeline_run, tmp_path):
  source, results = pipeline_run
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  kept = {d: file_hashes(workdir / d) for d in ("checkpoints", "pruned_0.5")}
  epochs = plots.read_epochs(workdir)
  extended = small_pipeline_config()
  extended.prune.ratios = (0.5, 0.3)  # Only a later phase's key: the trained network is the same.
  out = experiment.run(extended, str(workdir))
  assert {d: file_hashes(workdir / d) for d in kept} == kept  # Nothing retrained, re-pruned or re-tuned.
  assert plots.read_epochs(workdir) == epochs
  assert out["trained"] == results["trained"] and out["ratios"]["0.5"]["pruned"] == results["ratios"]["0.5"]["pruned"]
  tuned, tuned_before = out["ratios"]["0.5"]["finetuned"], results["ratios"]["0.5"]["finetuned"]
  compared = (*experiment.ACCURACY_KEYS, "step", "finetune_seconds")
  assert {k: tuned[k] for k in compared} == {k: tuned_before[k] for k in compared}
  assert out["ratios"]["0.3"]["finetuned"]["epoch"] == 2
  assert out["ratios"]["0.3"]["pruned"]["report"]["source_step"] == results["trained"]["step"]
  attempt = [p["phase"] for p in out["phases"][len(results["phases"]):]]
  assert attempt == ["train", "evaluate trained", "fine-tune 0.5", "prune 0.3", "evaluate pruned 0.3",
                     "fine-tune 0.3"]


def test_a_workdir_refuses_another_network_or_other_outputs_naming_each_key_before_writing(pipeline_run):
  workdir, _ = pipeline_run
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  other = small_pipeline_config()
  other.model.width_multiplier, other.optim.learning_rate = 0.5, 0.07
  other.phases = ("prune",)  # Phases that leave out training check the trained network too.
  with pytest.raises(ConfigError, match=r"model\.width_multiplier: 0\.25 \(recorded\) vs 0\.5 \(now\); "
                                        r"optim\.learning_rate: 0\.05 \(recorded\) vs 0\.07 \(now\)"):
    experiment.run(other, str(workdir))
  rescoped = small_pipeline_config()
  rescoped.prune.scope = "local"  # The ratio 0.5 was pruned globally.
  with pytest.raises(ConfigError, match=r"pruned under another config: prune\.scope: 'global' \(recorded\) vs "
                                        r"'local' \(now\)"):
    experiment.run(rescoped, str(workdir))
  longer = small_pipeline_config()
  longer.finetune.num_epochs = 3
  with pytest.raises(ConfigError, match=r"finetune\.num_epochs = 2, not 3"):
    experiment.run(longer, str(workdir))
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_pruning_phases_need_a_trained_run_in_the_workdir(tmp_path):
  c = small_pipeline_config()
  c.phases = ("prune", "finetune")
  with pytest.raises(ConfigError, match=r"holds no trained run .*add 'train'"):
    experiment.run(c, str(tmp_path / "empty"))
  assert not (tmp_path / "empty").exists()


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
  # The quickstart evaluates test only at the end: no paper's-convention row, and the table says why.
  assert "best epoch (paper)" not in table.split("\n\n")[0] and "eval_test_every_epoch=True" in table
  assert is_png(tmp_path / "cmp" / "importances.png") and is_png(tmp_path / "cmp" / "accuracy_vs_ratio.png")
  with pytest.raises(FileNotFoundError, match=r"nothing"):
    main(["--workdirs", str(tmp_path / "nothing"), "--output_dir", str(tmp_path / "cmp2")])
  assert not (tmp_path / "cmp2").exists()


def fake_seed_run(workdir, seed, test_accuracy):
  """A workdir as the pipeline leaves it, with chosen accuracies (the aggregation is what is tested); test
  was evaluated every epoch, its best (the paper's convention) 0.01 above the last."""
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps({"seed": seed, "optim": {"num_epochs": 3}}))
  histogram = [0] * 100
  histogram[0], histogram[99] = 3, 1
  last = {"epoch": 3, "importance_histogram": histogram, "importance_fraction_below_0.05": 0.75,
          "importance_fraction_above_0.5": 0.25, "test_accuracy": test_accuracy}
  epochs = [{"epoch": 1, "test_accuracy": 0.1}, {"epoch": 2, "test_accuracy": test_accuracy + 0.01}, last]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))
  (workdir / "pruned_0.5" / "finetune").mkdir(parents=True)
  (workdir / "pruned_0.5" / "finetune" / "metrics.jsonl").write_text(
      json.dumps({"epoch": 1, "test_accuracy": test_accuracy + 0.02}) + "\n")
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
  # The paper's convention beside it, labelled: the best test accuracy over the epochs of each run.
  assert ("| rni | 3 | 50% | test, best epoch (paper) | 94.00 ± 3.61 | 93.00 ± 3.61 | 95.00 ± 3.61 | 75.00 ± 0.00 "
          "| 25.00 ± 0.00 |") in table
  assert is_png(tmp_path / "cmp" / "accuracy_vs_ratio.png")
  # Runs that differ in more than the seed are not seeds of one config.
  other = tmp_path / "other"
  fake_seed_run(other, 5, 0.5)
  (other / "config.json").write_text(json.dumps({"seed": 5, "optim": {"num_epochs": 4}}))
  with pytest.raises(ValueError, match=r"differ in \['optim\.num_epochs'\]"):
    main(["--workdirs", f"{dirs[0]},{other}", "--labels", "rni,rni", "--output_dir", str(tmp_path / "cmp3")])
  assert not (tmp_path / "cmp3").exists()


def test_evaluate_reproduces_the_recorded_accuracy_params_and_macs_of_trained_and_pruned(pipeline_run, tmp_path,
                                                                                        capsys):
  from receding_jax.evaluate import main as evaluate_main

  workdir, results = pipeline_run
  trained, pruned = results["trained"], results["ratios"]["0.5"]["pruned"]
  report = pruned["report"]
  evaluate_main(["--checkpoint_dir", str(workdir / "checkpoints"), "--output_json", str(tmp_path / "trained.json")])
  printed = capsys.readouterr().out
  assert f"evaluating step {trained['step']} of {workdir / 'checkpoints'}: the best validation accuracy" in printed
  assert "| split | examples | accuracy | loss | parameters | MACs (one input) |" in printed
  got = json.loads((tmp_path / "trained.json").read_text())
  assert (got["split"], got["step"], got["accuracy"]) == ("test", trained["step"], trained["test_accuracy"])
  assert (got["params"], got["macs"]) == (report["params_before"], report["macs_before"])
  assert got["config"] == str(workdir / "config.json")
  evaluate_main(["--checkpoint_dir", str(workdir / "pruned_0.5" / "pruned"), "--split", "validation",
                 "--output_json", str(tmp_path / "pruned.json")])
  got = json.loads((tmp_path / "pruned.json").read_text())
  assert (got["split"], got["step"], got["accuracy"]) == ("validation", 0, pruned["validation_accuracy"])
  assert (got["params"], got["macs"]) == (report["params_after"], report["macs_after"])
  assert f"| validation | {got['examples']:,} | {pruned['validation_accuracy']:.4f} |" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, message", [
    ("--split", "dev", "--split must be one of train, validation, test, got 'dev'"),
    ("--step", "first", "--step must be best, latest or a step number, got 'first'"),
    ("--step", "7", "no checkpoint step 7 in "),
])
def test_evaluate_refuses_a_bad_split_or_step_in_one_line(pipeline_run, capsys, flag, value, message):
  from receding_jax.evaluate import main as evaluate_main

  workdir, _ = pipeline_run
  with pytest.raises(SystemExit) as exit_info:
    evaluate_main(["--checkpoint_dir", str(workdir / "checkpoints"), flag, value])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_prune_checkpoint_prunes_the_best_validation_step_by_default_and_says_so(pipeline_run, tmp_path, capsys):
  from receding_jax.prune_checkpoint import main as prune_main

  workdir, results = pipeline_run
  step = results["trained"]["step"]
  prune_main(["--checkpoint_dir", str(workdir / "checkpoints"), "--output_dir", str(tmp_path / "p"), "--ratio", "0.5"])
  printed = capsys.readouterr().out
  assert f"pruning step {step} of {workdir / 'checkpoints'}: the best validation accuracy (" in printed
  report = json.loads((tmp_path / "p" / "pruning_report.json").read_text())
  assert report["source_step"] == step == results["ratios"]["0.5"]["pruned"]["report"]["source_step"]
  assert report["params_after"] == results["ratios"]["0.5"]["pruned"]["report"]["params_after"]


def test_the_console_says_what_each_phase_does_and_ends_naming_the_outputs(pipeline_run):
  workdir, results = pipeline_run
  lines = PIPELINE_OUTPUT.getvalue().splitlines()
  assert "train: 3 epochs, penalty rni..." in lines
  assert ("prune 0.5: one-shot at 50%: read, analysis (importances, coupled groups, criterion), slicing, "
          "check of the narrow network, count, save...") in lines
  assert "fine-tune 0.5: fine-tune 1 of 1 (pruned 0.5), 2 epochs without penalty..." in lines
  # The fine-tune's plan line names it; the trained run's does not.
  plans = [x for x in lines if "steps/epoch x" in x]
  assert len(plans) == 2 and plans[0].startswith("cifar_resnet20 (")
  assert plans[1].startswith("fine-tune 1 of 1 (pruned 0.5): cifar_resnet20 (") and "x 2 epochs" in plans[1]
  assert lines[-1] == console.outputs_line(str(workdir))
  assert lines[-1].startswith(f"results: {workdir}/results.md") and (workdir / "results.md").exists()
  assert f"plots: {workdir}/plots/;" in lines[-1] and any((workdir / "plots").iterdir())
  assert f"tensorboard --logdir {workdir} " in lines[-1] and list(workdir.rglob("events.out.tfevents*"))
  assert results["warnings"] == [] and not any(x.startswith("warning:") for x in lines)


#: (validation accuracy, mean importance) of epochs 1-7 of the quickstart under L1 (batch norms) at strength
#: 0.02: at chance for epochs 4-6 while its importances collapse.
L1_QUICKSTART = [(0.813, 0.892), (0.873, 0.728), (0.503, 0.554), (0.113, 0.380), (0.103, 0.214), (0.103, 0.094),
                 (0.883, 0.111)]


def epoch_lines(history):
  return [{"epoch": i, "step": 18 * i, "train_loss": 0.1, "train_accuracy": 0.99, "train_penalty": 1.0,
           "learning_rate": 0.05, "validation_accuracy": acc, "importance_mean": mean,
           "importance_fraction_below_0.05": 0.0, "importance_fraction_above_0.5": 0.0, "epoch_seconds": 0.3}
          for i, (acc, mean) in enumerate(history, 1)]


def test_a_run_at_chance_with_collapsing_importances_is_warned_of_naming_the_key():
  epochs = epoch_lines(L1_QUICKSTART)
  warning = console.collapse_warning(epochs, 10, "l1")
  assert warning.startswith("warning: validation accuracy at chance (1/10) for epochs 4-6 (0.11, 0.10, 0.10)")
  assert warning.endswith("mean importance fell from 0.89 to 0.09: the l1 penalty is too strong for this "
                          "schedule; lower penalty.strength")
  assert "penalty.relative_to_paper" in console.collapse_warning(epochs, 10, "l1", relative_to_paper=True)
  assert console.collapse_warning(epochs[:5], 10, "l1") is None  # Two epochs at chance only.
  assert console.collapse_warning(epochs, 10, "none") is None  # A fine-tune: no penalty to lower.
  assert console.collapse_warning(epoch_lines([(0.1, 0.9)] * 5), 10, "l1") is None  # Importances intact.
  table = experiment.results_table({"trained": {}, "ratios": {}, "warnings": [warning]})
  assert f"**W{warning[1:]}**" in table.splitlines()


def test_the_loop_prints_the_collapse_warning_once_where_it_first_holds(tmp_path, capsys):
  config = load_config(QUICKSTART)
  config.penalty.kind, config.model.norm = "l1", "batch"
  for line in epoch_lines(L1_QUICKSTART):
    plots.wd.append_metrics(tmp_path, line)
    loop._report_epoch(config, str(tmp_path), line, 1.0, line["epoch"])
  out = capsys.readouterr().out.splitlines()
  warnings = [i for i, x in enumerate(out) if x.startswith("warning:")]
  assert len(warnings) == 1 and out[warnings[0] - 1].startswith("epoch 6/15 ")
