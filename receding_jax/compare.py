"""Compare several experiment workdirs (e.g. rni vs l1 vs ucs) in one table and one set of figures.

    python -m receding_jax.compare --workdirs=runs/rni,runs/l1,runs/ucs --labels=rni,l1,ucs --output_dir=cmp

Workdirs given the same label are seeds of one config (their config.json may differ only in ``seed``)
and aggregate to mean ± standard deviation:

    python -m receding_jax.compare --workdirs=rni_s0,rni_s1,rni_s2,l1_s0,l1_s1,l1_s2 \\
        --labels=rni,rni,rni,l1,l1,l1 --output_dir=cmp

Writes OUTPUT_DIR/comparison.md (per method and ratio: validation and test accuracy trained, right after
pruning, after fine-tuning, and the paper's convention, the best test accuracy over epochs, where the runs
evaluated test every epoch; importance shares below 0.05 and above 0.5; the training cost, wall time and
MAC-epochs, so a shrinking run (config.shrink) sits beside a train-then-prune one) and PNG figures: overlaid
importance distributions and test accuracy vs pruning ratio.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from receding_jax.errors import InputError
from receding_jax.training import plots
from receding_jax.training import workdir as wd
from receding_jax.training.config import differing_keys


def _cell(values: Sequence[float | None]) -> str:
  """'93.10' for one seed, '93.10 ± 0.42' (mean ± sample std, in %) for several; '' if any is missing."""
  if not values or any(v is None for v in values):
    return ""
  mean, std = plots.mean_std([100 * v for v in values])
  return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"


def check_seed_groups(groups: Mapping[str, Sequence[str]]) -> None:
  """ValueError unless the workdirs of each label hold runs of one config that differ only in `seed`."""
  for label, workdirs in groups.items():
    configs = {}
    for w in workdirs:
      config = wd.read_config(w)
      if config is None:
        raise FileNotFoundError(f"{wd.config_path(w)} does not exist: {w} holds no run")
      configs[w] = {k: v for k, v in config.items() if k != "seed"}
    first = workdirs[0]
    for w in workdirs[1:]:
      if configs[w] != configs[first]:
        raise InputError(f"label {label!r} groups {first} and {w}, whose configs differ in "
                         f"{differing_keys(configs[first], configs[w])} (not only "
                         "the seed); give them different labels")


PAPER_ROW = "test, best epoch (paper)"


def _paper_values(workdir: str, ratio: str) -> dict[str, float | None]:
  """The paper's convention for one run: the best test accuracy over the epochs of training and of the
  fine-tuning at `ratio` (None where test was not evaluated every epoch); one-shot pruned has one value."""
  tuned = plots.last_per_epoch(wd.read_metrics(wd.finetune_dir(workdir, float(ratio))))
  return {"trained": plots.max_test_accuracy(plots.read_epochs(workdir)), "finetuned": plots.max_test_accuracy(tuned)}


def comparison_table(groups: Mapping[str, Sequence[str]]) -> str:
  """Markdown: per label and ratio, accuracies as mean ± std over the label's seeds, on validation (where
  choices are made) and test; plus the paper's convention (best test accuracy over epochs) where the runs
  evaluated test every epoch, labelled as such."""
  lines = ["| method | seeds | pruned | split | acc. trained | acc. pruned | acc. fine-tuned | importances < 0.05 |"
           " > 0.5 |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
  missing_paper = []
  for label, workdirs in groups.items():
    lasts = [plots.read_epochs(w)[-1] for w in workdirs]
    runs = [wd.read_results(w, required=True) for w in workdirs]
    below = _cell([x["importance_fraction_below_0.05"] for x in lasts])
    above = _cell([x["importance_fraction_above_0.5"] for x in lasts])
    splits = [s for s in ("validation", "test") if f"{s}_accuracy" in runs[0]["trained"]]
    for ratio in sorted(runs[0]["ratios"], key=float):
      rows = []
      for split in splits:
        key = f"{split}_accuracy"
        cells = [_cell([r["trained"].get(key) for r in runs])]
        for stage in ("pruned", "finetuned"):
          cells.append(_cell([r["ratios"].get(ratio, {}).get(stage, {}).get(key) for r in runs]))
        rows.append((split, cells))
      paper = [_paper_values(w, ratio) for w in workdirs]
      pruned = [r["ratios"].get(ratio, {}).get("pruned", {}).get("test_accuracy") for r in runs]
      cells = [_cell([p["trained"] for p in paper]), _cell(pruned), _cell([p["finetuned"] for p in paper])]
      if cells[0]:
        rows.append((PAPER_ROW, cells))
      elif label not in missing_paper:
        missing_paper.append(label)
      for split, cells in rows:
        lines.append(f"| {label} | {len(workdirs)} | {float(ratio):.0%} | {split} | " + " | ".join(cells)
                     + f" | {below} | {above} |")
  lines += ["", "Accuracy in %, mean ± sample std over seeds. validation: where every choice is made; test: the "
            "network chosen on validation (or the last epoch). "
            f"'{PAPER_ROW}': the highest test accuracy over the epochs, as the paper and its code report "
            "(docs/method.md section 7); it chooses on test, so it is only for putting these numbers beside "
            "the paper's."]
  if missing_paper:
    lines.append(f"No '{PAPER_ROW}' rows for {missing_paper}: test was not evaluated every epoch "
                 "(run with --config.eval_test_every_epoch=True).")
  return "\n".join(lines)


def cost_table(groups: Mapping[str, Sequence[str]]) -> str:
  """Markdown: per label, the training cost (mean over seeds): wall time, MAC-epochs (`plots.mac_epochs`),
  channels removed while training, and both costs relative to the first label's (a shrinking run beside a
  train-then-prune run)."""
  rows, base = [], None
  for label, workdirs in groups.items():
    epochs = [plots.read_epochs(w) for w in workdirs]
    seconds = plots.mean_std([plots.total_seconds(e) for e in epochs])[0]
    macs = [plots.mac_epochs(e) for e in epochs]
    mac_epochs = None if any(m is None for m in macs) else plots.mean_std(macs)[0]
    shrunk = plots.mean_std([sum(int(x.get("shrink_removed_channels", 0)) for x in e) for e in epochs])[0]
    base = base or (seconds, mac_epochs)
    relative = lambda v, b: f"{b / v:.2f}x" if v and b else ""
    rows.append(f"| {label} | {len(workdirs)} | {seconds:.1f} | {relative(seconds, base[0])} | "
                f"{'' if mac_epochs is None else f'{mac_epochs / 1e6:.2f}'} | {relative(mac_epochs, base[1])} | "
                f"{shrunk:.0f} |")
  head = ["| method | seeds | train s | cheaper than first | M MAC-epochs | cheaper than first | channels shrunk |",
          "|---|---:|---:|---:|---:|---:|---:|"]
  return "\n".join([*head, *rows, "", "Training cost, mean over seeds: wall time of the training epochs "
                     "(compiles included) and MAC-epochs (MACs of one input of the network each epoch trained, "
                     "summed); 'cheaper than first': the first method's cost over this one's."])


def compare(groups: Mapping[str, Sequence[str]], output_dir: str) -> str:
  """Writes comparison.md and the figures into `output_dir`; returns the tables."""
  check_seed_groups(groups)
  table = comparison_table(groups) + "\n\n" + cost_table(groups)  # Reads everything before any write.
  out = wd.path(output_dir)
  wd.write_text(out / "comparison.md", table + "\n")
  plots.importance_distribution(groups, out / "importances.png")
  plots.accuracy_vs_ratio(groups, out / "accuracy_vs_ratio.png")
  return table


def group_workdirs(workdirs: Sequence[str], labels: Sequence[str]) -> dict[str, list[str]]:
  """{label: [workdir, ...]} in order of first appearance; labels default to the workdir names."""
  if not labels:
    labels = [wd.path(w).name for w in workdirs]
  if len(labels) != len(workdirs):
    raise InputError(f"need one label per workdir, got {len(labels)} labels {list(labels)} for {len(workdirs)} "
                     "workdirs")
  groups: dict[str, list[str]] = {}
  for label, workdir in zip(labels, workdirs, strict=True):
    groups.setdefault(label, []).append(workdir)
  return groups


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdirs", required=True, help="comma-separated experiment workdirs")
  parser.add_argument("--labels", default="",
                      help="comma-separated labels (default: workdir names); a repeated label = seeds of one config")
  parser.add_argument("--output_dir", required=True)
  args = parser.parse_args(argv)
  try:
    groups = group_workdirs([d for d in args.workdirs.split(",") if d], [x for x in args.labels.split(",") if x])
  except ValueError as e:
    parser.error(str(e))
  print(compare(groups, args.output_dir))
  print(f"wrote {args.output_dir}")


if __name__ == "__main__":
  main()
