"""Evaluate any checkpoint the project writes (trained, pruned or fine-tuned) on one split.

    python -m receding_jax.evaluate --checkpoint_dir=RUN/checkpoints [--split=test] [--step=best]
        [--config=configs/NAME.py] [--output_json=FILE]

--split: train, validation or test. --step: best (the highest validation accuracy the run logged among the
kept steps, as the pipeline prunes; the newest where it logged none), latest, or a step number. The data
config is the nearest config.json above the checkpoint (RUN/config.json for RUN/checkpoints and
RUN/pruned_R/pruned; RUN/pruned_R/finetune/config.json for a fine-tuned one) unless --config names a file.
Prints which step and why, then a table: split, examples, accuracy, loss, parameters and MACs (one input).
Writes nothing unless --output_json is given. Only parses flags: the work is
`receding_jax.training.evaluation.evaluate`.
"""

from __future__ import annotations

import argparse
import json

from receding_jax.errors import InputError
from receding_jax.training import evaluation, splits


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--split", default="test", help=f"one of {', '.join(splits.ROLES)}")
  parser.add_argument("--step", default="best", help="best, latest or a step number")
  parser.add_argument("--config", default=None, help="a config file giving the data (default: the run's config.json)")
  parser.add_argument("--output_json", default=None, help="also write the result to this JSON file")
  args = parser.parse_args(argv)
  try:
    result = evaluation.evaluate(args.checkpoint_dir, args.split, args.step, args.config)
  except (InputError, FileNotFoundError) as e:  # Bad input, a damaged checkpoint: one line.
    parser.exit(2, f"error: {e}\n")
  print(f"evaluating step {result['step']} of {args.checkpoint_dir}: {result['why']} (data: {result['config']})")
  print(evaluation.format_evaluation(result))
  if args.output_json:
    with open(args.output_json, "w") as f:
      json.dump(result, f, indent=2, sort_keys=True)
      f.write("\n")


if __name__ == "__main__":
  main()
