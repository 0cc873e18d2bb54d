"""Export a checkpoint for deployment: norms folded, StableHLO and/or LiteRT (TFLite), each verified.

    python -m receding_jax.export --checkpoint_dir=RUN/pruned_0.5/pruned --output_dir=deploy/p50 \\
        [--format=stablehlo,tflite] [--quantize=float16,int8] [--tflite_batch=1] [--step=N]

Writes OUTPUT_DIR/model.stablehlo (run it with ``jax.export.deserialize(bytes).call(x)``, any batch),
model.tflite (LiteRT, built-in ops only, batch --tflite_batch), model_<q>.tflite for each --quantize, and
export_report.json (sizes, operators, errors against the JAX model, folded norms). The TFLite format needs
the [export] extra: pip install -e ".[export]". Only parses flags: the work is
`receding_jax.training.exported_checkpoint.export_checkpoint`.
"""

from __future__ import annotations

import argparse

from receding_jax import compile_clock, deploy
from receding_jax.errors import InputError
from receding_jax.training import console
from receding_jax.training.exported_checkpoint import export_checkpoint


def _names(text: str) -> tuple[str, ...]:
  return tuple(name.strip() for name in text.split(",") if name.strip())


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--format", default=",".join(deploy.FORMATS), help="stablehlo, tflite or both")
  parser.add_argument("--quantize", default="", help="extra TFLite variants: float16, int8 (dynamic range)")
  parser.add_argument("--tflite_batch", type=int, default=1, help="the TFLite model's fixed batch size")
  parser.add_argument("--step", type=int, default=None)
  args = parser.parse_args(argv)
  try:
    with compile_clock.Clock() as clock:
      report = export_checkpoint(args.checkpoint_dir, args.output_dir, _names(args.format), step=args.step,
                                 quantize=_names(args.quantize), tflite_batch=args.tflite_batch)
  except (InputError, FileExistsError, FileNotFoundError, deploy.ExportVerificationError,
          deploy.MissingExportTools) as e:  # Bad input, missing tools, failed verification: one line.
    parser.exit(2, f"error: {e}\n")
  for name, entry in report["files"].items():
    print(f"{name}: {entry['bytes']:,} bytes, max |error| {entry['max_abs_error']:.3g} "
          f"({entry['relative_error']:.2g} of the largest output), same predictions {entry['same_predictions']:.1%}")
  print(f"folded {len(report['folding']['folded'])} norms; wrote {args.output_dir}")
  print(console.phase_line({"phase": "export", **clock.as_dict()}))


if __name__ == "__main__":
  main()
