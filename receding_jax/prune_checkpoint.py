"""Prune a saved checkpoint from the command line into a new, self-contained checkpoint.

    python -m receding_jax.prune_checkpoint --checkpoint_dir=RUN/checkpoints --output_dir=RUN/pruned50 \\
        --ratio=0.5 [--scope=global] [--min_channels=3] [--step=best|latest|N]

--step: best (default; the highest validation accuracy the run logged among the kept steps, as the pipeline
prunes, the newest where it logged none), latest, or a step number; the console says which step and why.
Instead of --ratio: --mac_reduction=0.7 or --threshold=0.01. A model outside the zoo is named by its
factory: --model=my_package.nets:make_net (a function returning the Linen module; give
--input_shape=32,32,3 unless the module has an input_shape attribute). --prune_streams also prunes residual
streams. The output holds step 0 with the narrow model's params and batch_stats and a model spec with the
narrowed widths by module path, so it restores and evaluates with `checkpointing.restore` +
`training.model_specs.build_model` without the original. Prints the
parameter/MAC table and writes it to OUTPUT_DIR/pruning_report.json. Only parses flags: the work is
`receding_jax.training.pruned_checkpoint.prune_checkpoint`.
"""

from __future__ import annotations

import argparse

from receding_jax import compile_clock, pruning
from receding_jax.errors import InputError
from receding_jax.training import console, evaluation
from receding_jax.training.pruned_checkpoint import format_report, prune_checkpoint


def _shape(text: str | None) -> tuple[int, ...] | None:
  if text is None:
    return None
  try:
    shape = tuple(int(v) for v in text.split(","))
  except ValueError:
    shape = ()
  if not shape or min(shape) < 1:
    raise SystemExit(f"error: --input_shape must be positive ints separated by commas, got {text!r}")
  return shape


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--step", default="best", help="best (default), latest or a step number")
  criterion = parser.add_mutually_exclusive_group(required=True)
  criterion.add_argument("--ratio", type=float)
  criterion.add_argument("--mac_reduction", "--flop_reduction", dest="mac_reduction", type=float,
                         help="share of multiply-accumulates to remove (--flop_reduction: its old name)")
  criterion.add_argument("--threshold", type=float)
  parser.add_argument("--scope", choices=pruning.SCOPES, default="global")
  parser.add_argument("--min_channels", type=int, default=3)
  parser.add_argument("--channel_multiple", type=int, default=1, help="round kept widths up to a multiple")
  parser.add_argument("--prune_streams", action="store_true", help="also prune residual streams")
  parser.add_argument("--model", default=None, help="module:function building the model (outside the zoo)")
  parser.add_argument("--input_shape", default=None, help="one input's shape without batch, e.g. 32,32,3")
  args = parser.parse_args(argv)
  try:
    step, why = evaluation.choose_step(args.checkpoint_dir, args.step)
    print(f"pruning step {step} of {args.checkpoint_dir}: {why}", flush=True)
    with compile_clock.Clock() as clock:
      report = prune_checkpoint(
          args.checkpoint_dir, args.output_dir, step=step, ratio=args.ratio, scope=args.scope,
          min_channels=args.min_channels, mac_reduction=args.mac_reduction, threshold=args.threshold,
          channel_multiple=args.channel_multiple, prune_streams=args.prune_streams, model_factory=args.model,
          input_shape=_shape(args.input_shape),
      )
  except (InputError, FileExistsError, FileNotFoundError) as e:  # Bad input, a damaged checkpoint: one line.
    parser.exit(2, f"error: {e}\n")
  print(format_report(report))
  print(f"widths: {report['widths_before']} -> {report['widths_after']}")
  print(f"wrote {args.output_dir}")
  print(console.phase_line({"phase": "prune", **clock.as_dict(), "parts": report["seconds"]}))


if __name__ == "__main__":
  main()
