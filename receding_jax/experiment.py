"""The experiment pipeline: train -> one-shot prune at each ratio -> fine-tune, with results on disk.

Workdir layout (every phase resumes from its own checkpoints; a finished phase is not redone):
  config.json, checkpoints/, metrics.jsonl, events.*     training (`train.train_and_evaluate`)
  pruned_<ratio>/pruned/                                 the pruned network (step 0) + pruning_report.json
  pruned_<ratio>/pruned_eval.json                        its accuracy before any fine-tuning
  pruned_<ratio>/finetune/                               fine-tuning run (no penalty)
  results.json, results.md                               per ratio: accuracies, params/FLOPs, wall times
  plots/*.png                                            importances (final, per epoch), accuracy vs ratio
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections

from receding_jax import checkpointing, input_pipeline, plots, train
from receding_jax.config import validate_config
from receding_jax.models import model_from_spec
from receding_jax.prune_checkpoint import prune_checkpoint

#: What results.json reports per network: validation (every choice is made on it) and test accuracy.
ACCURACY_KEYS = ("validation_accuracy", "test_accuracy")


def _read_json(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  """Atomically (a kill never leaves half a file)."""
  if jax.process_index() != 0:
    return
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def finetune_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The training config of fine-tuning: the same recipe, `finetune.num_epochs` long, no penalty."""
  c = config.copy_and_resolve_references()
  c.unlock()
  c.penalty.kind, c.penalty.strength, c.penalty.relative_to_paper = "none", 0.0, False
  c.optim.num_epochs = config.finetune.num_epochs
  c.phases = ("train",)
  return c


def evaluate_checkpoint(config: ml_collections.ConfigDict, checkpoint_dir: str) -> dict[str, float]:
  """Accuracy and loss on the validation (if carved) and test splits of the newest checkpoint in
  `checkpoint_dir` (its own model spec)."""
  state, spec = checkpointing.restore(checkpointing.make_manager(checkpoint_dir, create=False))
  model = model_from_spec(spec)
  trainer = train.make_trainer(config, model, steps_per_epoch=1)
  shards = {role: input_pipeline.load_shard(config, role, jax.process_index(), jax.process_count())
            for role in input_pipeline.evaluation_roles(config)}
  return train.evaluate_splits(trainer, {k: state[k] for k in ("params", "batch_stats")}, config, shards)


def prune_phase(config: ml_collections.ConfigDict, workdir: str, ratio: float) -> dict[str, Any]:
  """One-shot pruning of the trained network at `ratio` and its accuracy before fine-tuning."""
  ratio_dir = os.path.join(workdir, f"pruned_{ratio:g}")
  pruned_dir = os.path.join(ratio_dir, "pruned")
  report_path = os.path.join(pruned_dir, "pruning_report.json")
  eval_path = os.path.join(ratio_dir, "pruned_eval.json")
  done = _read_json(eval_path)
  if done is not None and os.path.exists(report_path):
    return done
  start = time.perf_counter()
  if not os.path.exists(report_path) and os.path.exists(pruned_dir):
    shutil.rmtree(pruned_dir)  # Our own output of an interrupted attempt: the report is written last.
  if not os.path.exists(report_path):
    prune_checkpoint(
        os.path.join(workdir, "checkpoints"), pruned_dir, ratio=ratio, scope=config.prune.scope,
        min_channels=config.prune.min_channels, channel_multiple=config.prune.channel_multiple,
    )
  result = {**evaluate_checkpoint(config, pruned_dir), "report": _read_json(report_path),
            "prune_seconds": time.perf_counter() - start}
  _write_json(eval_path, result)
  return result


def finetune_phase(config: ml_collections.ConfigDict, workdir: str, ratio: float) -> dict[str, Any]:
  """Fine-tunes the pruned network of `ratio` (resuming if interrupted); returns its final metrics."""
  ratio_dir = os.path.join(workdir, f"pruned_{ratio:g}")
  pruned_dir = os.path.join(ratio_dir, "pruned")
  state, spec = checkpointing.restore(checkpointing.make_manager(pruned_dir, create=False))
  start = time.perf_counter()
  summary = train.train_and_evaluate(
      finetune_config(config), os.path.join(ratio_dir, "finetune"), spec=spec,
      init_variables={k: state[k] for k in ("params", "batch_stats")},
  )
  return {**summary, "finetune_seconds": time.perf_counter() - start}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the phases of `config` in `workdir` and writes results.json and results.md."""
  validate_config(config)
  workdir = os.path.abspath(workdir)
  phases = tuple(config.phases)
  start = time.perf_counter()
  trained = train.train_and_evaluate(config, workdir) if "train" in phases else plots.read_epochs(workdir)[-1]
  accuracies = {k: trained[k] for k in ACCURACY_KEYS if k in trained}
  results: dict[str, Any] = {"trained": {**accuracies, "train_seconds": time.perf_counter() - start},
                             "ratios": {}}
  for ratio in config.prune.ratios:
    entry: dict[str, Any] = {}
    if "prune" in phases:
      entry["pruned"] = prune_phase(config, workdir, ratio)
    if "finetune" in phases:
      entry["finetuned"] = finetune_phase(config, workdir, ratio)
    results["ratios"][f"{ratio:g}"] = entry
  _write_json(os.path.join(workdir, "results.json"), results)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(results_table(results) + "\n")
    _plot(workdir, phases)
  print(results_table(results), flush=True)
  return results


def _plot(workdir: str, phases: tuple[str, ...]) -> None:
  """PNG figures in workdir/plots: final importance distribution, histograms per epoch, and accuracy
  vs pruning ratio when pruning ran."""
  out = os.path.join(workdir, "plots")
  plots.importance_distribution({"final": [workdir]}, os.path.join(out, "importances.png"))
  plots.importance_over_epochs(workdir, os.path.join(out, "importances_per_epoch.png"))
  if "prune" in phases:
    plots.accuracy_vs_ratio({os.path.basename(workdir): [workdir]}, os.path.join(out, "accuracy_vs_ratio.png"))


def results_table(results: dict[str, Any]) -> str:
  """Markdown: per ratio, accuracy trained / right after pruning / after fine-tuning (test, and validation
  in brackets when there is a validation split), params and FLOPs, wall times."""
  lines = ["| pruned | acc. trained | acc. pruned | acc. fine-tuned | params after/before | FLOPs after/before |"
           " prune s | fine-tune s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  trained = results["trained"]
  for ratio, entry in results["ratios"].items():
    pruned, tuned = entry.get("pruned", {}), entry.get("finetuned", {})
    report = pruned.get("report") or {}
    params = f"{report['params_after']:,}/{report['params_before']:,}" if report else ""
    flops = f"{report['flops_after'] / report['flops_before']:.3f}" if report else ""
    lines.append(f"| {float(ratio):.0%} | {accuracy_cell(trained)} | {accuracy_cell(pruned)} | "
                 f"{accuracy_cell(tuned)} | {params} | {flops} | {pruned.get('prune_seconds', 0):.1f} | "
                 f"{tuned.get('finetune_seconds', 0):.1f} |")
  lines.append("")
  lines.append("Accuracy in %: test (validation). Every choice is made on validation; test is only reported.")
  return "\n".join(lines)


def accuracy_cell(metrics: dict[str, Any]) -> str:
  """'93.10 (92.85)': test accuracy in %, then validation accuracy in brackets where there is one."""
  test, val = metrics.get("test_accuracy"), metrics.get("validation_accuracy")
  if test is None:
    return ""
  return f"{100 * test:.2f}" + (f" ({100 * val:.2f})" if val is not None else "")
