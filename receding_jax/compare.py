"""Compare several experiment workdirs (e.g. rni vs l1 vs ucs) in one table and one set of figures.

    python -m receding_jax.compare --workdirs=runs/rni,runs/l1,runs/ucs --labels=rni,l1,ucs --output_dir=cmp

Writes OUTPUT_DIR/comparison.md (per method and ratio: accuracy trained, right after pruning, after
fine-tuning; importance shares below 0.05 and above 0.5) and PNG figures: overlaid importance
distributions and accuracy vs pruning ratio.
"""

from __future__ import annotations

import argparse
import os

from receding_jax import plots


def comparison_table(workdirs: dict[str, str]) -> str:
  lines = ["| method | pruned | acc. trained | acc. pruned | acc. fine-tuned | importances < 0.05 | > 0.5 |",
           "|---|---:|---:|---:|---:|---:|---:|"]

  def pct(x):
    return f"{100 * x:.2f}" if isinstance(x, (int, float)) else ""

  for label, workdir in workdirs.items():
    last = plots.read_epochs(workdir)[-1]
    results = plots.read_results(workdir)
    for ratio in sorted(results["ratios"], key=float):
      entry = results["ratios"][ratio]
      pruned, tuned = entry.get("pruned", {}), entry.get("finetuned", {})
      lines.append(
          f"| {label} | {float(ratio):.0%} | {pct(results['trained']['eval_accuracy'])} | "
          f"{pct(pruned.get('eval_accuracy'))} | {pct(tuned.get('eval_accuracy'))} | "
          f"{pct(last['importance_fraction_below_0.05'])} | {pct(last['importance_fraction_above_0.5'])} |"
      )
  return "\n".join(lines)


def compare(workdirs: dict[str, str], output_dir: str) -> str:
  """Writes comparison.md and the figures into `output_dir`; returns the table."""
  table = comparison_table(workdirs)  # Reads everything first: a missing run fails before any write.
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "comparison.md"), "w") as f:
    f.write(table + "\n")
  plots.importance_distribution(workdirs, os.path.join(output_dir, "importances.png"))
  plots.accuracy_vs_ratio(workdirs, os.path.join(output_dir, "accuracy_vs_ratio.png"))
  return table


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdirs", required=True, help="comma-separated experiment workdirs")
  parser.add_argument("--labels", default="", help="comma-separated labels (default: the workdir names)")
  parser.add_argument("--output_dir", required=True)
  args = parser.parse_args(argv)
  dirs = [d for d in args.workdirs.split(",") if d]
  labels = [x for x in args.labels.split(",") if x] or [os.path.basename(os.path.normpath(d)) for d in dirs]
  if len(labels) != len(dirs) or len(set(labels)) != len(labels):
    parser.error(f"need one distinct label per workdir, got labels {labels} for {len(dirs)} workdirs")
  print(compare(dict(zip(labels, dirs, strict=True)), args.output_dir))
  print(f"wrote {args.output_dir}")


if __name__ == "__main__":
  main()
