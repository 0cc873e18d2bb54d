"""Prune a saved checkpoint from the command line into a new, self-contained checkpoint.

    python -m receding_jax.prune_checkpoint --checkpoint_dir=RUN/checkpoints --output_dir=RUN/pruned50 \\
        --ratio=0.5 [--scope=global] [--min_channels=3] [--step=N]

Instead of --ratio: --flop_reduction=0.7 or --threshold=0.01. The output holds step 0 with the
narrow model's params and batch_stats and a model spec with its widths, so it restores and evaluates
with `checkpointing.restore` + `models.model_from_spec` without the original. Prints the
parameter/FLOP table and writes it to OUTPUT_DIR/pruning_report.json.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import numpy as np

from receding_jax import pruning
from receding_jax.models import model_from_spec
from receding_jax.training import checkpointing, workdir_files

REPORT_NAME = "pruning_report.json"


def prune_checkpoint(
    checkpoint_dir: str,
    output_dir: str,
    *,
    step: int | None = None,
    ratio: float | None = None,
    scope: str = "global",
    min_channels: int = 3,
    flop_reduction: float | None = None,
    threshold: float | None = None,
    channel_multiple: int = 1,
) -> dict[str, Any]:
  """Prunes the checkpoint at `checkpoint_dir` (step `step`, default newest) into `output_dir`.

  Everything is checked (output free, checkpoint readable, criterion valid) before anything is written.
  Returns the report: params and FLOPs before/after, widths before/after, the criterion. Multi-host: every
  process calls it (orbax saves together); only process 0 writes the report, atomically and last, so its
  presence means the pruned checkpoint is complete.
  """
  if os.path.exists(output_dir) and os.listdir(output_dir):
    raise FileExistsError(f"output_dir {output_dir} exists and is not empty; refusing to overwrite it")
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"checkpoint_dir {checkpoint_dir} does not exist")
  source = checkpointing.make_manager(checkpoint_dir, create=False)
  state, spec = checkpointing.restore(source, step)
  model = model_from_spec(spec)
  variables = {k: jax.device_get(state[k]) for k in ("params", "batch_stats") if k in state}
  narrow_model, narrow_variables = pruning.prune_params(
      model, variables, ratio, scope=scope, min_channels=min_channels,
      flop_reduction=flop_reduction, threshold=threshold, channel_multiple=channel_multiple,
  )
  arch = pruning.describe(narrow_model)
  narrow_spec = {**spec, "overrides": {**spec.get("overrides", {}), arch.width_attribute: list(arch.widths)}}
  report = {
      "source": os.path.abspath(checkpoint_dir),
      "source_step": int(source.latest_step() if step is None else step),
      "criterion": {"ratio": ratio, "flop_reduction": flop_reduction, "threshold": threshold,
                    "scope": scope, "min_channels": min_channels, "channel_multiple": channel_multiple},
      "params_before": pruning.count_params(variables),
      "params_after": pruning.count_params(narrow_variables),
      "flops_before": pruning.count_flops(model),
      "flops_after": pruning.count_flops(narrow_model),
      "widths_before": list(pruning.describe(model).widths),
      "widths_after": list(arch.widths),
  }
  workdir_files.sync(f"checked {output_dir}")  # No process may see another's new output_dir as taken.
  target = checkpointing.make_manager(output_dir)
  checkpointing.save(target, 0, {**narrow_variables, "step": np.int64(0)}, narrow_spec)
  target.close()
  workdir_files.write_json(os.path.join(output_dir, REPORT_NAME), report)
  return report


def format_report(report: dict[str, Any]) -> str:
  """A markdown table of parameters and FLOPs (MACs) before and after pruning."""
  rows = [("parameters", report["params_before"], report["params_after"]),
          ("FLOPs (MACs, one input)", report["flops_before"], report["flops_after"])]
  lines = ["| | before | after | after / before |", "|---|---:|---:|---:|"]
  lines += [f"| {name} | {b:,} | {a:,} | {a / b:.3f} |" for name, b, a in rows]
  lines.append(f"| prunable channels | {sum(report['widths_before']):,} | {sum(report['widths_after']):,} | "
               f"{sum(report['widths_after']) / sum(report['widths_before']):.3f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--step", type=int, default=None)
  criterion = parser.add_mutually_exclusive_group(required=True)
  criterion.add_argument("--ratio", type=float)
  criterion.add_argument("--flop_reduction", type=float)
  criterion.add_argument("--threshold", type=float)
  parser.add_argument("--scope", choices=pruning.SCOPES, default="global")
  parser.add_argument("--min_channels", type=int, default=3)
  parser.add_argument("--channel_multiple", type=int, default=1, help="round kept widths up to a multiple")
  args = parser.parse_args(argv)
  try:
    report = prune_checkpoint(
        args.checkpoint_dir, args.output_dir, step=args.step, ratio=args.ratio, scope=args.scope,
        min_channels=args.min_channels, flop_reduction=args.flop_reduction, threshold=args.threshold,
        channel_multiple=args.channel_multiple,
    )
  except (FileExistsError, FileNotFoundError, ValueError) as e:  # Bad input or a damaged checkpoint: one line.
    parser.exit(2, f"error: {e}\n")
  print(format_report(report))
  print(f"widths: {report['widths_before']} -> {report['widths_after']}")
  print(f"wrote {args.output_dir}")


if __name__ == "__main__":
  main()
