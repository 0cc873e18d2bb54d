"""The numbers of launch/gpu_demo.py: the schedule it plans before the three runs (the most epochs that fit the
time budget at a measured images/s) and the results it reports after them (results.json, results.md).
Only the standard library is imported here: this runs before the project is installed.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

METHODS = ("rni", "l1", "ucs")
RATIOS = (0.5, 0.9)
#: Seconds per ratio for pruning, saving, restoring and evaluating, beyond compilation (a guess; printed).
PRUNE_SECONDS = 10.0
ACCURACY_KEYS = ("validation_accuracy", "test_accuracy", "max_test_accuracy_over_epochs")


# ---------------------------------------------------------------------------------------------------
# Before the runs: the schedule.


def finetune_epochs(epochs: int) -> int:
  """The short fine-tune: an eighth of training, at least one epoch."""
  return max(1, math.ceil(epochs / 8))


def plan_schedule(images_per_s: float, run_overhead_s: float, compile_s: float, budget_s: float, train_images: int,
                  eval_images: int, max_epochs: int, runs: int = len(METHODS), ratios: int = len(RATIOS)) -> dict:
  """The most training epochs E (with `finetune_epochs(E)` per ratio) whose predicted time for `runs` runs
  fits `budget_s` (at least 1, at most `max_epochs`). An epoch trains `train_images` and evaluates
  `eval_images` (a third of the cost each); a run pays `run_overhead_s` (start-up, compilation, final
  evaluation, as measured) and per ratio a compilation, PRUNE_SECONDS and an evaluation."""
  epoch_s = (train_images + eval_images / 3) / images_per_s
  fixed_s = run_overhead_s + ratios * (compile_s + PRUNE_SECONDS + eval_images / 3 / images_per_s)

  def total(e: int) -> float:
    return runs * (fixed_s + (e + ratios * finetune_epochs(e)) * epoch_s)

  epochs = 1
  while epochs < max_epochs and total(epochs + 1) <= budget_s:
    epochs += 1
  return {"epochs": epochs, "finetune_epochs": finetune_epochs(epochs), "predicted_s": total(epochs),
          "budget_s": budget_s, "epoch_s": epoch_s, "run_fixed_s": fixed_s, "images_per_s": images_per_s}


def print_schedule(plan: dict, what: str, tiny: bool) -> None:
  """One line: the schedule and, when planned, the images/s (of `what`) and the predicted time behind it."""
  if plan["source"] == "--epochs":
    print(f"schedule: {plan['epochs']} epochs + {plan['finetune_epochs']} fine-tune epochs per ratio (--epochs)",
          flush=True)
    return
  print(f"schedule: {plan['images_per_s']:,.0f} images/s ({plan['source']}; {what}) -> {plan['epochs']} epochs + "
        f"{plan['finetune_epochs']} fine-tune epochs per ratio; predicted {plan['predicted_s'] / 60:.1f} min for the "
        f"three runs (budget {plan['budget_s'] / 60:.1f} min: {plan['run_fixed_s']:.0f} s fixed per run + "
        f"{plan['epoch_s']:.1f} s an epoch{'; tiny mode: at most 1 epoch' if tiny else ''})", flush=True)


# ---------------------------------------------------------------------------------------------------
# After the runs: the results.


def _pick(entry: dict, keys: tuple[str, ...]) -> dict:
  return {k: entry[k] for k in keys if k in entry}


def method_summary(workdir: pathlib.Path, wall_s: float | None) -> dict:
  """One run's accuracies per stage and ratio, sizes, importance shares and times, from its workdir."""
  results = json.loads((workdir / "results.json").read_text())
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x.strip()]
  last = lines[-1] if lines else {}
  ratios = {}
  for ratio, entry in results["ratios"].items():
    pruned, tuned = entry.get("pruned", {}), entry.get("finetuned", {})
    report = pruned.get("report") or {}
    ratios[ratio] = {
        "pruned": {**_pick(pruned, (*ACCURACY_KEYS, "prune_seconds")),
                   **_pick(report, ("params_before", "params_after", "macs_before", "macs_after",
                                    "flops_before", "flops_after"))},  # flops_*: runs before the MACs rename.
        "finetuned": _pick(tuned, (*ACCURACY_KEYS, "finetune_seconds")),
    }
  return {"workdir": str(workdir), "wall_s": wall_s,
          "trained": _pick(results["trained"], (*ACCURACY_KEYS, "train_seconds", "epoch", "source")),
          "importance_fraction_below_0.05": last.get("importance_fraction_below_0.05"),
          "importance_fraction_above_0.5": last.get("importance_fraction_above_0.5"), "ratios": ratios}


def write_results(out: pathlib.Path, header: dict, workdirs: dict[str, pathlib.Path], walls: dict[str, float],
                  comparison: str) -> dict:
  """results.json (`header`, each run's summary, the throughput report) and results.md in `out`, and each
  run's small files under out/runs/<method>/."""
  methods = {m: method_summary(w, walls.get(m)) for m, w in workdirs.items()}
  for method, workdir in workdirs.items():
    (out / "runs" / method).mkdir(parents=True, exist_ok=True)
    for name in ("results.md", "metrics.jsonl", "config.json"):
      if (workdir / name).exists():
        shutil.copyfile(workdir / name, out / "runs" / method / name)
    figure = workdir / "plots" / "importances_per_epoch.png"
    if figure.exists():
      shutil.copyfile(figure, out / f"importances_per_epoch_{method}.png")
  bench = out / "gpu_throughput.json"
  report = {**header, "methods": methods, "throughput": json.loads(bench.read_text()) if bench.exists() else None}
  report["files"] = sorted({p.name for p in out.iterdir() if p.is_file()} | {"results.json", "results.md"})
  (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
  (out / "results.md").write_text(results_markdown(report, comparison, out))
  return report


def method_times_row(method: str, summary: dict) -> str:
  """'| rni | train s | prune s | fine-tune s | process s |': the phases' recorded times (epochs' and pruning
  wall times, over every attempt) and the wall time of this call's process (empty if it ran earlier)."""
  stages = summary["ratios"].values()
  prune = sum(r["pruned"].get("prune_seconds", 0.0) for r in stages)
  tune = sum(r["finetuned"].get("finetune_seconds", 0.0) for r in stages)
  wall = f"{summary['wall_s']:.0f}" if summary["wall_s"] else ""
  return f"| {method} | {summary['trained'].get('train_seconds', 0.0):.0f} | {prune:.0f} | {tune:.0f} | {wall} |"


def results_markdown(report: dict, comparison: str, out: pathlib.Path) -> str:
  """results.md: the settings and schedule, each run's times, the comparison, each run's results.md and the
  throughput report."""
  plan, d = report["schedule"], (report["throughput"] or {}).get("device", {})
  lines = [f"# {report['model']} on CIFAR-10: rni vs l1 vs ucs ({report['mode']} mode)", "",
           f"Device: {d.get('kind', 'see gpu_throughput.md')}. Width {report['width_multiplier']:g}, batch "
           f"{report['batch_size']}, {plan['epochs']} epochs, one-shot pruning at "
           f"{', '.join(f'{r:.0%}' for r in report['ratios'])}, {plan['finetune_epochs']} fine-tune epochs per ratio "
           f"(schedule: {plan['source']}" + (f", {plan['images_per_s']:,.0f} images/s, predicted "
                                             f"{plan['predicted_s'] / 60:.1f} min" if "predicted_s" in plan else "")
           + ").", "", f"| method | train s | prune s | fine-tune s | process s ({report['runs_at_once']} at once) |",
           "|---|---:|---:|---:|---:|"]
  lines += [method_times_row(m, s) for m, s in report["methods"].items()]
  lines += ["", "## Comparison (`python -m receding_jax.compare`)", "", comparison.strip(), "",
            "![importances](importances.png)", "![accuracy vs ratio](accuracy_vs_ratio.png)", ""]
  for method in report["methods"]:
    lines += [f"## {method}", "", (out / "runs" / method / "results.md").read_text().strip(), ""]
  if (out / "gpu_throughput.md").exists():
    lines += ["## Training throughput (`benchmarks/gpu_throughput.py`)", "", (out / "gpu_throughput.md").read_text()]
  return "\n".join(lines) + "\n"
