"""Export a Linen model and its variables for deployment: norms folded, every file verified, one folder.

    export_model(model, variables, "deploy/vgg", formats=("stablehlo", "tflite"), quantize=("float16",))

writes ``model.stablehlo`` (`stablehlo`), ``model.tflite`` (`litert`), ``model_<quantization>.tflite`` and
``export_report.json`` (sizes, operators, errors against the JAX model, the folded norms). Everything is
checked before work starts and the folder appears only when complete: files are written into a hidden
sibling folder that is renamed at the end, so a failure or a kill leaves no partial export.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from receding_jax.deploy import folding, litert, stablehlo
from receding_jax.deploy import preprocessing as prep
from receding_jax.errors import InputError
from receding_jax.pruning import models as pruning_models
from receding_jax.pruning.checking import CHECK_PRECISION

FORMATS = ("stablehlo", "tflite")
#: Largest |exported - JAX| allowed, relative to the largest |JAX output| on the verification batch.
TOLERANCE = 1e-4
#: Precision of the float32 matmuls and convolutions of the JAX runs an export is held to: the reference and
#: the folding check (`run_checked`). Current NVIDIA GPUs compute them in TF32 by default, which put two
#: float32 runs of one VGG-16 1.7e-3 apart on an H100, beyond TOLERANCE. The pruning check's setting
#: (`pruning.checking.CHECK_PRECISION`), one for every check. The exported files keep the default
#: precision: the machine that runs them chooses.
REPORT_NAME = "export_report.json"


class ExportVerificationError(ValueError):
  """An exported model's outputs differ from the JAX model's beyond `TOLERANCE`, or it uses non-built-in ops."""


def check_request(output_dir: str | os.PathLike, formats: Sequence[str], quantize: Sequence[str],
                  tflite_batch: int, include_preprocessing: bool = False,
                  normalisation: prep.Normalisation | None = None) -> None:
  """Raises (one line naming the bad value) for an unusable request; nothing is read or written."""
  if include_preprocessing and normalisation is None:
    raise InputError("include_preprocessing needs the normalisation, which is unknown: pass --mean and --std "
                     "(or export a checkpoint inside its run's workdir, whose config.json has them)")
  if not formats or any(f not in FORMATS for f in formats):
    raise InputError(f"unknown export format in {','.join(formats) or '(none)'}; choose from {','.join(FORMATS)}")
  if any(q not in litert.QUANTIZATIONS for q in quantize):
    raise InputError(f"unknown quantization in {','.join(quantize)}; choose from {','.join(litert.QUANTIZATIONS)}")
  if quantize and "tflite" not in formats:
    raise InputError(f"quantization {','.join(quantize)} applies to the tflite format, which was not requested")
  if not isinstance(tflite_batch, int) or tflite_batch < 1:
    raise InputError(f"tflite_batch must be a positive int, got {tflite_batch!r}")
  if os.path.lexists(output_dir):
    raise FileExistsError(f"output_dir {output_dir} exists; refusing to overwrite it")
  if "tflite" in formats:
    litert.require_export_tools()


def compare(outputs: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  """Max absolute error, the same relative to max |reference|, and the fraction of equal argmax predictions."""
  outputs, reference = np.asarray(outputs, np.float64), np.asarray(reference, np.float64)
  error = float(np.abs(outputs - reference).max())
  scale = float(np.abs(reference).max()) or 1.0
  same = float(np.mean(outputs.argmax(-1) == reference.argmax(-1)))
  return {"max_abs_error": error, "relative_error": error / scale, "same_predictions": same}


def run_checked(fn: Any, inputs: np.ndarray) -> Any:
  """`fn(inputs)` jit-compiled with float32 matmuls and convolutions at CHECK_PRECISION: how the export runs
  every JAX computation that it compares (the reference, the folding check)."""
  with jax.default_matmul_precision(CHECK_PRECISION):
    return jax.jit(fn)(inputs)


def check_device() -> jax.Device | None:
  """Where the StableHLO file is run to be checked: a CPU, which computes its float32 matmuls and convolutions
  in float32 (a GPU would run the file's default precision in TF32); None (the default device) without one."""
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS without 'cpu'.
    return None


def linen_reference(model: nn.Module, variables: Mapping[str, Any], kwargs: Mapping[str, Any]) -> Any:
  """inputs -> outputs of the Linen `model` as given (unfolded) in inference mode: what exports are held to."""
  def reference(x):
    return model.apply(dict(variables), x, **kwargs)
  return reference


def export_model(
    model: nn.Module | nnx.Module, variables: Mapping[str, Any] | None, output_dir: str | os.PathLike,
    formats: Sequence[str] = FORMATS, *, inputs: Any = None, apply_kwargs: Mapping[str, Any] | None = None,
    quantize: Sequence[str] = (), tflite_batch: int = 1, verify_examples: int = 8, seed: int = 0,
    extra_report: Mapping[str, Any] | None = None, normalisation: prep.Normalisation | None = None,
    include_preprocessing: bool = False,
) -> dict[str, Any]:
  """Exports `model` with `variables` into the new folder `output_dir`; returns the report (also written).

  `inputs`: one example input or spec with its batch axis (default [1, *model.input_shape] float32).
  `apply_kwargs` adds to the keywords that put the model in inference mode (train=False, ...). An NNX
  model holds its variables (pass None) and runs in its `eval()` mode, without folding (see `nnx_inference`).
  `normalisation` (the training pipeline's mean and std) goes into the report's ``preprocessing``; with
  `include_preprocessing` the files take raw uint8 images and normalise them (`deploy.preprocessing`).
  Raises ExportVerificationError when an export is not faithful; then nothing is left on disk.
  """
  formats, quantize = tuple(formats), tuple(quantize)
  check_request(output_dir, formats, quantize, tflite_batch, include_preprocessing, normalisation)
  specs = pruning_models.input_specs(model, inputs)
  if len(specs) != 1:
    raise InputError(f"export takes models with one input, this one has {len(specs)}")
  example_shape = tuple(specs[0].shape[1:])
  if normalisation is not None:
    normalisation.check_channels(example_shape[-1] if example_shape else 1)
  count = -(-verify_examples // tflite_batch) * tflite_batch
  raw, examples, verified_on = _verification_inputs(count, example_shape, seed, include_preprocessing and
                                                    normalisation)
  if isinstance(model, nnx.Module):
    found, infer = NNX_FOLDING, nnx_inference(model)
    reference = run_checked(infer, examples)
  else:
    kwargs = pruning_models.eval_kwargs(model, apply_kwargs)
    reference = run_checked(linen_reference(model, variables, kwargs), examples)
  if not isinstance(reference, jax.Array) or reference.ndim < 1 or reference.shape[0] != count:
    raise InputError(f"export takes models returning one [batch, ...] array, got {jax.tree.structure(reference)}")
  reference = np.asarray(reference)
  if not isinstance(model, nnx.Module):
    found, infer = _checked_folding(model, variables, specs, kwargs, examples, reference)
  if include_preprocessing:
    infer = prep.with_preprocessing(infer, normalisation)
  described = prep.describe(example_shape, reference.shape[-1], normalisation, include_preprocessing)
  output = pathlib.Path(output_dir)
  output.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
  try:
    files = _write_formats(staging, infer, formats, quantize, example_shape, tflite_batch, raw, reference)
    report = {**dict(extra_report or {}), "input_shape": list(example_shape), "tolerance": TOLERANCE,
              "verified_on": verified_on, "folding": found.summary(), "files": files, "preprocessing": described}
    (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp made it private.
    os.rename(staging, output)  # Atomic: the folder exists only complete.
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return report


def _verification_inputs(count: int, shape: tuple[int, ...], seed: int, normalisation: Any) -> tuple[Any, ...]:
  """(the exported files' inputs, the model's inputs, how the report says so): standard-normal float32, or
  with `normalisation` (preprocessing included) random uint8 images and their normalised float32."""
  if not normalisation:
    examples = np.random.default_rng(seed).normal(size=(count, *shape)).astype(np.float32)
    return examples, examples, f"{count} standard-normal inputs, seed {seed}"
  raw = prep.random_images(count, shape, seed)
  return raw, np.asarray(normalisation.normalize(raw)), f"{count} uniform random uint8 images, seed {seed}"


NNX_FOLDING = folding.Folding((), {("*",): "NNX models are exported unfolded: each norm stays a per-channel "
                                             "multiply-add after its layer (the TFLite converter folds it)"})


def nnx_inference(model: nnx.Module) -> Any:
  """inputs -> outputs of a copy of the NNX `model` in `eval()` mode (the model itself is untouched)."""
  graphdef, state = nnx.split(nnx.clone(model))

  def infer(x):
    network = nnx.merge(graphdef, state)
    network.eval()
    return network(x)
  return infer


def _checked_folding(model, variables, specs, kwargs, examples, reference) -> tuple[folding.Folding, Any]:
  """The folding and folded function; without folds if folding changed the outputs (a folded layer's
  output is also read by something other than its norm), which the report then says."""
  found = folding.find_folds(model, variables, specs, kwargs)
  infer = folding.folded_function(model, variables, found, kwargs)
  check = compare(np.asarray(run_checked(infer, examples)), reference)
  if not found.folds or check["relative_error"] <= TOLERANCE:
    return found, infer
  why = (f"folding changed the outputs by {check['relative_error']:.3g} of the largest (a folded layer's output "
         "has another reader), so no norm was folded")
  unfolded = folding.Folding((), {**{f.norm: why for f in found.folds}, **found.unfolded})
  return unfolded, folding.folded_function(model, variables, unfolded, kwargs)


def _write_formats(folder: pathlib.Path, infer, formats, quantize, example_shape, tflite_batch, examples,
                   reference) -> dict[str, dict[str, Any]]:
  """Writes and verifies each requested file; returns {file name: its report entry}."""
  files: dict[str, dict[str, Any]] = {}
  if "stablehlo" in formats:
    module = stablehlo.export_stablehlo(infer, example_shape, dtype=examples.dtype)
    device = check_device()
    checks = [compare(stablehlo.run_stablehlo(module, examples[:n], device), reference[:n])
              for n in (len(examples), 1)]
    files["model.stablehlo"] = _verified("model.stablehlo", module, worst(checks), {"batch": "symbolic"})
  if "tflite" in formats:
    for quantization in (None, *quantize):
      model = litert.to_tflite(infer, (tflite_batch, *example_shape), quantization, dtype=examples.dtype)
      name = "model.tflite" if quantization is None else f"model_{quantization}.tflite"
      ops = litert.operators(model)
      if litert.non_builtin(ops):
        raise ExportVerificationError(f"{name} uses operators that are not TFLite built-ins: {litert.non_builtin(ops)}")
      check = compare(litert.run_tflite(model, examples), reference)
      entry = {"batch": tflite_batch, "operators": {op: ops.count(op) for op in sorted(set(ops))},
               "quantization": quantization}
      files[name] = _verified(name, model, check, entry, required=quantization is None)
  for name, entry in files.items():
    (folder / name).write_bytes(entry.pop("content"))
  return files


def worst(checks: Sequence[dict[str, float]]) -> dict[str, float]:
  """The largest errors and the smallest agreement over several checks."""
  return {"max_abs_error": max(c["max_abs_error"] for c in checks),
          "relative_error": max(c["relative_error"] for c in checks),
          "same_predictions": min(c["same_predictions"] for c in checks)}


def _verified(name: str, content: bytes, check: dict[str, float], entry: dict[str, Any],
              required: bool = True) -> dict[str, Any]:
  """The report entry of one file; ExportVerificationError if a float32 export is off by more than TOLERANCE."""
  if required and not check["relative_error"] <= TOLERANCE:
    raise ExportVerificationError(
        f"{name} differs from the JAX model by {check['max_abs_error']:.3g} ({check['relative_error']:.3g} of its "
        f"largest output; tolerance {TOLERANCE:g}); no file was written")
  return {**entry, **check, "bytes": len(content), "held_to_tolerance": required, "content": content}
