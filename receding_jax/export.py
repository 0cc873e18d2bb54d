"""Export a checkpoint for deployment: norms folded, StableHLO and/or LiteRT (TFLite), each verified.

    python -m receding_jax.export --checkpoint_dir=RUN/pruned_0.5/pruned --output_dir=deploy/p50 \\
        [--format=stablehlo,tflite] [--quantize=float16,int8] [--tflite_batch=1] [--step=N]
        [--include_preprocessing] [--mean=0.3 --std=0.4]

Writes OUTPUT_DIR/model.stablehlo (run it with ``jax.export.deserialize(bytes).call(x)``, any batch),
model.tflite (LiteRT, built-in ops only, batch --tflite_batch), model_<q>.tflite for each --quantize, and
export_report.json (sizes, operators, errors against the JAX model, folded norms, and `preprocessing`: input
shape and dtype, class count, the normalisation mean and std from the run's config.json or --mean/--std, or
'unknown'). --include_preprocessing makes the files take the raw uint8 images the dataset stores and
normalise them as training did. The TFLite format needs the [export] extra: pip install -e ".[export]";
--format=stablehlo needs only jax. Only parses flags: the work is
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


def _floats(text: str) -> tuple[float, ...]:
  """'0.3' or '0.49,0.48,0.45' as floats (argparse reports a bad one in one line)."""
  return tuple(float(v) for v in _names(text))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint_dir", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--format", default=",".join(deploy.FORMATS), help="stablehlo, tflite or both")
  parser.add_argument("--quantize", default="", help="extra TFLite variants: float16, int8 (dynamic range)")
  parser.add_argument("--tflite_batch", type=int, default=1, help="the TFLite model's fixed batch size")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--include_preprocessing", action="store_true",
                      help="the files take raw uint8 images and normalise them as training did")
  parser.add_argument("--mean", type=_floats, default=None, help="per-channel mean on [0, 1] pixels (default: "
                      "the run's config.json)")
  parser.add_argument("--std", type=_floats, default=None, help="per-channel std, as --mean")
  args = parser.parse_args(argv)
  try:
    with compile_clock.Clock() as clock:
      report = export_checkpoint(args.checkpoint_dir, args.output_dir, _names(args.format), step=args.step,
                                 quantize=_names(args.quantize), tflite_batch=args.tflite_batch, mean=args.mean,
                                 std=args.std, include_preprocessing=args.include_preprocessing)
  except (InputError, FileExistsError, FileNotFoundError, deploy.ExportVerificationError,
          deploy.MissingExportTools) as e:  # Bad input, missing tools, failed verification: one line.
    parser.exit(2, f"error: {e}\n")
  for name, entry in report["files"].items():
    print(f"{name}: {entry['bytes']:,} bytes, max |error| {entry['max_abs_error']:.3g} "
          f"({entry['relative_error']:.2g} of the largest output), same predictions {entry['same_predictions']:.1%}")
  print(f"folded {len(report['folding']['folded'])} norms; inputs: {report['preprocessing']['expects']}; "
        f"wrote {args.output_dir}")
  print(console.phase_line({"phase": "export", **clock.as_dict()}))


if __name__ == "__main__":
  main()
