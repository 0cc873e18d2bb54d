"""Shrinking while training against train-then-prune, on the quickstart (docs/shrinking.md).

For each seed it runs two workdirs under --out: `train_then_prune` (configs/quickstart.py) and `shrinking`
(configs/quickstart_shrink.py, shrink.max_ratio = 0.5, the smallest prune ratio), both pruned one-shot at
50/70/90% and fine-tuned. It measures, per seed and method: the training's wall time (the sum of the
epochs' `epoch_seconds`, compiling included) and its compile seconds, MAC-epochs (the sum over the training
epochs of the MACs of one input of the network trained that epoch), params and MACs at the end of training,
the shrinks and channels they removed, the trained accuracy and, per ratio, the accuracy right after pruning
and after fine-tuning; then medians over seeds and the ratios shrinking / train-then-prune. It writes
benchmarks/shrink_compare.json and prints a markdown table. Both runs have the persistent compilation
cache off, so that every run compiles what it needs (a warm cache would favour whichever ran second).

`--preset vgg` makes the same comparison on the CPU demonstration (docs/cpu_demo.md): VGG-16 at 1/4 width on
the real CIFAR-10 with rni (configs/cifar10_folder.py:rni, 12 epochs, pruned at 50/70/90%), the shrinking run
adding shrink.enabled=True, threshold 0.01, start_epoch 2, every_epochs 2, patience 1, max_ratio 0.5; seed 0,
written to benchmarks/shrink_compare_vgg.json. `--parallel` starts the two runs of a seed at the same time
(so that other load on the machine weighs on both alike) and waits for both.

Run from the repository root (a workdir whose results.json exists is not run again, so it resumes):
  python benchmarks/shrink_compare.py --seeds 0 1 2 [--out /tmp/shrink_compare]
      [--config_extra shrink.patience=1 ...]   # passed to the shrinking run only
  python benchmarks/shrink_compare.py --preset vgg --parallel --out /tmp/shrink_vgg
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
RATIOS = (0.5, 0.7, 0.9)
METHODS = ("train_then_prune", "shrinking")
#: Per preset and method, the config overrides (`--config...` flags) besides workdir, seed, ratios and cache.
PRESETS: dict[str, dict[str, list[str]]] = {
    "quickstart": {
        "train_then_prune": ["--config=configs/quickstart.py"],
        "shrinking": ["--config=configs/quickstart_shrink.py", f"--config.shrink.max_ratio={min(RATIOS)}"],
    },
    "vgg": {
        "train_then_prune": ["--config=configs/cifar10_folder.py:rni"],
        "shrinking": ["--config=configs/cifar10_folder.py:rni", "--config.shrink.enabled=True",
                      "--config.shrink.threshold=0.01", "--config.shrink.start_epoch=2",
                      "--config.shrink.every_epochs=2", "--config.shrink.patience=1",
                      f"--config.shrink.max_ratio={min(RATIOS)}"],
    },
}
JSON_NAMES = {"quickstart": "shrink_compare.json", "vgg": "shrink_compare_vgg.json"}
SHRINK_LINE = "shrink after epoch"


def command(method: str, seed: int, workdir: pathlib.Path, extra: Sequence[str],
            preset: str = "quickstart") -> list[str]:
  """The `python -m receding_jax.main` command line of one method and seed."""
  base, *overrides = PRESETS[preset][method]
  args = [sys.executable, "-m", "receding_jax.main", base, f"--workdir={workdir}",
          f"--config.seed={seed}", f"--config.prune.ratios=({','.join(str(r) for r in RATIOS)})",
          "--config.compilation_cache_dir=", *overrides]
  if method == "shrinking":
    args += [f"--config.{kv}" for kv in extra]
  return args


def start_workdir(method: str, seed: int, workdir: pathlib.Path, extra: Sequence[str],
                  preset: str) -> subprocess.Popen | None:
  """Starts one workdir's run unless its results.json exists; the console goes to <workdir>.log (appended)."""
  if (workdir / "results.json").exists():
    print(f"{workdir}: done, skipped", flush=True)
    return None
  args = command(method, seed, workdir, extra, preset)
  print(" ".join(args), flush=True)
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{workdir}.log", "a") as log:
    return subprocess.Popen(args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def wait_all(runs: dict[pathlib.Path, subprocess.Popen | None]) -> None:
  """Waits for every started run; exits naming each that failed (after all have ended)."""
  failed = [f"{workdir}: exit status {code}; see {workdir}.log" for workdir, proc in runs.items()
            if proc is not None and (code := proc.wait()) != 0]
  if failed:
    raise SystemExit("\n".join(failed))


def run_seed(seed: int, out: pathlib.Path, extra: Sequence[str], preset: str, parallel: bool) -> None:
  """Runs both methods of one seed: one after the other, or (parallel) both at once."""
  runs: dict[pathlib.Path, subprocess.Popen | None] = {}
  for method in METHODS:
    workdir = out / f"seed{seed}" / method
    runs[workdir] = start_workdir(method, seed, workdir, extra if method == "shrinking" else [], preset)
    if not parallel:
      wait_all({workdir: runs[workdir]})
  wait_all(runs)


def epochs(path: pathlib.Path) -> list[dict[str, Any]]:
  """metrics.jsonl's epoch records, the last line of each epoch, in epoch order."""
  last: dict[int, dict[str, Any]] = {}
  for line in path.read_text().splitlines():
    record = json.loads(line) if line.strip() else {}
    if "epoch" in record:
      last[int(record["epoch"])] = record
  return [last[e] for e in sorted(last)]


def train_metrics(workdir: pathlib.Path) -> dict[str, Any]:
  """What the training cost and left: wall and compile seconds, MAC-epochs, final params and MACs, shrinks."""
  records = epochs(workdir / "metrics.jsonl")
  shrinks = [r for r in records if "shrink_removed_channels" in r]
  last = records[-1]
  phase = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
           if line.strip() and json.loads(line).get("phase") == "train"]
  return {
      "epochs": len(records),
      "train_wall_seconds": sum(r["epoch_seconds"] for r in records),
      "compile_seconds": sum(r.get("compile_seconds", 0.0) for r in records),
      "train_phase_seconds": phase[-1]["seconds"] if phase else None,
      "mac_epochs_millions": sum(r["macs"] for r in records) / 1e6,
      "params_end": last.get("shrink_params_after", last["params"]),
      "macs_end": last.get("shrink_macs_after", last["macs"]),
      "params_start": records[0]["params"],
      "macs_start": records[0]["macs"],
      "shrinks": len(shrinks),
      "shrink_epochs": [r["epoch"] for r in shrinks],
      "channels_removed": sum(r["shrink_removed_channels"] for r in shrinks),
  }


def accuracy(record: dict[str, Any]) -> dict[str, float | None]:
  """Test and validation accuracy of one results.json record."""
  return {"test_accuracy": record.get("test_accuracy"), "validation_accuracy": record.get("validation_accuracy")}


def method_metrics(workdir: pathlib.Path) -> dict[str, Any]:
  """One workdir's measurements: the training's, the trained accuracy and each ratio's."""
  results = json.loads((workdir / "results.json").read_text())
  log = pathlib.Path(f"{workdir}.log")
  lines = [line for line in log.read_text().splitlines() if line.startswith(SHRINK_LINE)] if log.exists() else []
  ratios = {}
  for ratio, entry in results["ratios"].items():
    ratios[ratio] = {"pruned": accuracy(entry["pruned"]), "finetuned": accuracy(entry["finetuned"]),
                     "macs_pruned": entry["pruned"]["report"]["macs_after"]}
  return {**train_metrics(workdir), "trained": {**accuracy(results["trained"]), "epoch": results["trained"]["epoch"]},
          "ratios": ratios, "shrink_lines": lines, "config_shrink": results["config"]["shrink"]}


def flat(metrics: dict[str, Any]) -> dict[str, float]:
  """The numbers medians are taken of, by name ('trained_test_accuracy', 'finetuned_0.5_test_accuracy')."""
  out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
  out.update({f"trained_{k}": v for k, v in metrics["trained"].items() if v is not None})
  for ratio, entry in metrics["ratios"].items():
    for stage in ("pruned", "finetuned"):
      out.update({f"{stage}_{ratio}_{k}": v for k, v in entry[stage].items() if v is not None})
  return out


def medians(per_seed: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
  """Per method, the median over seeds of every number `flat` names."""
  out = {}
  for method in METHODS:
    rows = [flat(per_seed[s][method]) for s in per_seed if method in per_seed[s]]
    keys = set.intersection(*(set(r) for r in rows)) if rows else set()
    out[method] = {k: statistics.median(r[k] for r in rows) for k in sorted(keys)}
  return out


def device() -> dict[str, Any]:
  """The CPU model (/proc/cpuinfo) and the cores this process may use."""
  model = "unknown"
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "logical_cpus": os.cpu_count()}


def ratio(a: float | None, b: float | None) -> float | None:
  return a / b if a is not None and b else None


def percent(x: float | None) -> str:
  return "-" if x is None else f"{100 * x:.1f}"


def summary_table(med: dict[str, dict[str, float]]) -> str:
  """Markdown: per method, medians over seeds."""
  base = med["train_then_prune"]
  head = ("| method | train wall s | compile s | M MAC-epochs | wall / TTP | MAC-epochs / TTP | params end | "
          "trained test % | " + " | ".join(f"FT {int(100 * r)}% test %" for r in RATIOS) + " |")
  lines = [head, "|" + "---|" * (8 + len(RATIOS))]
  for method, m in med.items():
    if not m:
      continue
    cells = [method, f"{m['train_wall_seconds']:.1f}", f"{m['compile_seconds']:.1f}",
             f"{m['mac_epochs_millions']:.2f}", f"{ratio(m['train_wall_seconds'], base['train_wall_seconds']):.2f}",
             f"{ratio(m['mac_epochs_millions'], base['mac_epochs_millions']):.2f}", f"{m['params_end']:,.0f}",
             percent(m.get("trained_test_accuracy"))]
    cells += [percent(m.get(f"finetuned_{r}_test_accuracy")) for r in RATIOS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def seed_table(per_seed: dict[str, dict[str, Any]]) -> str:
  """Markdown: one row per seed and method."""
  head = ("| seed | method | train wall s | compile s | M MAC-epochs | shrinks (epochs) | channels removed | "
          "MACs end | trained test (val) % | " + " | ".join(
              f"{int(100 * r)}%: pruned → FT test (val) %" for r in RATIOS) + " |")
  lines = [head, "|" + "---|" * (9 + len(RATIOS))]
  for seed, methods in per_seed.items():
    for method, m in methods.items():
      t = m["trained"]
      cells = [seed, method, f"{m['train_wall_seconds']:.1f}", f"{m['compile_seconds']:.1f}",
               f"{m['mac_epochs_millions']:.2f}", f"{m['shrinks']} ({', '.join(map(str, m['shrink_epochs']))})",
               str(m["channels_removed"]), f"{m['macs_end']:,}",
               f"{percent(t['test_accuracy'])} ({percent(t['validation_accuracy'])})"]
      for r in RATIOS:
        e = m["ratios"].get(str(r))
        cells.append("-" if e is None else (
            f"{percent(e['pruned']['test_accuracy'])} → {percent(e['finetuned']['test_accuracy'])} "
            f"({percent(e['pruned']['validation_accuracy'])} → {percent(e['finetuned']['validation_accuracy'])})"))
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="quickstart",
                      help="quickstart (configs/quickstart*.py) or vgg (configs/cifar10_folder.py:rni, seed 0)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/shrink_compare"))
  parser.add_argument("--config_extra", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for the shrinking run only (repeatable), e.g. shrink.patience=1")
  parser.add_argument("--parallel", action="store_true", help="start the two runs of a seed at the same time")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="default benchmarks/shrink_compare.json (quickstart) or shrink_compare_vgg.json (vgg)")
  args = parser.parse_args(argv)
  if args.json is None:
    args.json = ROOT / "benchmarks" / JSON_NAMES[args.preset]
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  per_seed: dict[str, dict[str, Any]] = {}
  for seed in args.seeds:
    run_seed(seed, args.out, args.config_extra, args.preset, args.parallel)
    per_seed[str(seed)] = {m: method_metrics(args.out / f"seed{seed}" / m) for m in METHODS}
  med = medians(per_seed)
  base, shrunk = med["train_then_prune"], med["shrinking"]
  result = {
      "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]), "device": device(),
      "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "preset": args.preset, "parallel": args.parallel,
      "example_commands": {m: command(m, args.seeds[0], args.out / f"seed{args.seeds[0]}" / m, args.config_extra,
                                      args.preset)[1:] for m in METHODS},
      "config_extra": args.config_extra, "seeds": args.seeds, "per_seed": per_seed, "medians": med,
      "shrink_over_unshrunk": {k: ratio(shrunk.get(k), base.get(k)) for k in (
          "train_wall_seconds", "compile_seconds", "mac_epochs_millions", "train_phase_seconds")},
  }
  args.json.write_text(json.dumps(result, indent=2) + "\n")
  print(f"\n{summary_table(med)}\n\n{seed_table(per_seed)}\n\nwritten: {args.json}")


if __name__ == "__main__":
  main()
