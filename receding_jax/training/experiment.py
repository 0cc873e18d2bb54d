"""The experiment pipeline: train -> one-shot prune at each ratio -> fine-tune, with results on disk.

The workdir's layout is `receding_jax.training.workdir`'s, which reads and writes every file of it (a
local directory or gs://). Every phase resumes from its own checkpoints; a finished phase is not redone.
results.json is written last and records the config: a rerun of the same config finds it and returns it
without touching anything. Every decision "is this phase done?" is process 0's (`workdir_files.agree`), so
the processes of a multi-host run never disagree; only process 0 writes or deletes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from receding_jax import compile_clock
from receding_jax.training import (
    checkpointing,
    compile_cache,
    console,
    evaluation,
    loop,
    plots,
    splits,
    workdir_files,
)
from receding_jax.training import workdir as wd
from receding_jax.training.config import ConfigError, describe_differences, run_identity, validate_config
from receding_jax.training.pruned_checkpoint import prune_checkpoint, report_macs

#: What results.json reports per network: validation (every choice is made on it) and test accuracy.
ACCURACY_KEYS = ("validation_accuracy", "test_accuracy")


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training config of fine-tuning: the same recipe, `finetune.num_epochs` long, no penalty."""
  c = config.copy_and_resolve_references()
  c.unlock()
  c.penalty.kind, c.penalty.strength, c.penalty.relative_to_paper = "none", 0.0, False
  c.optim.num_epochs = config.finetune.num_epochs
  c.phases = ("train",)
  c.shrink.enabled = False  # A pruned network is fine-tuned at its width.
  return c


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, checkpoint_dir: wd.PathLike, step: int | None = None
) -> dict[str, float]:
  """Accuracy and loss on the validation (if carved) and test splits of checkpoint `step` (default: the
  newest) in `checkpoint_dir` (its own model spec)."""
  manager = checkpointing.make_manager(checkpoint_dir, create=False)
  state, spec = checkpointing.restore(manager, step)
  manager.close()
  return loop.evaluate_variables(config, spec, state)


def _stored_or_computed(path: wd.PathLike, compute, matches=lambda v: True) -> dict[str, Any]:
  """The JSON at `path` if process 0 finds it there (and it `matches`), else `compute()` written there."""
  stored = wd.read_json(path)
  if workdir_files.agree(stored is not None and matches(stored)):
    return stored if stored is not None else wd.read_json(path)
  value = compute()
  wd.write_json(path, value)
  return value


def trained_network(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The trained checkpoint that pruning starts from (`prune.source`) and its accuracies: {'source', 'step',
  'epoch', validation/test accuracy, 'train_seconds' (the epochs' wall times, summed over every attempt),
  'mac_epochs' (`plots.mac_epochs`), 'shrunk_channels' (removed while training, `shrinking`),
  'max_test_accuracy_over_epochs' (the paper's convention, where test was evaluated every epoch)}."""
  epochs = plots.read_epochs(workdir)
  common = {"train_seconds": plots.total_seconds(epochs), "mac_epochs": plots.mac_epochs(epochs),
            "max_test_accuracy_over_epochs": plots.max_test_accuracy(epochs),
            "shrunk_channels": sum(int(e.get("shrink_removed_channels", 0)) for e in epochs)}
  chosen = chosen_epoch(config, workdir, epochs)
  accuracies = {k: chosen[k] for k in ACCURACY_KEYS if k in chosen}
  if "test_accuracy" not in accuracies:  # Only the last epoch is evaluated on every split.
    accuracies = _stored_or_computed(
        wd.best_eval_path(workdir),
        lambda: {"step": chosen["step"], **evaluate_checkpoint(config, wd.checkpoint_dir(workdir), chosen["step"])},
        lambda v: v.get("step") == chosen["step"])
    accuracies = {k: accuracies[k] for k in ACCURACY_KEYS if k in accuracies}
  return {"source": config.prune.source, "step": chosen["step"], "epoch": chosen["epoch"], **accuracies, **common}


def chosen_epoch(config: ml_collections.ConfigDict, workdir: str, epochs: list[dict[str, Any]]) -> dict[str, Any]:
  """The epoch line (`epochs`: `plots.read_epochs`) of the trained checkpoint that `prune.source` picks: the
  newest checkpoint, or the kept one with the best validation accuracy (ties: the later step)."""
  manager = checkpointing.make_manager(wd.checkpoint_dir(workdir), create=False)
  kept, newest = set(manager.all_steps()), manager.latest_step()
  manager.close()
  if config.prune.source != "best":
    return _epoch_of_step(epochs, newest)
  candidates = [e for e in epochs if e["step"] in kept and "validation_accuracy" in e]
  if not candidates:
    raise FileNotFoundError(f"no kept checkpoint in {wd.checkpoint_dir(workdir)} has a validation accuracy")
  return _epoch_of_step(epochs, evaluation.choose_step(wd.checkpoint_dir(workdir), "best")[0])  # One owner.


def check_later_phases(config: ml_collections.ConfigDict, workdir: str) -> None:
  """ConfigError, before anything runs, when a ratio's pruned or fine-tuned network from an earlier attempt
  was made under other prune.* or finetune.* settings (or from another trained step) than `config`'s; a
  ratio without outputs is simply run (a finished run extended with a new ratio)."""
  step = None
  for ratio in config.prune.ratios:
    pruned_dir = wd.pruned_dir(workdir, ratio)
    if (report := wd.read_report(pruned_dir)) is not None:
      step = chosen_epoch(config, workdir, plots.read_epochs(workdir))["step"] if step is None else step
      _check_pruned_under(config, step, report, pruned_dir)
    finetune_dir = wd.finetune_dir(workdir, ratio)
    recorded = wd.read_config(finetune_dir)
    if recorded is not None and recorded["optim"]["num_epochs"] != config.finetune.num_epochs:
      raise ConfigError(f"{finetune_dir} holds a fine-tune of finetune.num_epochs = {recorded['optim']['num_epochs']}"
                        f", not {config.finetune.num_epochs}; use a new workdir, or remove that folder to redo it")


def _epoch_of_step(epochs: list[dict[str, Any]], step: int | None) -> dict[str, Any]:
  """The logged epoch line of checkpoint `step` (the newest: the end of training); a checkpoint saved by a
  run killed before it logged the epoch (older versions saved first) gets {'step', 'epoch'} only, and is
  evaluated like any epoch without test accuracy."""
  if step is None:
    raise FileNotFoundError("the trained run has no checkpoint")
  for line in reversed(epochs):
    if line["step"] == step:
      return line
  return {"step": step, "epoch": round(step * epochs[-1]["epoch"] / epochs[-1]["step"])}


def prune_phase(config: ml_collections.ConfigDict, workdir: str, ratio: float, step: int) -> dict[str, Any]:
  """One-shot pruning of the trained checkpoint `step` at `ratio` and its accuracy before fine-tuning."""
  pruned_dir, eval_path = wd.pruned_dir(workdir, ratio), wd.pruned_eval_path(workdir, ratio)
  report = wd.read_report(pruned_dir)
  if workdir_files.agree(report is not None and eval_path.exists()):
    return wd.read_json(eval_path)
  start = time.perf_counter()
  if workdir_files.agree(report is not None):  # Pruned, not evaluated yet.
    report = wd.read_report(pruned_dir)
  else:
    wd.remove_tree(pruned_dir)  # Our own output of an interrupted attempt: the report is written last.
    workdir_files.sync(f"cleared {pruned_dir}")
    report = timed_phase(workdir, f"prune {ratio:g}", lambda: prune_checkpoint(
        wd.checkpoint_dir(workdir), pruned_dir, step=step, ratio=ratio, scope=config.prune.scope,
        min_channels=config.prune.min_channels, channel_multiple=config.prune.channel_multiple,
        prune_streams=config.prune.prune_streams,
    ), parts=lambda r: r.get("seconds", {}), what=f"one-shot at {ratio:.0%}: read, analysis (importances, "
        "coupled groups, criterion), slicing, check of the narrow network, count, save")
  accuracies = timed_phase(workdir, f"evaluate pruned {ratio:g}", lambda: evaluate_checkpoint(config, pruned_dir),
                           what="its accuracy before fine-tuning")
  result = {**accuracies, "report": report, "prune_seconds": time.perf_counter() - start}
  wd.write_json(eval_path, result)
  return result


def _check_pruned_under(config: ml_collections.ConfigDict, step: int, report: Mapping[str, Any],
                        pruned_dir: wd.PathLike) -> None:
  """ConfigError, naming each differing key and both values, when the pruned network of an earlier attempt
  was pruned under other prune.* settings or from another trained step (prune.source) than `config`'s."""
  criterion = report.get("criterion", {})
  recorded = {"prune.scope": criterion.get("scope"), "prune.min_channels": criterion.get("min_channels"),
              "prune.channel_multiple": criterion.get("channel_multiple"),
              "prune.source (trained step)": report.get("source_step")}
  now = {"prune.scope": config.prune.scope, "prune.min_channels": config.prune.min_channels,
         "prune.channel_multiple": config.prune.channel_multiple, "prune.source (trained step)": step}
  if recorded != now:
    raise ConfigError(f"{pruned_dir} was pruned under another config: {describe_differences(recorded, now)}; "
                      "use a new workdir, or remove that ratio's pruned and fine-tuned folders to redo it")


def finetune_phase(
    config: ml_collections.ConfigDict, workdir: str, ratio: float, skip_damaged_checkpoints: bool = False,
    label: str = "",
) -> dict[str, Any]:
  """Fine-tunes the pruned network of `ratio` (resuming if interrupted); returns its final metrics, with
  'finetune_seconds' (its epochs' wall times) and the paper's 'max_test_accuracy_over_epochs'. `label` heads
  its plan line."""
  finetune_dir = os.fspath(wd.finetune_dir(workdir, ratio))
  manager = checkpointing.make_manager(wd.pruned_dir(workdir, ratio), create=False)
  state, spec = checkpointing.restore(manager)
  manager.close()
  summary = loop.train_and_evaluate(
      finetune_config(config), finetune_dir, spec=spec,
      init_variables={k: state[k] for k in ("params", "batch_stats")},
      skip_damaged_checkpoints=skip_damaged_checkpoints, label=label,
  )
  epochs = plots.read_epochs(finetune_dir)
  return {**summary, "finetune_seconds": plots.total_seconds(epochs),
          "max_test_accuracy_over_epochs": plots.max_test_accuracy(epochs)}


def recorded_results(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any] | None:
  """The results of a finished run of exactly `config` in `workdir`, or None."""
  results = wd.read_results(workdir)
  current = json.loads(config.to_json_best_effort())
  if results is None or run_identity(results.get("config", {})) != run_identity(current):
    return None
  return results


def run(
    config: ml_collections.ConfigDict, workdir: str, *, skip_damaged_checkpoints: bool = False
) -> dict[str, Any]:
  """Runs the phases of `config` in `workdir` and writes results.json and results.md; a finished run of the
  same config returns its recorded results at once and changes nothing. The workdir is locked meanwhile.
  `skip_damaged_checkpoints`: see `loop.resume`."""
  validate_config(config)
  workdir = os.fspath(wd.path(workdir))
  recorded = recorded_results(config, workdir)
  if workdir_files.agree(recorded is not None):
    print(f"{workdir} holds a finished run of this config; its recorded results:", flush=True)
    print(results_table(recorded), flush=True)
    print(console.outputs_line(workdir), flush=True)
    return recorded
  splits.check_available(config)  # Before anything is written: the data, and the workdir's trained network.
  if "train" not in config.phases or wd.read_config(workdir) is not None:
    workdir_files.check_config(workdir, config, record=False)
    check_later_phases(config, workdir)
  cache = compile_cache.enable(config)
  print(f"compilation cache: {cache or 'off (compilation_cache_dir is empty)'}", flush=True)
  with workdir_files.hold(workdir):
    results = _run_phases(config, workdir, skip_damaged_checkpoints)
  print(results_table(results), flush=True)
  print(console.outputs_line(workdir), flush=True)
  return results


def timed_phase(workdir: str, phase: str, compute: Callable[[], Any],
                parts: Callable[[Any], Mapping[str, float]] | None = None, what: str = "") -> Any:
  """`compute()` under a `compile_clock.Clock`: says what starts (and `what` it does), then prints the
  phase's line (wall time = compile + run, the slowest compilations, and `parts(result)` where given) and
  appends it to the workdir's metrics.jsonl as {'phase', 'seconds', 'compile_seconds', 'run_seconds', 'compiles', ...};
  returns what `compute` returned."""
  print(f"{phase}: {what}..." if what else f"{phase}...", flush=True)
  with compile_clock.Clock() as clock:
    out = compute()
  record = {"phase": phase, **clock.as_dict()}
  if parts is not None:
    record["parts"] = dict(parts(out))
  print(console.phase_line(record), flush=True)
  wd.append_metrics(workdir, record)
  return out


def _run_phases(config: ml_collections.ConfigDict, workdir: str, skip_damaged: bool) -> dict[str, Any]:
  phases = tuple(config.phases)
  if "train" in phases:
    timed_phase(workdir, "train", lambda: loop.train_and_evaluate(config, workdir,
                                                                  skip_damaged_checkpoints=skip_damaged),
                what=f"{config.optim.num_epochs} epochs, penalty {config.penalty.kind}")
  trained = timed_phase(workdir, "evaluate trained", lambda: trained_network(config, workdir),
                        what=f"the {config.prune.source} checkpoint, the one pruned")
  results: dict[str, Any] = {"trained": trained, "ratios": {}, "warnings": _warnings(config, workdir)}
  for k, ratio in enumerate(config.prune.ratios, 1):
    entry: dict[str, Any] = {}
    if "prune" in phases:
      entry["pruned"] = prune_phase(config, workdir, ratio, trained["step"])
    if "finetune" in phases:
      title = f"fine-tune {k} of {len(config.prune.ratios)} (pruned {ratio:g})"
      entry["finetuned"] = timed_phase(
          workdir, f"fine-tune {ratio:g}",
          lambda r=ratio, t=title: finetune_phase(config, workdir, r, skip_damaged, t + ": "),
          what=f"{title}, {config.finetune.num_epochs} epochs without penalty")
    results["ratios"][f"{ratio:g}"] = entry
  results["config"] = json.loads(config.to_json_best_effort())
  results["phases"] = wd.read_phases(workdir)
  if wd.is_writer():
    _plot(workdir, phases, results)
  wd.write_results(workdir, results, results_table(results))  # results.json last: marks the run finished.
  workdir_files.sync(f"results {workdir}")
  return wd.read_results(workdir)  # Process 0's, on every process.


def _warnings(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """What results.json and results.md warn of: the trained run's collapse (`console.collapse_warning`)."""
  warning = console.collapse_warning(plots.read_epochs(workdir), config.dataset.num_classes, config.penalty.kind,
                                     config.penalty.relative_to_paper)
  return [warning] if warning else []


def _plot(workdir: str, phases: tuple[str, ...], results: dict[str, Any]) -> None:
  """PNG figures in workdir/plots: final importance distribution, histograms per epoch, and accuracy
  vs pruning ratio when pruning ran."""
  out = wd.plots_dir(workdir)
  plots.importance_distribution({"final": [workdir]}, out / "importances.png")
  plots.importance_over_epochs(workdir, out / "importances_per_epoch.png")
  if "prune" in phases:
    plots.accuracy_vs_ratio({wd.path(workdir).name: [workdir]}, out / "accuracy_vs_ratio.png",
                            read=lambda _: results)


def results_table(results: dict[str, Any]) -> str:
  """Markdown: per ratio, accuracy trained / right after pruning / after fine-tuning (test, and validation
  in brackets when there is a validation split), params and MACs, wall times; which trained checkpoint."""
  trained = results["trained"]
  lines = ["| pruned | acc. trained | acc. pruned | acc. fine-tuned | params after/before | MACs after/before |"
           " prune s | fine-tune s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for ratio, entry in results["ratios"].items():
    pruned, tuned = entry.get("pruned", {}), entry.get("finetuned", {})
    report = pruned.get("report") or {}
    params = f"{report['params_after']:,}/{report['params_before']:,}" if report else ""
    macs = report_macs(report) if report else None  # Older results.json: flops_* keys.
    macs = f"{macs[1] / macs[0]:.3f}" if macs else ""
    lines.append(f"| {float(ratio):.0%} | {accuracy_cell(trained)} | {accuracy_cell(pruned)} | "
                 f"{accuracy_cell(tuned)} | {params} | {macs} | {pruned.get('prune_seconds', 0):.1f} | "
                 f"{tuned.get('finetune_seconds', 0):.1f} |")
  lines.append("")
  lines.append("Accuracy in %: test (validation). Every choice is made on validation; test is only reported.")
  if "source" in trained:
    which = {"last": "the last epoch", "best": "the best validation accuracy (ties: the later step)"}
    lines.append(f"Trained and pruned: the checkpoint of {which.get(trained['source'], trained['source'])}, "
                 f"epoch {trained['epoch']} (step {trained['step']}); train {trained['train_seconds']:.1f} s"
                 f"{training_cost(trained)}.")
  lines += [f"\n**{w[0].upper()}{w[1:]}**" for w in results.get("warnings", [])]
  return "\n".join(lines)


def training_cost(trained: Mapping[str, Any]) -> str:
  """', 41.2 M MAC-epochs, 120 channels removed while training' (what the record has)."""
  text = f", {trained['mac_epochs'] / 1e6:.2f} M MAC-epochs" if trained.get("mac_epochs") else ""
  shrunk = trained.get("shrunk_channels")
  return text + (f", {shrunk} channels removed while training (shrink)" if shrunk else "")


def accuracy_cell(metrics: dict[str, Any]) -> str:
  """'93.10 (92.85)': test accuracy in %, then validation accuracy in brackets where there is one."""
  test, val = metrics.get("test_accuracy"), metrics.get("validation_accuracy")
  if test is None:
    return ""
  return f"{100 * test:.2f}" + (f" ({100 * val:.2f})" if val is not None else "")
